//! The lab's Nix (testkit's lab/nix/) checked before reachd is: the Pi's store reachable only
//! through the tunnel, the laptop's nix-daemon serving the user.

use std::fs;

use reachd_testkit::lab::nix::pi_store_root;
use reachd_testkit::lab::{Lab, T};

/// Before reachd runs (lab self-check): the Pi's store is out of the laptop's reach, and the
/// laptop's daemon serves the user.
pub fn self_check_stores(lab: &Lab) -> Result<String, String> {
    let ns = |p: &str| fs::read_link(p).map_err(|e| format!("{p}: {e}"));
    let pi_ns = lab.pi_mount_ns()?;
    if ns("/proc/self/ns/mnt")? == ns(&pi_ns.to_string_lossy())? {
        return Err("the Pi's nix-daemon runs in the machine's mount namespace".into());
    }
    let here = fs::read_dir(pi_store_root())
        .map_err(|e| format!("{}: {e}", pi_store_root().display()))?
        .count();
    if here != 0 {
        return Err(format!(
            "{} shows {here} entries outside the Pi's namespace",
            pi_store_root().display()
        ));
    }
    let p = lab.nix_paths();
    let local = lab.nix_as_user(&["nix", "path-info", &p.local], T)?;
    if local.code != 0 {
        return Err(format!(
            "the laptop's daemon, asked by the user: {}",
            local.summary()
        ));
    }
    let small = lab.nix_as_user(&["nix", "path-info", &p.small], T)?;
    if small.code == 0 {
        return Err("the laptop's store has the Pi's path before anything fetched it".into());
    }
    Ok(
        "the Pi's store only in its own mount namespace, the laptop's daemon serving the user"
            .into(),
    )
}

/// With the target up (lab self-check): the Pi's daemon answers through the tunnel, its paths
/// signed by pi-1.
pub fn self_check_tunnel(lab: &Lab) -> Result<String, String> {
    let version = lab.expect_tunnel()?;
    let tunnel = lab.user().runtime_dir().join("rpi-nix-daemon.sock");
    let store = format!("unix://{}", tunnel.display());
    let small = &lab.nix_paths().small;
    let info = lab.nix_as_user(&["nix", "path-info", "--sigs", "--store", &store, small], T)?;
    if info.code != 0 || !info.stdout.contains(" pi-1:") {
        return Err(format!(
            "the Pi's {small} through the tunnel: {} {}",
            info.summary(),
            info.stdout.trim()
        ));
    }
    Ok(format!(
        "the Pi's nix-daemon (protocol {version}) answers through the tunnel, signed by pi-1"
    ))
}
