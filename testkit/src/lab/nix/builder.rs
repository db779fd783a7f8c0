//! The Pi as the laptop's remote builder: root's side of it (the machine line in the laptop's
//! `machines` file, the ssh options of the laptop daemon's build hook) and builds that tell
//! where they ran (the Pi's builds see [`PI_MARKER`], the laptop's do not).
//!
//! The laptop daemon's `builders` is Nix's default, `@<its NIX_CONF_DIR>/machines`, a file
//! read again at every build-hook start: with no such file it has no builder, as in every
//! other scenario. Its ssh runs as root with the options below (`NIX_SSHOPTS` in the daemon's
//! environment, root's choice as on a real machine): the lab user's key and known_hosts, and a
//! connect timeout of one second (docs/remote-builder.md, "Setting it up").

use std::fs;
use std::io::ErrorKind;
use std::time::Duration;

use super::builds::{nonce, Timed};
use super::pi::PI_MARKER;
use super::places::{laptop_etc, laptop_store_root, pi_socket};
use super::tools::write;
use crate::lab::expect::REACHD;
use crate::lab::user::{fragment_path, reachd_config};
use crate::lab::{dir, io_err, Lab, PI_ADDR};
use crate::process::wait_until;

/// The Pi's store URI as root lists it: ssh-ng to root@ the Pi, whose `nix-daemon --stdio`
/// (in the Pi's mount namespace, where sshd runs) passes the builds to the Pi's daemon.
pub fn builder_uri() -> String {
    let socket = format!("unix://{}", pi_socket().display())
        .replace(':', "%3A")
        .replace('/', "%2F");
    format!("ssh-ng://root@{PI_ADDR}?remote-store={socket}")
}

/// The connect timeout root gives the hook's ssh (`ConnectTimeout`): what a build that tries
/// the Pi after it vanished, before reachd noticed, waits at most for it.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Root's machine line for the Pi: its store URI, the laptop's system, the lab user's key (the
/// Pi's sshd lets it in as root), one job at a time.
pub fn pi_machine_line() -> String {
    let key = dir().join("home/.ssh/id_lab");
    format!("{} - {} 1 1 - - -", builder_uri(), key.display())
}

/// The ssh options of the laptop daemon's build hook (no ssh_config of the machine's).
pub fn root_ssh_options() -> String {
    let ssh = dir().join("home/.ssh");
    format!(
        "-F /dev/null -o ConnectTimeout={} -o BatchMode=yes -o IdentitiesOnly=yes \
         -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
        CONNECT_TIMEOUT.as_secs(),
        ssh.join("known_hosts").display()
    )
}

/// reachd's `[host.builder]` for the Pi, to append to the lab's host.
fn builder_table() -> String {
    format!("\n[host.builder]\nuri = \"{}\"\n", builder_uri())
}

/// Where a build ran, from what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltOn {
    Pi,
    Laptop,
}

impl Lab {
    /// Root lists the Pi and reachd's configuration has it as `[host.builder]` (`on`), or
    /// neither (the lab's own set-up); reachd reloads its configuration.
    pub fn use_pi_builder(&self, on: bool) -> Result<(), String> {
        self.list_pi_builder(on)?;
        let config = match on {
            true => format!("{}{}", reachd_config(), builder_table()),
            false => reachd_config(),
        };
        let user = self.user();
        user.write_reachd_config(&config)?;
        user.systemctl(&["reload", REACHD]).map(drop)
    }

    /// Waits until reachd's fragment switches remote builds off (`off`) or leaves them to
    /// root's list.
    pub fn expect_builders_off(&self, off: bool, within: Duration) -> Result<(), String> {
        let path = fragment_path();
        let what = format!(
            "{} {} `builders =`",
            path.display(),
            if off { "with" } else { "without" }
        );
        wait_until(within, &what, || {
            let text = fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let has = text.lines().any(|l| l == "builders =");
            Ok((has == off).then_some(()))
        })
        .map(drop)
    }

    /// Root lists the Pi as the laptop daemon's remote builder (or, `false`, lists none).
    pub fn list_pi_builder(&self, listed: bool) -> Result<(), String> {
        let machines = laptop_etc().join("machines");
        if !listed {
            return match fs::remove_file(&machines) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(machines.display(), e)),
                _ => Ok(()),
            };
        }
        write(&machines, &format!("{}\n", pi_machine_line()))
    }

    /// A build of a new derivation as the user, which records where it ran; `extra` are more
    /// arguments for nix-build (`--builders ''` for a build that never asks a builder). Its
    /// timing, and where it ran (`None` when it failed).
    pub fn build_telling_where(&self, tag: &str, extra: &[&str]) -> (Timed, Option<BuiltOn>) {
        let name = format!("b-{tag}-{}", nonce());
        let script =
            format!("if [ -e {PI_MARKER} ]; then echo pi > $out; else echo laptop > $out; fi");
        let expr = format!(
            "derivation {{ name = \"{name}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"{script}\" ]; preferLocalBuild = false; }}"
        );
        let mut args = vec!["nix-build", "--no-out-link"];
        args.extend(extra);
        args.extend(["-E", &expr]);
        let (timed, path) = self.build_args(&args);
        let built_on = path.and_then(|path| {
            let file = laptop_store_root().join(path.trim_start_matches('/'));
            match fs::read_to_string(file).ok()?.trim() {
                "pi" => Some(BuiltOn::Pi),
                "laptop" => Some(BuiltOn::Laptop),
                _ => None,
            }
        });
        (timed, built_on)
    }
}
