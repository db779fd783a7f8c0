//! The precondition of the tests that run real Nix outside the lab (tests/nix_cache.rs,
//! tests/nix_spool.rs): root (chroot stores, a nix-daemon) and Nix's programs, or a failure
//! that says what to install. Never a silent skip.

use crate::lab::preflight::which;

/// Fails the test unless it runs as root with Nix's programs; `why` says what needs root.
pub fn require_root_and_nix(why: &str) {
    // SAFETY: plain syscall.
    assert!(unsafe { libc::geteuid() } == 0, "{why}: run them as root");
    for program in ["nix", "nix-store", "nix-build", "nix-daemon"] {
        assert!(
            which(program).is_some(),
            "`{program}` is missing: these tests need real Nix: apt-get install nix-bin"
        );
    }
}
