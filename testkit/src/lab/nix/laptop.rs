//! The laptop's Nix: a nix-daemon in the laptop's network namespace (where reachd's cache
//! listens) that trusts only the Pi's key and the one cache URL reachd serves, the lab user's
//! nix.conf, and nix commands run as that user.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    /// `args[0]` (nix-store, nix-build, nix...) with `args[1..]` as the user, in the laptop's
    /// namespace, with the laptop's system nix.conf and the user's own.
    pub fn nix(&self, args: &[&str]) -> Spawn {
        self.cmd(args[0])
            .args(&args[1..])
            .env("NIX_CONF_DIR", laptop_etc())
    }
}

impl Lab {
    /// A nix command as the lab user (see [`TestUser::nix`]), killed after `timeout`.
    pub fn nix_as_user(&self, args: &[&str], timeout: Duration) -> Result<NixRun, String> {
        NixRun::of(self.user().nix(args), timeout)
    }

    /// Starts the laptop's nix-daemon in the laptop's network namespace (where reachd's cache
    /// listens) and gives its store one path of its own. Trusts the Pi's key, the one cache URL
    /// reachd serves, and no user but root; signs what it builds with laptop-1 and runs the
    /// upload hook after each build, into the lab's spool.
    pub(super) fn start_laptop_nix(&mut self, pi_key: &str) -> Result<String, String> {
        let (etc, home) = (laptop_etc(), laptop_dir().join("home"));
        for d in [&etc, &home, &laptop_store_root(), &stand_in_dir()] {
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
        let daemon = nix_spawn("nix-daemon", &etc, &home)
            .args(["--option", "store"])
            .arg(format!("local?root={}", laptop_store_root().display()))
            .env("NIX_DAEMON_SOCKET_PATH", laptop_socket())
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
}
