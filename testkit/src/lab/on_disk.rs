//! Where a run keeps its records on disk (DIR/state: recorded PIDs, markers for what the lab
//! created outside DIR), and the lazy unmount of what it mounted: the leaves that the parts
//! which create things and [`cleanup`](super::cleanup), which undoes them, both use.

use std::fs;
use std::path::{Path, PathBuf};

use crate::lab::{dir, T};
use crate::process::Spawn;

/// A record of the run, in DIR/state.
pub fn state(name: &str) -> PathBuf {
    dir().join("state").join(name)
}

/// Lazily unmounts anything mounted below `root` (an sshfs killed mid-run leaves a dead mount
/// that makes `rm -r` fail).
pub fn unmount_below(root: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(target) = line.split_whitespace().nth(1) {
            // /proc/mounts escapes spaces as \040; our paths have none.
            if Path::new(target).starts_with(root) {
                let _ = Spawn::new("umount").args(["-l", target]).run(T);
            }
        }
    }
}
