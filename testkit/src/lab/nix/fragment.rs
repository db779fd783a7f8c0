//! reachd's nix.conf fragment as the user's Nix reads it, and what reachd says about Nix. The
//! contract: one file, replaced atomically, holding `extra-substituters = CACHE_URL` exactly while
//! the Pi is reachable, its target active and its daemon answering through the tunnel, and
//! otherwise only comments; `reachd status --json` and D-Bus say the same (`nix_in_use`,
//! `NixInUse`).

use std::fs;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use super::places::SUBSTITUTER_LINE;
use crate::lab::user::fragment_path;
use crate::lab::Lab;
use crate::process::wait_until;

/// One read of the fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fragment {
    /// No file.
    Absent,
    /// A complete file naming the Pi's cache.
    WithCache,
    /// A complete file without it (comments, blank lines).
    WithoutCache,
    /// Anything else (an empty file, a line cut short, a line that is not ours): what was read.
    Bad(String),
}

impl Fragment {
    pub fn read() -> Fragment {
        match fs::read(fragment_path()) {
            Ok(bytes) => Fragment::parse(&bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => Fragment::Absent,
            Err(e) => Fragment::Bad(format!("reading it: {e}")),
        }
    }

    /// A complete file ends with a newline (so a write cut short after a line shows too, as
    /// does the empty file a non-atomic writer leaves between truncating and writing); each
    /// line is a comment, blank, or exactly [`SUBSTITUTER_LINE`], which comes at most once.
    pub fn parse(bytes: &[u8]) -> Fragment {
        let text = String::from_utf8_lossy(bytes);
        if !text.ends_with('\n') {
            return Fragment::Bad(format!("{text:?} (no final newline)"));
        }
        let mut cache = 0;
        for line in text.lines() {
            if line == SUBSTITUTER_LINE {
                cache += 1;
            } else if !(line.trim().is_empty() || line.starts_with('#')) {
                return Fragment::Bad(format!("{text:?} (line {line:?})"));
            }
        }
        match cache {
            0 => Fragment::WithoutCache,
            1 => Fragment::WithCache,
            _ => Fragment::Bad(format!("{text:?} (the cache {cache} times)")),
        }
    }
}

impl Lab {
    /// Waits until the fragment exists and names the Pi's cache (`with`) or does not; returns
    /// how long that took.
    pub fn expect_fragment(&self, with: bool, within: Duration) -> Result<Duration, String> {
        let want = if with {
            Fragment::WithCache
        } else {
            Fragment::WithoutCache
        };
        let start = Instant::now();
        let what = format!(
            "{} {} the Pi's cache",
            fragment_path().display(),
            if with { "naming" } else { "without" }
        );
        wait_until(within, &what, || match Fragment::read() {
            f if f == want => Ok(Some(())),
            f => Err(format!("{f:?}")),
        })?;
        Ok(start.elapsed())
    }

    /// Waits until `reachd status --json` and D-Bus both say whether the Pi's cache is in use,
    /// as `in_use`; returns reachd's reason.
    pub fn expect_nix_in_use(&self, in_use: bool, within: Duration) -> Result<String, String> {
        let what = format!("reachd saying nix_in_use={in_use} (status --json and D-Bus)");
        wait_until(within, &what, || {
            let (json, bus) = (self.user().nix_status()?, self.user().nix_dbus()?);
            if json != bus {
                Err(format!("status --json {json:?} but D-Bus {bus:?}"))
            } else if json.in_use != in_use {
                Err(format!("{json:?}"))
            } else {
                Ok(Some(json.reason))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_files_only() {
        let with = format!("# reachd\n{SUBSTITUTER_LINE}\n");
        assert_eq!(Fragment::parse(with.as_bytes()), Fragment::WithCache);
        assert_eq!(Fragment::parse(b"# away\n\n"), Fragment::WithoutCache);
        for bad in [
            "".to_string(),
            format!("# reachd\n{SUBSTITUTER_LINE}"),
            "# reachd\nextra-substituters = http://127.0\n".to_string(),
            format!("{SUBSTITUTER_LINE}\n{SUBSTITUTER_LINE}\n"),
            "substituters = http://127.0.0.1:37515\n".to_string(),
        ] {
            assert!(
                matches!(Fragment::parse(bad.as_bytes()), Fragment::Bad(_)),
                "{bad:?}"
            );
        }
    }
}
