//! Nix for the tests outside the lab: the precondition of those that run real Nix
//! (tests/nix_cache.rs, tests/nix_spool.rs, tests/nix_builders.rs): root (chroot stores, a
//! nix-daemon) and Nix's programs, or a failure that says what to install, never a silent skip;
//! and the evaluation of the repository's Nix files with `nix-instantiate` alone
//! (tests/nix_files.rs, tests/install.rs), which needs neither root nor nixpkgs.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// Waits until a nix-daemon started by a test accepts connections on `socket`; fails the test
/// after `within`, with the daemon's `log`.
pub fn wait_for_daemon(socket: &Path, log: &Path, within: Duration) {
    let start = Instant::now();
    while UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < within,
            "nix-daemon did not listen on {} within {within:?}: {}",
            socket.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs nix-instantiate in the repository, with no configuration of the machine's.
pub fn instantiate(args: &[&str]) -> Output {
    assert!(
        which("nix-instantiate").is_some(),
        "`nix-instantiate` is missing: these tests need Nix: apt-get install nix-bin"
    );
    let config_dir = tempfile::tempdir().expect("temp dir");
    Command::new("nix-instantiate")
        .args(args)
        .current_dir(crate::repo())
        .env("NIX_CONF_DIR", config_dir.path())
        .env_remove("NIX_CONFIG")
        .output()
        .expect("run nix-instantiate")
}

/// The value of a Nix expression (evaluated in the repository: `./nix/...` are its files).
pub fn eval(expression: &str) -> Value {
    let output = instantiate(&[
        "--readonly-mode",
        "--eval",
        "--strict",
        "--json",
        "--expr",
        expression,
    ]);
    assert!(
        output.status.success(),
        "evaluating {expression}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("nix-instantiate --json prints JSON")
}
