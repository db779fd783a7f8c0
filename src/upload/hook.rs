//! Nix's `post-build-hook`, as a library function so that it can be tested without Nix.
//!
//! Nix runs the hook as root, synchronously, after each build, with `DRV_PATH` and `OUT_PATHS`
//! (space-separated; empty in Nix 2.8) in its environment, and fails the build if it exits
//! non-zero. So this only validates those paths and records them in the spool: no network, no
//! shell, no other program, a few milliseconds, and never a failed build. Anything that goes
//! wrong is written to stderr, which Nix shows in the build log.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::DEFAULT_SPOOL;
use crate::error::Chain;
use crate::store_path::{Shown, StorePath};
use crate::upload::spool::{Entry, EntryId, Spool, MAX_ENTRY_BYTES};

/// Overrides the spool directory. For tests: Nix runs the hook with the daemon's environment,
/// which an installation has no reason to change.
pub const SPOOL_VAR: &str = "REACHD_SPOOL";

/// Prefix of every line the hook prints (Nix mixes it into the build log).
const PREFIX: &str = "reachd-nix-upload";

/// At most this many refused values are named in the build log; the rest are counted.
const MAX_REFUSALS_SHOWN: usize = 5;

/// What the hook's environment asks to record: the entry, if any path was valid, and a message
/// for each value that was refused.
#[derive(Debug, Default)]
pub struct Request {
    pub entry: Option<Entry>,
    pub refused: Vec<String>,
}

/// Validates `DRV_PATH` and `OUT_PATHS`. Only valid store paths make it into the entry; every
/// other value becomes a message that shows it escaped and shortened.
pub fn request(drv_path: Option<&OsStr>, out_paths: Option<&OsStr>) -> Request {
    let mut refused = Vec::new();
    let mut parse = |var: &str, value: &OsStr| -> Option<StorePath> {
        let Some(text) = value.to_str() else {
            let lossy = value.to_string_lossy();
            refused.push(format!("{var}: {} is not UTF-8", Shown(&lossy)));
            return None;
        };
        text.parse()
            .map_err(|e| refused.push(format!("{var}: {e}")))
            .ok()
    };
    let drv = drv_path
        .filter(|v| !v.is_empty())
        .and_then(|v| parse("DRV_PATH", v));
    let outs: Vec<StorePath> = out_paths
        .map(|v| {
            v.as_bytes()
                .split(|&b| b == b' ')
                .filter(|token| !token.is_empty())
                .map(OsStr::from_bytes)
                .filter_map(|token| parse("OUT_PATHS", token))
                .collect()
        })
        .unwrap_or_default();
    let mut entry = Entry::new(drv, outs);
    if let Some(e) = entry.take_if(|e| e.encode(None).len() > MAX_ENTRY_BYTES) {
        // Thousands of outputs (Nix >= 2.9 names them all): the derivation alone records them
        // as well, its outputs are found when uploading, as for Nix 2.8's empty OUT_PATHS.
        entry = Entry::new(e.drv.clone(), []);
        if entry.is_none() {
            refused.push(format!(
                "OUT_PATHS: {} outputs are too many for one entry, and DRV_PATH is not set",
                e.outs.len()
            ));
        }
    }
    Request { entry, refused }
}

/// The spool the hook writes to: `$REACHD_SPOOL`, else [`DEFAULT_SPOOL`].
pub fn spool_dir(var: Option<&OsStr>) -> PathBuf {
    var.filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SPOOL), PathBuf::from)
}

/// The whole hook: validates, records in the spool at `dir`, and explains any problem on `log`.
/// Returns the recorded entry's id. Never fails: a failed hook would fail the build.
pub fn run(
    dir: &Path,
    drv_path: Option<&OsStr>,
    out_paths: Option<&OsStr>,
    log: &mut dyn Write,
) -> Option<EntryId> {
    let request = request(drv_path, out_paths);
    let hidden = request.refused.len().saturating_sub(MAX_REFUSALS_SHOWN);
    for message in request.refused.iter().take(MAX_REFUSALS_SHOWN) {
        let _ = writeln!(log, "{PREFIX}: refused {message}");
    }
    if hidden > 0 {
        let _ = writeln!(log, "{PREFIX}: refused {hidden} more values");
    }
    let Some(entry) = request.entry else {
        if drv_path.is_none() && out_paths.is_none() {
            let _ = writeln!(
                log,
                "{PREFIX}: DRV_PATH and OUT_PATHS are not set: this is Nix's post-build-hook \
                 (see docs/nix-upload.md)"
            );
        } else {
            let _ = writeln!(log, "{PREFIX}: nothing to upload for this build");
        }
        return None;
    };
    let what = entry
        .drv
        .as_ref()
        .or(entry.outs.first())
        .map(|p| p.to_string());
    let what = what.unwrap_or_default();
    match Spool::open(dir).and_then(|spool| spool.record(&entry)) {
        Ok(id) => Some(id),
        Err(err) => {
            let _ = writeln!(
                log,
                "{PREFIX}: {what} will not be uploaded: {}",
                Chain(&err)
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/p5fh7jg51y4pqpnm7afc44i54c8i9x0d-x0.drv";
    const OUT: &str = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0";
    const DEV: &str = "/nix/store/x8xpv4jfa69jx19l530d7yzl7pjb1y6i-x0-dev";

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn nix_2_8_empty_out_paths_records_the_derivation_only() {
        let r = request(os(DRV), os(""));
        let entry = r.entry.expect("an entry");
        assert_eq!(entry.drv.as_ref().map(StorePath::as_str), Some(DRV));
        assert!(entry.outs.is_empty());
        assert!(r.refused.is_empty());
    }

    #[test]
    fn filled_out_paths_are_split_on_spaces_and_sorted() {
        let r = request(os(DRV), os(&format!(" {OUT}  {DEV} {OUT} ")));
        let outs: Vec<_> = r.entry.expect("an entry").outs.into_iter().collect();
        assert_eq!(outs.len(), 2);
        assert!(r.refused.is_empty());
    }

    /// `count` output paths of distinct hashes, space-separated, as Nix sets OUT_PATHS.
    fn many_outputs(count: usize) -> String {
        (0..count)
            .map(|i| format!("/nix/store/{i:032}-x0-o{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn thousands_of_outputs_are_recorded_by_their_derivation_without_a_word() {
        let r = request(os(DRV), os(&many_outputs(2000)));
        let entry = r.entry.expect("an entry");
        assert_eq!(entry.drv.as_ref().map(StorePath::as_str), Some(DRV));
        assert!(entry.outs.is_empty());
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        let r = request(None, os(&many_outputs(2000)));
        assert!(r.entry.is_none());
        assert!(
            r.refused[0].contains("DRV_PATH is not set"),
            "{:?}",
            r.refused
        );
    }

    #[test]
    fn hostile_values_are_refused_and_only_valid_paths_kept() {
        let hostile = [
            "$(touch /tmp/pwned)",
            "`id`",
            "'; rm -rf / #",
            "\"/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0\"",
            "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0\nout /etc/shadow",
            "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0\tx",
            "/nix/store/../../etc/passwd",
        ];
        for value in hostile {
            let r = request(os(value), None);
            assert!(r.entry.is_none(), "{value:?} accepted");
            assert_eq!(r.refused.len(), 1, "{value:?}");
            assert!(!r.refused[0].contains('\n'), "{:?}", r.refused[0]);
            let r = request(os(DRV), os(&format!("{OUT} {value}")));
            let entry = r.entry.expect("the valid paths");
            assert_eq!(entry.paths().count(), 2, "{value:?}");
            assert!(!entry.encode(None).contains("pwned"));
        }
    }

    #[test]
    fn a_huge_value_is_refused_in_a_short_message() {
        let huge = format!("{OUT}{}", "a".repeat(10 << 20));
        let mut log = Vec::new();
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(run(dir.path(), os(&huge), os(&huge), &mut log).is_none());
        let log = String::from_utf8(log).expect("utf-8");
        assert!(log.len() < 1000, "{} bytes of log", log.len());
        assert!(log.contains("longer than 211"), "{log}");
    }

    #[test]
    fn not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let r = request(Some(OsStr::from_bytes(b"/nix/store/\xff")), None);
        assert!(r.entry.is_none());
        assert!(r.refused[0].contains("not UTF-8"), "{:?}", r.refused);
    }

    #[test]
    fn records_into_the_spool_and_explains_a_missing_spool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = Vec::new();
        let id = run(dir.path(), os(DRV), os(OUT), &mut log).expect("recorded");
        assert!(log.is_empty(), "{}", String::from_utf8_lossy(&log));
        let path = dir.path().join("incoming").join(format!("{id}.entry"));
        let text = std::fs::read_to_string(path).expect("entry file");
        assert_eq!(text, format!("reachd-upload 1\ndrv {DRV}\nout {OUT}\n"));

        let missing = dir.path().join("nope");
        assert!(run(&missing, os(DRV), os(""), &mut log).is_none());
        let log = String::from_utf8(log).expect("utf-8");
        assert!(log.contains("will not be uploaded"), "{log}");
        assert!(log.contains("tmpfiles"), "{log}");
    }

    #[test]
    fn no_environment_says_what_the_program_is() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = Vec::new();
        assert!(run(dir.path(), None, None, &mut log).is_none());
        assert!(String::from_utf8_lossy(&log).contains("post-build-hook"));
    }

    #[test]
    fn spool_dir_defaults_to_var_spool() {
        assert_eq!(spool_dir(None), PathBuf::from("/var/spool/reachd"));
        assert_eq!(spool_dir(os("")), PathBuf::from("/var/spool/reachd"));
        assert_eq!(spool_dir(os("/tmp/s")), PathBuf::from("/tmp/s"));
    }
}
