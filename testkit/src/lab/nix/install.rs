//! Which Nix the lab's laptop runs: the machine's own (Debian 12's nix-bin), or a current one
//! from the chroot tests/current-nix makes (Debian sid's nix-bin), so that every Nix scenario
//! meets both. The Pi keeps the machine's Nix throughout: what the scenarios measure on the
//! laptop (substitution, its deadlines and retries, the post-build hook) is the laptop daemon's
//! and the user's commands' work, and mixed versions talk.
//!
//! The current Nix's laptop daemon runs in a private mount namespace (nothing of it is mounted in
//! the machine's), chrooted, where the chroot's /nix is the lab's laptop store
//! (DIR/laptop-nix/root/nix: the store root that clients outside name in `?root=`), and the
//! lab's directory and /run/user appear at their own paths (the laptop's nix.conf, the user's
//! home, reachd's fragment, the hook, the spool). The user's commands join that namespace and
//! root (nsenter), go home (env -C) and become the user there (setpriv): the chroot's `nix-build` talks to the
//! chroot's daemon, as on a machine with that Nix. reachd's own uploads stay the machine's
//! `nix copy`, a client of whichever daemon runs.
//!
//! Facts (checked here with nix-bin 2.34.8): Nix 2.26 and later cannot build into a chroot store
//! (`local?root=`) without a sandbox, hence the chroot's own /nix; builds need /dev and /proc.

use std::path::{Path, PathBuf};

use super::tools::nix_spawn;
use crate::lab::{dir, io_err, Lab};
use crate::process::Spawn;

/// The variable naming the current Nix's chroot (tests/current-nix reads it too).
pub const CURRENT_NIX_VAR: &str = "REACHD_LAB_CURRENT_NIX";

const CURRENT_NIX_DEFAULT: &str = "/var/lib/reachd-tests/nix-sid";

/// What tests/current-nix writes last, holding nix-bin's version: the chroot is complete.
const CURRENT_NIX_MARK: &str = ".reachd-current-nix";

/// The chroot daemon's mount namespace: the laptop store as /nix, /proc, /dev, the lab's
/// directory and /run/user at their own paths; then the daemon, chrooted, on its /nix.
/// Arguments: the chroot, the lab's directory, the laptop store's nix directory.
const CHROOT_DAEMON: &str = "set -e; R=$1; \
     mkdir -p \"$R/nix\" \"$R$2\" \"$R/run/user\"; \
     mount --bind \"$3\" \"$R/nix\"; mount --bind /proc \"$R/proc\"; mount --rbind /dev \"$R/dev\"; \
     mount --bind \"$2\" \"$R$2\"; mount --rbind /run/user \"$R/run/user\"; \
     exec /usr/sbin/chroot \"$R\" nix-daemon --option store local";

/// The laptop's Nix: where it is and its version.
#[derive(Debug, Clone)]
pub struct LaptopNix {
    /// The chroot it runs in; `None`: the machine's own.
    pub root: Option<PathBuf>,
    /// nix-bin's upstream version ("2.34.8").
    pub version: String,
}

impl LaptopNix {
    /// The machine's own Nix (the package `nix-bin`).
    pub fn machine() -> Result<LaptopNix, String> {
        let out = Spawn::new("dpkg-query")
            .args(["-W", "-f=${Version}", "nix-bin"])
            .ok(crate::lab::T)
            .map_err(|e| io_err("the machine's nix-bin", e))?;
        Ok(LaptopNix {
            root: None,
            version: upstream_version(&out.stdout),
        })
    }

    /// The current Nix, from its chroot; an error saying how to make it when it is not there.
    pub fn current() -> Result<LaptopNix, String> {
        let root = std::env::var_os(CURRENT_NIX_VAR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(CURRENT_NIX_DEFAULT));
        let mark = root.join(CURRENT_NIX_MARK);
        let version = std::fs::read_to_string(&mark).map_err(|e| {
            format!(
                "no current Nix at {} ({}: {e}): run tests/current-nix as root (tests/run does; \
                 it needs debootstrap and the Debian mirror)",
                root.display(),
                mark.display()
            )
        })?;
        Ok(LaptopNix {
            root: Some(root),
            version: upstream_version(&version),
        })
    }

    /// "Nix 2.34.8".
    pub fn label(&self) -> String {
        format!("Nix {}", self.version)
    }

    /// The laptop's nix-daemon with its configuration in `etc` and its home `home`, on the
    /// store below `store_root` (a chroot store for the machine's Nix; for the current one,
    /// the chroot's own /nix, which is `store_root`/nix).
    pub(super) fn daemon(&self, etc: &Path, home: &Path, store_root: &Path) -> Spawn {
        match &self.root {
            None => nix_spawn("nix-daemon", etc, home)
                .args(["--option", "store"])
                .arg(format!("local?root={}", store_root.display())),
            Some(root) => nix_spawn("unshare", etc, home)
                .args(["-m", "sh", "-c", CHROOT_DAEMON, "sh"])
                .args([root.as_path(), dir(), &store_root.join("nix")])
                // The chroot's store keeps its state where a chroot store does.
                .env("NIX_STATE_DIR", "/nix/var/nix"),
        }
    }
}

/// "2.34.8" of a Debian version such as "2.34.8+dfsg-1" or "1:2.8.0-1".
fn upstream_version(debian: &str) -> String {
    let v = debian.trim();
    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
    v.split(['+', '-', '~']).next().unwrap_or(v).to_string()
}

impl Lab {
    /// `args[0]` with `args[1..]` as the user with the laptop's Nix (see [`LaptopNix`]): the
    /// machine's ([`crate::lab::user::TestUser::nix`]), or the current one's inside its chroot.
    pub fn user_nix(&self, args: &[&str]) -> Spawn {
        let user = self.user();
        match (&self.laptop_nix_install.root, &self.laptop_nix) {
            (Some(_), Some(daemon)) => user
                .login_env(Spawn::new("nsenter"))
                .arg(format!("--target={}", daemon.pid()))
                .args(["--mount", "--net", "--root", "--", "env", "-C"])
                // (nsenter's --wd would open the directory outside the chroot: no cwd inside.)
                .arg(&user.home)
                .arg("setpriv")
                .arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .args(["--clear-groups", "--"])
                .args(args)
                .env("NIX_CONF_DIR", super::places::laptop_etc()),
            _ => user.nix(args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::upstream_version;

    #[test]
    fn the_upstream_version_is_what_precedes_the_debian_suffixes() {
        assert_eq!(upstream_version("2.34.8+dfsg-1\n"), "2.34.8");
        assert_eq!(upstream_version("2.8.0-1"), "2.8.0");
        assert_eq!(upstream_version("1:2.26.3-2~bpo12+1"), "2.26.3");
    }
}
