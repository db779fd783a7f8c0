//! `reachd-nix-upload`: Nix's `post-build-hook` for reachd. It records the build in the upload
//! spool for the agent to upload later, and always exits 0, because a failing hook fails the
//! build. Install it root-owned (Nix runs it as root) and set it in /etc/nix/nix.conf:
//! `post-build-hook = /usr/local/bin/reachd-nix-upload` (docs/nix-upload.md).

use std::env;
use std::process::ExitCode;

use reachd::upload::hook;

fn main() -> ExitCode {
    // Even a bug must not fail the build: the panic is printed (into the build log), then 0.
    let _ = std::panic::catch_unwind(|| {
        let dir = hook::spool_dir(env::var_os(hook::SPOOL_VAR).as_deref());
        let drv = env::var_os("DRV_PATH");
        let outs = env::var_os("OUT_PATHS");
        hook::run(
            &dir,
            drv.as_deref(),
            outs.as_deref(),
            &mut std::io::stderr(),
        );
    });
    ExitCode::SUCCESS
}
