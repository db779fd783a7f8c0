//! What the benchmark adds to the lab: the dispatcher script reachd replaces, with the
//! laptop-side avahi its `getent` needs; reachd's unit started and stopped with the embedded
//! default or a list of hosts; and extra host names published on the Pi's side.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::lab::cleanup::{mark, marked, remove_old_way, RUN_AVAHI};
use crate::lab::network::write_dispatcher_script;
use crate::lab::user::{TestUser, UID, USER};
use crate::lab::{dir, io_err, Lab, OLD_SCRIPT, PI_ADDR, T};
use crate::netns::{Avahi, AvahiOptions};
use crate::process::{wait_until, Daemon, Spawn};

pub const TARGET: &str = "rpi-accessible.target";
const REACHD: &str = "reachd.service";

/// The seed's script as users have it: on every NetworkManager event, ask nss-mdns whether the Pi
/// is there, then start or stop the user's target.
fn old_script() -> String {
    format!(
        "#!/bin/sh\n\
         # {OLD_SCRIPT}: keeps the user's {TARGET} started while rpi.local resolves.\n\
         # (The NetworkManager dispatcher script reachd replaces; installed by reachd's bench.)\n\
         PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         if getent ahosts rpi.local >/dev/null 2>&1; then verb=start; else verb=stop; fi\n\
         exec runuser -u {USER} -- env XDG_RUNTIME_DIR=/run/user/{UID} \\\n    \
         DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{UID}/bus \\\n    \
         systemctl --user --no-block \"$verb\" {TARGET}\n"
    )
}

/// The old way, installed. Dropping it stops the laptop's avahi and removes the script (and
/// /run/avahi-daemon if the bench created it); the lab's teardown does the same from markers.
pub struct OldWay {
    avahi: Option<Avahi>,
}

impl Drop for OldWay {
    fn drop(&mut self) {
        if let Some(mut avahi) = self.avahi.take() {
            avahi.stop();
        }
        remove_old_way();
    }
}

impl Lab {
    /// Installs the dispatcher script (refusing to replace a file it did not write) and starts
    /// an avahi in the laptop's namespace whose socket is the machine's
    /// /run/avahi-daemon/socket, so that `getent ahosts rpi.local` in the root namespace (where
    /// nm-dispatcher runs the script) asks the lab's network, through nss-mdns.
    pub fn install_old_way(&self) -> Result<OldWay, String> {
        if Path::new(OLD_SCRIPT).exists() && marked("old-script").is_none() {
            return Err(format!(
                "{OLD_SCRIPT} exists and was not written by the bench: move it away first"
            ));
        }
        mark("old-script", "")?;
        let mut way = OldWay { avahi: None };
        write_dispatcher_script(Path::new(OLD_SCRIPT), old_script().as_bytes())?;
        if UnixStream::connect(Path::new(RUN_AVAHI).join("socket")).is_ok() {
            return Err(format!(
                "an avahi-daemon already serves {RUN_AVAHI}/socket on this machine: the bench \
                 needs that socket for the laptop's avahi (stop that daemon first)"
            ));
        }
        if !Path::new(RUN_AVAHI).exists() {
            mark("run-avahi", "")?;
        }
        let options = AvahiOptions {
            machine_run: true,
            ..AvahiOptions::default()
        };
        let laptop = &self.namespaces[0];
        let avahi_dir = dir().join("laptop-avahi");
        way.avahi = Some(
            Avahi::start_with(
                laptop,
                "laptop",
                "lh0",
                &avahi_dir,
                AvahiOptions {
                    tracker: Some(&self.tracker),
                    ..options
                },
            )
            .map_err(|e| io_err("avahi in the laptop's namespace", e))?,
        );
        wait_until(
            T,
            "`getent ahosts rpi.local` answering through nss-mdns",
            || {
                let out = Spawn::new("getent")
                    .args(["ahosts", "rpi.local"])
                    .run(T)
                    .map_err(|e| e.to_string())?;
                Ok(out.stdout.contains(PI_ADDR).then_some(()))
            },
        )?;
        Ok(way)
    }
}

impl TestUser {
    /// Hangs nothing off rpi-accessible.target (the lab enables the tunnel and the mount): the
    /// bench times deciding and starting the target, not ssh and sshfs.
    pub fn bare_target(&self) -> Result<(), String> {
        self.systemctl(&["disable", "rpi-nix-tunnel.service", "rpi-mount.service"])
            .map(drop)
    }

    /// Configures reachd as a user without `--config` has it: with `hosts`, a config file
    /// listing `NAME` -> `NAME.local` with default settings (and a `NAME-accessible.target`
    /// for each); without, no file, so the embedded default (rpi). Takes effect at the next
    /// start.
    pub fn configure_reachd(&self, hosts: Option<&[String]>) -> Result<(), String> {
        self.write_reachd_dropin("run")?;
        let config = self.home.join(".config/reachd/config.toml");
        match hosts {
            None => {
                let _ = fs::remove_file(&config);
            }
            Some(hosts) => {
                let mut text = String::new();
                for name in hosts {
                    text.push_str(&format!(
                        "[[host]]\nname = \"{name}\"\nhostname = \"{name}.local\"\n"
                    ));
                    let unit = self.unit_path(&format!("{name}-accessible.target"));
                    write(
                        &unit,
                        format!("[Unit]\nDescription={name}.local is reachable\n"),
                    )?;
                }
                write(&config, text)?;
            }
        }
        self.systemctl(&["daemon-reload"]).map(drop)
    }

    /// Configures reachd as the lab has it (the Pi with its cache and uploads, from
    /// `--config`), after [`TestUser::configure_reachd`] changed it. Takes effect at the next
    /// start.
    pub fn configure_reachd_lab(&self) -> Result<(), String> {
        self.write_reachd_dropin("run --config %h/.config/reachd/config.toml")?;
        let config = self.home.join(".config/reachd/config.toml");
        write(&config, crate::lab::user::reachd_config())?;
        self.systemctl(&["daemon-reload"]).map(drop)
    }

    fn unit_path(&self, unit: &str) -> PathBuf {
        self.home.join(".config/systemd/user").join(unit)
    }

    /// Starts reachd's unit (Type=dbus: it returns once reachd is on the bus); its PID.
    pub fn start_reachd(&self) -> Result<u32, String> {
        self.systemctl(&["start", REACHD])?;
        let units = self.units(&[REACHD])?;
        units
            .get(REACHD)
            .and_then(|p| p.get("MainPID"))
            .and_then(|p| p.parse().ok())
            .filter(|&pid| pid > 0)
            .ok_or_else(|| format!("no MainPID for {REACHD}: {units:?}"))
    }

    pub fn stop_reachd(&self) -> Result<(), String> {
        self.systemctl(&["stop", REACHD]).map(drop)
    }
}

fn write(path: &Path, text: String) -> Result<(), String> {
    fs::create_dir_all(path.parent().expect("has a parent"))
        .map_err(|e| io_err(path.display(), e))?;
    fs::write(path, text).map_err(|e| io_err(path.display(), e))
}

/// Extra names the Pi publishes at its own address (`NAME.local` -> the Pi), as other hosts on
/// the LAN. avahi's static hosts file cannot do it: each entry also publishes a reverse record,
/// which collides with the Pi's own. So the Pi's avahi is restarted on a bus of its own, and one
/// `avahi-publish -a -R` (no reverse record) per name keeps each name published.
#[derive(Default)]
pub struct PiNames {
    bus: Option<Daemon>,
    publishers: Vec<Daemon>,
}

impl PiNames {
    /// Makes the Pi publish the first `names.len()` names (more are added to those published).
    pub fn publish(&mut self, lab: &mut Lab, names: &[String]) -> Result<(), String> {
        let socket = dir().join("pi/bus");
        if self.bus.is_none() {
            let conf = dir().join("pi/bus.conf");
            write(
                &conf,
                format!(
                    "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
                     \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                     <busconfig><type>system</type><listen>unix:path={}</listen>\
                     <auth>EXTERNAL</auth><policy context=\"default\">\
                     <allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/>\
                     <allow own=\"*\"/></policy></busconfig>\n",
                    socket.display()
                ),
            )?;
            let bus = Spawn::new("dbus-daemon")
                .arg(format!("--config-file={}", conf.display()))
                .args(["--nofork", "--nopidfile"]);
            self.bus = Some(lab.daemon("pi-bus", bus)?);
            wait_until(T, "the Pi's bus", || {
                Ok(UnixStream::connect(&socket).ok().map(drop))
            })?;
            lab.start_pi_avahi_with(AvahiOptions {
                bus: Some(&socket),
                ..AvahiOptions::default()
            })?;
        }
        let address = format!("unix:path={}", socket.display());
        for name in names.iter().skip(self.publishers.len()) {
            let publish = Spawn::new("avahi-publish")
                .args(["-a", "-R", &format!("{name}.local"), PI_ADDR])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &address);
            self.publishers
                .push(lab.daemon(&format!("publish-{name}"), publish)?);
        }
        for p in &self.publishers {
            wait_until(T, &format!("{} established", p.name()), || {
                let text = fs::read_to_string(p.log()).unwrap_or_default();
                if text.contains("Established") {
                    Ok(Some(()))
                } else {
                    Err(text.trim().to_string())
                }
            })?;
        }
        Ok(())
    }
}
