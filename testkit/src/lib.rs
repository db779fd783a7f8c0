//! reachd's test rigs, shared by the integration tests and the benchmark: a crate of their own
//! so that each test and the bench use them as a library, not by including each other's files.
//!
//! - [`bus`]: a private `dbus-daemon` on a temporary socket;
//! - [`netns`] and [`process`]: network namespaces and helper processes, started and stopped
//!   by PID (never by name), with avahi where a test needs real mDNS;
//! - [`lab`]: the end-to-end lab (real NetworkManager, systemd --user, avahi, sshd);
//! - [`nix`]: what the tests of real Nix outside the lab need.
//!
//! Everything here needs root, except [`bus`].

use std::path::{Path, PathBuf};

pub mod bus;
pub mod lab;
pub mod netns;
pub mod nix;
pub mod process;

/// The reachd repository, for the files the tests install from it (units, the hook).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the repository")
        .to_path_buf()
}
