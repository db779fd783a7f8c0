//! The Pi and the café: avahi announcing `rpi.local` in rl-pi (and an impostor in rl-cafe),
//! sshd with the test key and the files sshfs mounts. sshd shares the mount namespace of the
//! Pi's nix-daemon (nix.rs), so the tunnel reaches a store the laptop side cannot see.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab::cleanup::mark;
use crate::lab::network::links;
use crate::lab::nix::daemon_handshake;
use crate::lab::{dir, io_err, Lab, GREETING, T};
use crate::netns::{resolve_once, tc, Avahi, AvahiOptions};
use crate::process::{wait_until, Spawn};

impl Lab {
    pub fn start_pi(&mut self) -> Result<(), String> {
        let pi = dir().join("pi");
        let files = pi.join("files");
        fs::create_dir_all(&files).map_err(|e| io_err("pi dir", e))?;
        fs::write(files.join("greeting.txt"), GREETING).map_err(|e| io_err("pi files", e))?;
        self.start_pi_avahi()?;
        // sshd: host key and the client key the test user will use. It listens on every address
        // of the Pi, as a real Pi's sshd does, so that it still answers once renumbered.
        for key in ["host_key", "client_key"] {
            ssh_keygen(&pi.join(key))?;
        }
        let conf = write_sshd_config(&pi)?;
        // sshd's privilege separation directory.
        if !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").map_err(|e| io_err("/run/sshd", e))?;
            mark("run-sshd", "")?;
        }
        self.start_pi_nix()?;
        // nsenter execs: the PID is sshd's, in the Pi's network and mount namespaces.
        let sshd_bin = crate::lab::preflight::which("sshd").ok_or("sshd not found")?;
        let sshd = self.daemon(
            "sshd",
            Spawn::new("nsenter")
                .arg(format!("--mount={}", self.pi_mount_ns()?.display()))
                .arg("--")
                .arg(sshd_bin)
                .args(["-D", "-e", "-f"])
                .arg(&conf)
                .netns(Lab::netns_path("pi")),
        )?;
        let log = sshd.log().to_path_buf();
        self.sshd = Some(sshd);
        wait_sshd_listening(&log, "sshd on the pi")
    }

    /// (Re)starts the Pi's avahi, announcing `rpi.local`.
    pub fn start_pi_avahi(&mut self) -> Result<(), String> {
        self.start_pi_avahi_with(AvahiOptions::default())
    }

    /// [`Lab::start_pi_avahi`] with options (e.g. on a bus, for `avahi-publish`).
    pub fn start_pi_avahi_with(&mut self, options: AvahiOptions) -> Result<(), String> {
        // One avahi per namespace: stop the one running, if any.
        self.pi_avahi = None;
        let avahi = Avahi::start_with(
            &self.namespaces[2],
            "rpi",
            "pi0",
            &dir().join("pi").join("avahi"),
            AvahiOptions {
                tracker: Some(&self.tracker),
                // A Pi publishes its IPv6 link-local address too (Raspberry Pi OS's default).
                ipv6: true,
                ..options
            },
        )
        .map_err(|e| io_err("avahi on the pi", e))?;
        self.pi_avahi = Some(avahi);
        Ok(())
    }

    pub fn start_cafe(&mut self) -> Result<(), String> {
        let avahi = Avahi::start(
            &self.namespaces[3],
            "rpi",
            "c0",
            &dir().join("cafe"),
            Some(&self.tracker),
        )
        .map_err(|e| io_err("avahi in the café", e))?;
        self.cafe_avahi = Some(avahi);
        Ok(())
    }

    /// The Pi's switch port: down = power loss (no goodbye), up = power back.
    pub fn pi_port(&self, up: bool) -> Result<(), String> {
        self.namespaces[1]
            .ip(&["link", "set", "lan-p", if up { "up" } else { "down" }])
            .map_err(|e| io_err("the pi's switch port", e))
    }

    /// Limits what reaches the Pi through its switch port to `rate` (tc's units, e.g.
    /// "2mbit") until the returned guard is dropped: a copy to the Pi then lasts as long as its
    /// bytes need at that rate, however fast the machine, so that a scenario can act while it
    /// is under way. A token bucket (tbf; this kernel has no netem) with a short queue.
    pub fn pi_inbound_limit(&self, rate: &str) -> Result<InboundLimit, String> {
        let lan = self.namespaces[1].name().to_string();
        let limit = [
            "root", "tbf", "rate", rate, "burst", "16kb", "latency", "50ms",
        ];
        let mut args = vec!["qdisc", "replace", "dev", "lan-p"];
        args.extend(limit);
        tc(&lan, &args).map_err(|e| io_err("limiting the pi's switch port (tc)", e))?;
        Ok(InboundLimit { lan })
    }

    /// Resolves `rpi.local` from the laptop namespace with the lab's own one-shot query.
    pub fn resolve_rpi_from_laptop(&self, via: &str) -> Result<String, String> {
        let via = via.parse().map_err(|e| io_err(via, e))?;
        self.namespaces[0]
            .run_in(|| resolve_once("rpi.local", via, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?
            .map(|a| a.to_string())
            .map_err(|e| io_err(format!("rpi.local from the laptop ({})", links()), e))
    }

    /// The worker protocol's greeting with the Pi's nix-daemon through the ssh tunnel's local
    /// socket; the daemon's protocol version.
    pub fn tunnel_handshake(&self) -> Result<String, String> {
        daemon_handshake(&self.user().runtime_dir().join("rpi-nix-daemon.sock"))
    }
}

/// The Pi's switch port limited by [`Lab::pi_inbound_limit`]; lifted when dropped.
pub struct InboundLimit {
    /// The lan namespace's name.
    lan: String,
}

impl Drop for InboundLimit {
    fn drop(&mut self) {
        let lifted = tc(&self.lan, &["qdisc", "del", "dev", "lan-p", "root"]);
        if let Err(e) = lifted {
            eprintln!("lab: cannot lift the limit on the pi's switch port: {e}");
        }
    }
}

/// A new ed25519 key pair at `path` (and `path`.pub), replacing one left there.
pub(crate) fn ssh_keygen(path: &Path) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    Spawn::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "reachd-lab", "-f"])
        .arg(path)
        .ok(T)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The configuration of a lab sshd listening on `address`:22 with `dir`/host_key, letting in
/// the test user's key (`dir`/authorized_keys, a copy of the Pi's `client_key.pub`), logging
/// every connection. Returns its path.
pub(crate) fn write_sshd_config(dir: &Path) -> Result<PathBuf, String> {
    let client = crate::lab::dir().join("pi/client_key.pub");
    fs::copy(&client, dir.join("authorized_keys")).map_err(|e| io_err(client.display(), e))?;
    let conf = dir.join("sshd_config");
    fs::write(
        &conf,
        format!(
            "ListenAddress 0.0.0.0:22\nHostKey {d}/host_key\nPidFile none\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             AllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\nStrictModes no\n\
             Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
            d = dir.display()
        ),
    )
    .map_err(|e| io_err(conf.display(), e))?;
    Ok(conf)
}

/// Waits until the sshd logging to `log` listens.
pub(crate) fn wait_sshd_listening(log: &Path, what: &str) -> Result<(), String> {
    wait_until(T, what, || {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains("Server listening") {
            Ok(Some(()))
        } else {
            Err(text.trim().to_string())
        }
    })
}
