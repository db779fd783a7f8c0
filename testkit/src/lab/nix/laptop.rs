//! The laptop's Nix: a nix-daemon in the laptop's network namespace (where reachd's cache
//! listens) that trusts only the Pi's key and the one cache URL reachd serves, the lab user's
//! nix.conf, and nix commands run as that user.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::install::LaptopNix;
use super::places::{
    hook_path, laptop_dir, laptop_etc, laptop_socket, laptop_store_root, spool_dir, stand_in_dir,
    stand_in_url, user_conf_without_include, CACHE_URL, SPOOL_VAR, TUNNEL_STORE,
};
use super::tools::{daemon_handshake, nix_spawn, write};
use super::upload::laptop_key;
use crate::lab::user::{user_nix_conf, TestUser};
use crate::lab::{io_err, Lab, T};
use crate::process::{wait_until, Spawn};

/// The old recipe's user nix.conf (for NIX_USER_CONF_FILES): the tunnel's socket as an extra
/// substituter, which the laptop's daemon lists in `trusted-substituters` as the recipe said.
pub fn old_recipe_conf() -> Result<PathBuf, String> {
    let path = laptop_dir().join("user-old-recipe.conf");
    let text = format!(
        "{}# The old recipe.\nextra-substituters = {TUNNEL_STORE}\n",
        user_nix_conf(false)
    );
    write(&path, &text)?;
    Ok(path)
}

/// One command's outcome, with how long it took.
#[derive(Debug)]
pub struct NixRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl NixRun {
    /// Runs `spawn`, killing it after `timeout` (an error saying so).
    pub fn of(spawn: Spawn, timeout: Duration) -> Result<NixRun, String> {
        let start = Instant::now();
        let out = spawn.run(timeout).map_err(|e| e.to_string())?;
        Ok(NixRun {
            code: out.code(),
            stdout: out.stdout,
            stderr: out.stderr,
            elapsed: start.elapsed(),
        })
    }

    /// "exit N after T s: <last stderr line>", for reports.
    pub fn summary(&self) -> String {
        format!(
            "exit {} after {:.2} s: {}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.stderr.trim().lines().last().unwrap_or("(no stderr)")
        )
    }
}

impl TestUser {
    /// `args[0]` (nix-store, nix-build, nix..., or reachd) with `args[1..]` as the user, in the
    /// laptop's namespace, with the laptop's system nix.conf and the user's own: the machine's
    /// programs (for the laptop's Nix, which may be another, [`Lab::user_nix`]).
    pub fn nix(&self, args: &[&str]) -> Spawn {
        self.cmd(args[0])
            .args(&args[1..])
            .env("NIX_CONF_DIR", laptop_etc())
    }
}

impl Lab {
    /// A nix command as the lab user with the laptop's Nix (see [`Lab::user_nix`]), killed
    /// after `timeout`.
    pub fn nix_as_user(&self, args: &[&str], timeout: Duration) -> Result<NixRun, String> {
        NixRun::of(self.user_nix(args), timeout)
    }

    /// Writes the laptop's Nix configuration, then starts its nix-daemon
    /// ([`Lab::run_laptop_nix`]). Trusts the Pi's key, the one cache URL reachd serves, and no
    /// user but root; signs what it builds with laptop-1 and runs the upload hook after each
    /// build, into the lab's spool.
    pub(super) fn start_laptop_nix(&mut self, pi_key: &str) -> Result<String, String> {
        let etc = laptop_etc();
        for d in [&etc, &stand_in_dir()] {
            fs::create_dir_all(d).map_err(|e| io_err(d.display(), e))?;
        }
        write(
            &stand_in_dir().join("nix-cache-info"),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
        )?;
        let (laptop_sec, _) = laptop_key()?;
        write(
            &etc.join("nix.conf"),
            &format!(
                "# The lab laptop's /etc/nix/nix.conf: no cache but the one reachd serves for the Pi\n\
                 # (and, for the bench, the tunnel's socket as the old recipe had it; for the\n\
                 # vanish window, an empty second cache).\n\
                 trusted-substituters = {CACHE_URL} {TUNNEL_STORE} {}\n\
                 trusted-public-keys = {pi_key}\n\
                 require-sigs = true\nsubstituters =\nsandbox = false\nbuild-users-group =\n\
                 experimental-features = nix-command\nextra-sandbox-paths = /bin /usr /lib /lib64\n\
                 # Uploads: builds signed by laptop-1, recorded by reachd's hook.\n\
                 secret-key-files = {}\npost-build-hook = {}\n",
                stand_in_url(),
                laptop_sec.display(),
                hook_path().display()
            ),
        )?;
        write(&user_conf_without_include(), &user_nix_conf(false))?;
        self.run_laptop_nix()
    }

    /// Starts the laptop's nix-daemon ([`Lab::laptop_nix_install`]'s) in the laptop's network
    /// namespace (where reachd's cache listens) on an empty store, and gives the store one path
    /// of its own, which it returns.
    fn run_laptop_nix(&mut self) -> Result<String, String> {
        let (etc, home) = (laptop_etc(), laptop_dir().join("home"));
        let store = laptop_store_root();
        // An earlier Nix's store, files read-only: only root's override removes them.
        if store.exists() {
            fs::remove_dir_all(&store).map_err(|e| io_err(store.display(), e))?;
        }
        for d in [&home, &store.join("nix")] {
            fs::create_dir_all(d).map_err(|e| io_err(d.display(), e))?;
        }
        let daemon = self
            .laptop_nix_install
            .daemon(&etc, &home, &store)
            .env("NIX_DAEMON_SOCKET_PATH", laptop_socket())
            .env("NIX_SSHOPTS", super::builder::root_ssh_options())
            .env(SPOOL_VAR, spool_dir())
            .netns(Lab::netns_path("laptop"));
        self.laptop_nix = Some(self.daemon("laptop-nix-daemon", daemon)?);
        wait_until(T, "the laptop's nix-daemon", || {
            daemon_handshake(&laptop_socket()).map(Some)
        })?;
        let file = laptop_dir().join("laptop-only");
        write(&file, "only on the laptop\n")?;
        let out = nix_spawn("nix-store", &etc, &home)
            .arg("--store")
            .arg(format!("unix://{}", laptop_socket().display()))
            .arg("--add")
            .arg(&file)
            .ok(T)
            .map_err(|e| io_err("adding the laptop's own path", e))?;
        Ok(out.stdout.trim().to_string())
    }

    /// From now on the laptop runs `install`'s Nix: its daemon replaces the running one, on an
    /// empty store that gets its own path again ([`crate::lab::nix::NixPaths::local`]). The
    /// Pi, reachd and the spool stay as they are.
    pub fn use_laptop_nix(&mut self, install: LaptopNix) -> Result<(), String> {
        if let Some(mut old) = self.laptop_nix.take() {
            old.stop();
        }
        self.laptop_nix_install = install;
        let local = self.run_laptop_nix()?;
        // The user's commands are that Nix's too.
        let version = self.nix_as_user(&["nix", "--version"], T)?;
        let wanted = &self.laptop_nix_install.version;
        if version.code != 0 || !version.stdout.trim().ends_with(wanted.as_str()) {
            return Err(format!(
                "the user's `nix --version` is not {wanted}: {:?}, {}",
                version.stdout.trim(),
                version.summary()
            ));
        }
        if let Some(paths) = self.nix_paths.as_mut() {
            paths.local = local;
        }
        Ok(())
    }
}
