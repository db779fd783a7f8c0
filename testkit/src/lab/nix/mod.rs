//! The lab's Nix, so that reachd's Nix support meets real Nix: a nix-daemon on the Pi whose store
//! exists only in the Pi's own mount namespace (the laptop reaches it only through the ssh
//! tunnel, as across a real LAN), the laptop's nix-daemon inside the laptop's network namespace
//! (where reachd's cache listens on 127.0.0.1), and the lab user's Nix configuration, which
//! includes reachd's fragment as README.md, "Nix at home", tells users to.
//!
//! Modules: pi.rs (the Pi's daemon and store), laptop.rs (the laptop's daemon, running nix as
//! the user), builder.rs (the Pi as the laptop's remote builder), install.rs (which Nix the laptop runs: the machine's, or a current one in a chroot), builds.rs (timed builds of new derivations, alone or on a schedule), vanish.rs (the
//! vanish window: faults and the builds timed across them), fragment.rs (reachd's fragment and what reachd says about Nix), upload.rs (the
//! post-build hook, the spool, the laptop's signing key); places.rs (where things are) and
//! tools.rs (starting Nix, greeting a daemon) are the leaves they all read; the user's
//! nix.conf is written with the user's other files (../user.rs). Where things are:
//! - DIR/pi/store-root: the Pi's chroot store, a tmpfs mounted in the Pi's mount namespace only
//!   (sshd and the Pi's nix-daemon share that namespace); from the machine's own namespace it
//!   is an empty directory. Its daemon's socket, the tunnel's far end (`RPI_NIX_SOCKET`), is
//!   inside it: [`pi_socket`].
//! - DIR/pi/nix: the Pi's nix.conf (its NIX_CONF_DIR), its key pi-1, the expression it builds.
//! - DIR/laptop-nix: the laptop's "/etc/nix" (etc/, read by its daemon and by the user's
//!   commands alike, as /etc/nix/nix.conf is on a real machine), its chroot store (root/), the
//!   daemon's socket (daemon.sock).
//! - ~/.config/nix/nix.conf of the lab user: `store = unix://…/daemon.sock?root=…` and
//!   `!include /run/user/1500/reachd/nix.conf` ([`fragment_path`]).
//! - DIR/spool: the upload spool, DIR/bin/reachd-nix-upload: the laptop daemon's post-build
//!   hook (upload.rs).
//!
//! Facts (checked here with Debian's Nix 2.8):
//! - The Pi's paths are outputs of derivations, signed by the Pi's daemon as it builds them
//!   (`secret-key-files`): a content-addressed path (`nix-store --add`, `builtins.toFile`) is
//!   accepted without any signature, so it would prove nothing about signatures.
//! - A chroot store always builds in a sandbox, whatever `sandbox` says; the builders need
//!   `extra-sandbox-paths` for /bin/sh, and absolute paths for other programs (PATH is unset).
//! - A `unix://` store reads NARs from the local file system (`nix copy --from unix://…` fails
//!   like the substituter does): that is why reachd serves the Pi's store over HTTP.
//! - /proc/PID/root reaches into another mount namespace: the lab waits for the Pi's socket
//!   through it; Nix never looks there.

use std::path::Path;

use crate::lab::Lab;

mod builder;
mod builds;
mod fragment;
mod install;
mod laptop;
mod pi;
pub(crate) mod places;
mod tools;
mod upload;
pub mod vanish;

pub use self::builder::{pi_machine_line, BuiltOn, CONNECT_TIMEOUT};
pub use self::builds::{derivation_expr, extra_wait, nonce, Caches, Spread, Timed, BUILD_TIMEOUT};
pub use self::fragment::Fragment;
pub use self::install::{LaptopNix, CURRENT_NIX_VAR};
pub use self::laptop::{old_recipe_conf, NixRun};
pub use self::pi::SMALL_TEXT;
pub use self::places::{
    hook_path, laptop_etc, laptop_store_root, pi_socket, pi_store_root, spool_dir,
    user_conf_without_include, CACHE_LISTEN, CACHE_URL, SUBSTITUTER_LINE, TUNNEL_STORE,
};
pub use self::tools::daemon_handshake;
pub use self::upload::{create_spool, UploadView};
pub use crate::lab::user::{fragment_path, user_nix_conf};

/// Store paths the scenarios use: what only the Pi has, and one the laptop has on its own.
#[derive(Debug, Clone)]
pub struct NixPaths {
    /// A small file ([`SMALL_TEXT`]).
    pub small: String,
    /// What `reference` refers to.
    pub dep: String,
    pub reference: String,
    /// Another one, for the scenarios that must not fetch the others.
    pub other: String,
    /// Valid in the laptop's store from the start.
    pub local: String,
}

impl Lab {
    pub fn nix_paths(&self) -> &NixPaths {
        self.nix_paths
            .as_ref()
            .expect("the lab has its Nix paths once built")
    }

    /// Fills the Pi's store and starts the laptop's Nix, with `upload_hook` (the built
    /// `reachd-nix-upload`) as its post-build hook; records the paths the scenarios use.
    pub fn start_nix(&mut self, upload_hook: &Path) -> Result<(), String> {
        let mut pi = self.pi_nix_build(&["small", "dep", "ref", "other"], "")?;
        upload::install_hook(upload_hook)?;
        let local = self.start_laptop_nix(&pi::pi_key()?)?;
        let (other, reference, dep, small) =
            (pi.remove(3), pi.remove(2), pi.remove(1), pi.remove(0));
        self.nix_paths = Some(NixPaths {
            small,
            dep,
            reference,
            other,
            local,
        });
        Ok(())
    }
}
