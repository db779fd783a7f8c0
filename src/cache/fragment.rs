//! The one nix.conf fragment reachd owns, `$XDG_RUNTIME_DIR/reachd/nix.conf`, which the user
//! includes from their nix.conf with `!include` (a missing file is ignored). It names the caches
//! Nix may use now, and nothing at all while none is there, so that away from home Nix never
//! hears of them; and while no remote builder of the user's hosts is there, it switches the
//! nix-daemon's remote builders off (`builders =`: the one value of `builders` the daemon takes
//! from a user it does not trust, docs/remote-builder.md). The file is replaced atomically (write, fsync, rename, fsync the directory):
//! a Nix command reading it concurrently sees the old or the new file, never half of one (a
//! syntax error in an included file would break every Nix command). It lives in the runtime
//! directory so that a reboot or a logout never leaves a stale cache behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::atomic_file::{self, Mode};

/// The fragment and what was last written to it.
#[derive(Debug)]
pub struct Fragment {
    path: PathBuf,
    written: Option<String>,
}

impl Fragment {
    /// The fragment under `runtime_dir` (`$XDG_RUNTIME_DIR`); nothing is written yet.
    pub fn in_runtime_dir(runtime_dir: &Path) -> Self {
        Fragment {
            path: runtime_dir.join("reachd").join("nix.conf"),
            written: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the fragment name exactly `substituters` (in this order; none: no setting at all)
    /// and, with `builders_off`, switch remote builds off. Writes only when that changes what
    /// was written; returns whether it wrote.
    pub fn set(&mut self, substituters: &[String], builders_off: bool) -> io::Result<bool> {
        let text = render(substituters, builders_off, &self.path);
        if self.written.as_ref() == Some(&text) {
            return Ok(false);
        }
        replace(&self.path, &text)?;
        self.written = Some(text);
        Ok(true)
    }
}

/// The fragment's text. Substituter URIs are validated by the configuration (no whitespace, no
/// `#`), so each is one word of the one setting line.
fn render(substituters: &[String], builders_off: bool, path: &Path) -> String {
    let mut text = format!(
        "# Written by reachd: the Nix caches on this network that answer now, and remote builds\n\
         # off while no remote builder of reachd's hosts is there (`reachd status` says why).\n\
         # reachd replaces this file; include it from nix.conf with\n\
         # !include {}\n",
        path.display()
    );
    if !substituters.is_empty() {
        text.push_str(&format!(
            "extra-substituters = {}\n",
            substituters.join(" ")
        ));
    }
    if builders_off {
        text.push_str("builders =\n");
    }
    text
}

/// Replaces `path` with `text` atomically and durably.
fn replace(path: &Path, text: &str) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // The caller names the fragment; the step's own error is enough.
    atomic_file::write(dir, &name, text.as_bytes(), Mode::Umask).map_err(|e| e.source)?;
    atomic_file::sync_dir(dir).map_err(|e| e.source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_caches_only_while_there_are_some() {
        let dir = tempfile::tempdir().unwrap();
        let mut fragment = Fragment::in_runtime_dir(dir.path());
        assert_eq!(fragment.path(), dir.path().join("reachd/nix.conf"));
        assert!(fragment.set(&[], false).unwrap());
        let away = fs::read_to_string(fragment.path()).unwrap();
        assert!(away.lines().all(|l| l.starts_with('#')), "{away}");
        assert!(
            !fragment.set(&[], false).unwrap(),
            "unchanged: not written again"
        );

        let home = ["http://127.0.0.1:37515".to_string()];
        assert!(fragment.set(&home, false).unwrap());
        let text = fs::read_to_string(fragment.path()).unwrap();
        let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(settings, ["extra-substituters = http://127.0.0.1:37515"]);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("reachd"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["nix.conf"], "no temporary file is left");
    }

    #[test]
    fn switches_remote_builds_off_while_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut fragment = Fragment::in_runtime_dir(dir.path());
        let settings = |fragment: &Fragment| -> Vec<String> {
            let text = fs::read_to_string(fragment.path()).unwrap();
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert!(fragment.set(&[], true).unwrap());
        assert_eq!(settings(&fragment), ["builders ="]);
        let home = ["http://127.0.0.1:37515".to_string()];
        assert!(fragment.set(&home, false).unwrap());
        assert_eq!(
            settings(&fragment),
            ["extra-substituters = http://127.0.0.1:37515"]
        );
        assert!(fragment.set(&home, true).unwrap());
        assert_eq!(
            settings(&fragment),
            ["extra-substituters = http://127.0.0.1:37515", "builders ="]
        );
    }

    #[test]
    fn a_write_that_fails_is_reported_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        // The fragment's directory cannot be created: a file stands in its way.
        fs::write(dir.path().join("reachd"), "").unwrap();
        let mut fragment = Fragment::in_runtime_dir(dir.path());
        assert!(fragment.set(&[], false).is_err());
        fs::remove_file(dir.path().join("reachd")).unwrap();
        assert!(fragment.set(&[], false).unwrap(), "written once it can be");
    }
}
