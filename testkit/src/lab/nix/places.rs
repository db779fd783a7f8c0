//! Where the lab's Nix things are (paths, the cache's address and URL), in one leaf that every
//! part of the lab's Nix and the lab user read, so that none of them imports another for a path.

use std::path::PathBuf;

use crate::lab::dir;

/// The laptop's Nix: its "/etc/nix", its chroot store, its daemon's socket.
pub fn laptop_dir() -> PathBuf {
    dir().join("laptop-nix")
}

/// The laptop's "/etc/nix" (NIX_CONF_DIR of its daemon and of the user's commands).
pub fn laptop_etc() -> PathBuf {
    laptop_dir().join("etc")
}

pub fn laptop_store_root() -> PathBuf {
    laptop_dir().join("root")
}

pub fn laptop_socket() -> PathBuf {
    laptop_dir().join("daemon.sock")
}

/// The user's nix.conf without the `!include` (NIX_USER_CONF_FILES), for comparisons.
pub fn user_conf_without_include() -> PathBuf {
    laptop_dir().join("user-without-include.conf")
}

/// A second substituter for the user's commands, after the Pi's: a `file://` binary cache with
/// `Priority: 40` (cache.nixos.org's) and nothing in it, standing in for cache.nixos.org.
pub fn stand_in_dir() -> PathBuf {
    laptop_dir().join("stand-in")
}

pub fn stand_in_url() -> String {
    format!("file://{}", stand_in_dir().display())
}

/// The tunnel's socket as a store: what the old recipe named in `extra-substituters`.
pub const TUNNEL_STORE: &str = "unix:///run/user/1500/rpi-nix-daemon.sock";

pub fn pi_store_root() -> PathBuf {
    dir().join("pi/store-root")
}

/// The Pi's nix-daemon socket, where a real Pi has it (below its store's root): visible only in
/// the Pi's mount namespace.
pub fn pi_socket() -> PathBuf {
    pi_store_root().join("nix/var/nix/daemon-socket/socket")
}

pub fn pi_nix_dir() -> PathBuf {
    dir().join("pi/nix")
}

/// The variable that points the hook at a spool other than /var/spool/reachd.
pub const SPOOL_VAR: &str = "REACHD_SPOOL";

/// The lab's spool (reachd's `[nix] spool`, the hook's `REACHD_SPOOL`).
pub fn spool_dir() -> PathBuf {
    dir().join("spool")
}

/// The hook as the laptop's nix-daemon runs it: a root-owned copy of the built binary.
pub fn hook_path() -> PathBuf {
    dir().join("bin/reachd-nix-upload")
}

/// Where reachd serves the Pi's cache, in the laptop's network namespace (its config's
/// `listen`).
pub const CACHE_LISTEN: &str = "127.0.0.1:37515";

/// The URL Nix uses for that cache.
pub const CACHE_URL: &str = "http://127.0.0.1:37515";

/// The one line reachd's fragment holds while the Pi's cache can serve.
pub const SUBSTITUTER_LINE: &str = "extra-substituters = http://127.0.0.1:37515";
