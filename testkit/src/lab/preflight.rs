//! Checks that the lab can run at all (root, the programs, the cgroup layout) and says what to
//! install when it can't: the lab fails loudly rather than skipping, so a green CI means it ran.

use std::env;
use std::path::{Path, PathBuf};

/// Programs the lab runs, with the Debian package that provides each.
const PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("unshare", "util-linux"),
    ("runuser", "util-linux"),
    ("timeout", "coreutils"),
    ("getent", "libc-bin"),
    ("useradd", "passwd"),
    ("userdel", "passwd"),
    ("usermod", "passwd"),
    ("dbus-daemon", "dbus"),
    ("busctl", "systemd"),
    ("systemctl", "systemd"),
    ("NetworkManager", "network-manager"),
    ("nmcli", "network-manager"),
    ("avahi-daemon", "avahi-daemon"),
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sshfs", "sshfs"),
    ("fusermount3", "fuse3"),
    ("nsenter", "util-linux"),
    ("nft", "nftables"),
    ("nix-daemon", "nix-bin"),
    ("nix-store", "nix-bin"),
    ("nix-build", "nix-bin"),
    ("nix", "nix-bin"),
    // The README's status bar example (scenario 38) pipes `reachd status` through jq.
    ("jq", "jq"),
];

/// Files the lab needs that are not on PATH.
const FILES: &[(&str, &str)] = &[
    ("/usr/lib/systemd/systemd", "systemd"),
    ("/usr/lib/systemd/user/dbus.socket", "dbus-user-session"),
    ("/usr/lib/NetworkManager/nm-dispatcher", "network-manager"),
    ("/usr/share/dbus-1/system.conf", "dbus"),
];

/// Makes sure the sbin directories are on PATH (CI may run us with a user's PATH).
pub fn fix_path() {
    let old = env::var("PATH").unwrap_or_default();
    let mut dirs: Vec<String> = old
        .split(':')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_string());
        }
    }
    // Edition 2021: set_var is safe; we are still single-threaded here.
    env::set_var("PATH", dirs.join(":"));
}

/// Where `program` is on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Every reason the lab cannot run here, each with its fix.
pub fn problems() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        out.push(
            "the lab must run as root (it creates network namespaces, a user and cgroups): \
             run `sudo -E cargo test --test lab`"
                .to_string(),
        );
    }
    for (prog, pkg) in PROGRAMS {
        if which(prog).is_none() {
            out.push(format!(
                "`{prog}` not found: install the Debian package {pkg}"
            ));
        }
    }
    for (file, pkg) in FILES {
        if !Path::new(file).exists() {
            out.push(format!(
                "{file} not found: install the Debian package {pkg}"
            ));
        }
    }
    if let Err(e) = crate::lab::nix::LaptopNix::current() {
        out.push(e);
    }
    if !Path::new("/dev/fuse").exists() {
        out.push("/dev/fuse missing: the sshfs mount needs FUSE (modprobe fuse)".to_string());
    }
    for h in ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"] {
        if !Path::new(h).join("cgroup.procs").exists() {
            out.push(format!(
                "{h} is not a mounted cgroup hierarchy: the lab's systemd --user recipe needs \
                 the hybrid cgroup layout (name=systemd v1 + unified v2) of the project's VMs"
            ));
        }
    }
    out
}
