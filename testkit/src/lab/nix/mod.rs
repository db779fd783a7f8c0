//! The lab's Nix, so that reachd's Nix support meets real Nix: a nix-daemon on the Pi whose store
//! exists only in the Pi's own mount namespace (the laptop reaches it only through the ssh
//! tunnel, as across a real LAN), the laptop's nix-daemon inside the laptop's network namespace
//! (where reachd's cache listens on 127.0.0.1), and the lab user's Nix configuration, which
//! includes reachd's fragment as the README tells users to.
//!
//! Modules: pi.rs (the Pi's daemon and store), laptop.rs (the laptop's daemon, the user's
//! configuration, running nix as the user), fragment.rs (reachd's fragment and what reachd says
//! about Nix), upload.rs (the post-build hook, the spool, the laptop's signing key). Where things are:
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

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::lab::{io_err, Lab};
use crate::process::Spawn;

mod fragment;
mod laptop;
mod pi;
mod upload;

pub use fragment::{fragment_path, Fragment};
pub use laptop::{
    laptop_etc, laptop_store_root, old_recipe_conf, user_conf_without_include, user_nix_conf,
    NixRun, TUNNEL_STORE,
};
pub use pi::{pi_socket, pi_store_root, SMALL_TEXT};
pub use upload::{create_spool, hook_path, spool_dir, UploadView};

/// Where reachd serves the Pi's cache, in the laptop's network namespace (its config's
/// `listen`), and the URL Nix uses for it.
pub const CACHE_LISTEN: &str = "127.0.0.1:37515";
pub const CACHE_URL: &str = "http://127.0.0.1:37515";
/// The one line reachd's fragment holds while the Pi's cache can serve.
pub const SUBSTITUTER_LINE: &str = "extra-substituters = http://127.0.0.1:37515";
/// The worker protocol's greeting: the client's magic, then the daemon's.
const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

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

/// `program` (for a root nix command or daemon of the lab) with nothing of the caller's
/// environment but PATH, Nix's configuration in `etc`, and its state and logs below `home`:
/// whatever is not configured explicitly (a daemon's socket, a plain `local` store) must never
/// fall back to the machine's /nix/var.
fn nix_spawn(program: &str, etc: &Path, home: &Path) -> Spawn {
    Spawn::new(program)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", home)
        .env("NIX_CONF_DIR", etc)
        .env("NIX_STATE_DIR", home.join("state"))
        .env("NIX_LOG_DIR", home.join("log"))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| io_err(path.display(), e))
}

/// The worker protocol's greeting with the nix-daemon at `socket`: sends the client's magic,
/// expects the daemon's and returns its protocol version ("1.34").
pub fn daemon_handshake(socket: &Path) -> Result<String, String> {
    let e = |what: &str, err: std::io::Error| io_err(format!("{what} {}", socket.display()), err);
    let mut s = UnixStream::connect(socket).map_err(|err| e("connecting to", err))?;
    let timeout = Some(Duration::from_secs(5));
    s.set_read_timeout(timeout)
        .and_then(|()| s.set_write_timeout(timeout))
        .map_err(|err| e("setting timeouts on", err))?;
    s.write_all(&WORKER_MAGIC_1.to_le_bytes())
        .map_err(|err| e("writing to", err))?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf)
        .map_err(|err| e("reading the nix-daemon's answer from", err))?;
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != WORKER_MAGIC_2 {
        return Err(format!(
            "{} answered {:#x}, not the nix-daemon's magic",
            socket.display(),
            word(0)
        ));
    }
    Ok(format!("{}.{}", word(8) >> 8, word(8) & 0xff))
}
