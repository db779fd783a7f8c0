//! The laptop's side of the network: the lab's system bus, NetworkManager in rl-laptop with its
//! keyfile connections ("home", "cafe"), the nmcli and D-Bus calls the scenarios use, and the
//! dispatcher hook under test.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab::cleanup::mark;
use crate::lab::on_disk::state;
use crate::lab::{dir, io_err, Lab, CAFE_UUID, HOME_UUID, HOOK, PREFIX, SYSTEM_BUS, T};
use crate::process::{wait_until, Spawn};

impl Lab {
    /// The machine has no system bus (no systemd as PID 1): the lab runs one at the standard
    /// address, which NetworkManager, nmcli, nm-dispatcher and reachd all use unconfigured.
    pub fn start_system_bus(&mut self) -> Result<(), String> {
        if Path::new(SYSTEM_BUS).exists() {
            if UnixStream::connect(SYSTEM_BUS).is_ok() {
                return Err(format!(
                    "a system D-Bus already listens on {SYSTEM_BUS}: the lab needs that address \
                     for a bus of its own (run it on a machine without a system bus)"
                ));
            }
            fs::remove_file(SYSTEM_BUS).map_err(|e| io_err(SYSTEM_BUS, e))?;
        }
        fs::create_dir_all("/run/dbus").map_err(|e| io_err("/run/dbus", e))?;
        let conf = write_system_bus_config()?;
        mark("system-bus", "")?;
        let bus = self.daemon(
            "system-bus",
            Spawn::new("dbus-daemon")
                .arg(format!("--config-file={}", conf.display()))
                .args(["--nofork", "--nopidfile"]),
        )?;
        self.sysbus = Some(bus);
        wait_until(T, "the system bus socket", || {
            Ok(UnixStream::connect(SYSTEM_BUS).ok().map(drop))
        })
    }

    pub fn write_nm_config(&self) -> Result<(), String> {
        let nm = dir().join("nm");
        let keyfiles = nm.join("connections");
        fs::create_dir_all(&keyfiles).map_err(|e| io_err("nm dir", e))?;
        fs::write(
            nm.join("NetworkManager.conf"),
            format!(
                "[main]\ndns=none\nrc-manager=unmanaged\nno-auto-default=*\nplugins=keyfile\n\
                 hostname-mode=none\n\
                 [keyfile]\npath={}\n[device]\nmatch-device=interface-name:lh0;interface-name:lc0\n\
                 managed=1\n[logging]\nlevel=INFO\n",
                keyfiles.display()
            ),
        )
        .map_err(|e| io_err("NetworkManager.conf", e))?;
        // Home has IPv6 link-local, as a laptop has by default (no router advertisements on
        // the LAN: "link-local", not "auto", so NetworkManager does not wait for them).
        let profiles = [
            ("home", HOME_UUID, "lh0", "192.0.2.2/24", true, "link-local"),
            (
                "cafe",
                CAFE_UUID,
                "lc0",
                "192.0.2.130/25",
                false,
                "disabled",
            ),
        ];
        for (id, uuid, iface, addr, auto, ipv6) in profiles {
            let path = keyfiles.join(format!("{id}.nmconnection"));
            fs::write(
                &path,
                format!(
                    "[connection]\nid={id}\nuuid={uuid}\ntype=ethernet\ninterface-name={iface}\n\
                     autoconnect={auto}\n[ipv4]\nmethod=manual\naddress1={addr}\n\
                     [ipv6]\nmethod={ipv6}\n"
                ),
            )
            .map_err(|e| io_err(path.display(), e))?;
            // NetworkManager ignores keyfiles that others can read.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| io_err(path.display(), e))?;
        }
        Ok(())
    }

    /// Starts NetworkManager inside rl-laptop. There is no udev here and NM waits for it
    /// ("platform-init") unless /sys is read-only, hence the private mount namespace with a
    /// read-only /sys; `ip netns exec` first gives it a /sys showing the namespace's links.
    /// NM keeps state in /run/NetworkManager (per-ifindex device files) and
    /// /var/lib/NetworkManager: shared with the machine, a later run's NM would find the earlier
    /// one's device files (ifindexes repeat in fresh namespaces), "assume" the connection and
    /// never set the link up. So both are bind-mounted from the lab's directory (kept across the
    /// restart in scenario 7, like a real restart), and the hostname is private (`-u`).
    pub fn start_nm(&mut self) -> Result<(), String> {
        if !Path::new("/run/NetworkManager").exists() {
            mark("run-nm", "")?;
        }
        let nm_dir = dir().join("nm");
        let (run, lib) = (nm_dir.join("run"), nm_dir.join("lib"));
        for d in [&run, &lib] {
            fs::create_dir_all(d).map_err(|e| io_err(d.display(), e))?;
        }
        let nm = self.daemon(
            "NetworkManager",
            Spawn::new("ip")
                .args(["netns", "exec", &format!("{PREFIX}laptop"), "unshare", "-m", "-u", "sh", "-c"])
                // --debug: stay in the foreground and log to stderr (--no-daemon logs to syslog).
                .arg(
                    "mount -o remount,ro /sys && mkdir -p /run/NetworkManager /var/lib/NetworkManager \
                     && mount --bind \"$2\" /run/NetworkManager \
                     && mount --bind \"$3\" /var/lib/NetworkManager \
                     && exec NetworkManager --debug --config=\"$1\"",
                )
                .arg("sh")
                .args([nm_dir.join("NetworkManager.conf"), run, lib]),
        )?;
        self.nm = Some(nm);
        Ok(())
    }

    /// NetworkManager's global State (50/60 = connected on a LAN without internet; never 70).
    pub fn nm_state(&self) -> Result<u32, String> {
        let out = Spawn::new("busctl")
            .args([
                "--system",
                "--json=short",
                "get-property",
                "org.freedesktop.NetworkManager",
                "/org/freedesktop/NetworkManager",
                "org.freedesktop.NetworkManager",
                "State",
            ])
            .ok(T)
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).map_err(|e| io_err("NM State", e))?;
        v["data"]
            .as_u64()
            .map(|s| s as u32)
            .ok_or_else(|| format!("NM State: {v}"))
    }

    /// "activated", "deactivating"... or "" when the connection is not active.
    pub fn connection_state(&self, uuid: &str) -> Result<String, String> {
        let out = Spawn::new("nmcli")
            .args(["-g", "GENERAL.STATE", "connection", "show", "uuid", uuid])
            .ok(T)
            .map_err(|e| e.to_string())?;
        Ok(out.stdout.trim().to_string())
    }

    pub fn wait_home_up(&self) -> Result<(), String> {
        wait_until(
            T,
            "NetworkManager State 50+ with \"home\" activated",
            || {
                let state = self.nm_state()?;
                let home = self.connection_state(HOME_UUID)?;
                if state >= 50 && home == "activated" {
                    Ok(Some(()))
                } else {
                    Err(format!("State {state}, home {home:?}"))
                }
            },
        )
    }

    /// `nmcli connection up|down uuid UUID`.
    pub fn nmcli_con(&self, verb: &str, uuid: &str) -> Result<(), String> {
        Spawn::new("nmcli")
            .args(["--wait", "20", "connection", verb, "uuid", uuid])
            .ok(Duration::from_secs(25))
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Debian's system bus configuration with three changes: it stays root (so activation needs no
/// setuid helper), its includes are absolute, and it can activate only nm-dispatcher. With the
/// standard service directories NetworkManager's start activates ModemManager and polkit too,
/// system daemons the lab has no use for. Policies (system.d) are the machine's own.
fn write_system_bus_config() -> Result<PathBuf, String> {
    let base = "/usr/share/dbus-1/system.conf";
    let text = fs::read_to_string(base).map_err(|e| io_err(base, e))?;
    let services = dir().join("dbus/services");
    fs::create_dir_all(&services).map_err(|e| io_err("dbus dir", e))?;
    let dispatcher = "org.freedesktop.nm_dispatcher.service";
    let src = Path::new("/usr/share/dbus-1/system-services").join(dispatcher);
    fs::copy(&src, services.join(dispatcher)).map_err(|e| io_err(src.display(), e))?;
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("<user>") || t.starts_with("<servicehelper>") {
            continue;
        }
        if t == "<standard_system_servicedirs/>" {
            out.push_str(&format!(
                "  <servicedir>{}</servicedir>\n",
                services.display()
            ));
        } else if t == "<includedir>system.d</includedir>" {
            out.push_str("  <includedir>/usr/share/dbus-1/system.d</includedir>\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let conf = dir().join("dbus/system.conf");
    fs::write(&conf, out).map_err(|e| io_err(conf.display(), e))?;
    Ok(conf)
}

/// Installs dispatcher/90-reachd as nm-dispatcher wants it: root-owned, 0755, not writable by
/// others (it silently skips other files). A file already there is kept aside and put back.
pub fn install_hook() -> Result<(), String> {
    let src = crate::repo().join("dispatcher/90-reachd");
    let hook = Path::new(HOOK);
    if hook.exists() {
        let backup = state("hook.orig");
        fs::copy(hook, &backup).map_err(|e| io_err(HOOK, e))?;
        mark("hook-backup", "")?;
    }
    mark("hook", "")?;
    let text = fs::read(&src).map_err(|e| io_err(src.display(), e))?;
    write_dispatcher_script(hook, &text)
}

/// Writes a dispatcher script as nm-dispatcher wants it: root-owned, 0755.
pub fn write_dispatcher_script(path: &Path, text: &[u8]) -> Result<(), String> {
    let e = |e| io_err(format!("installing {}", path.display()), e);
    fs::write(path, text).map_err(e)?;
    chown(path, Some(0), Some(0)).map_err(e)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(e)
}

/// The laptop's addresses and the switch's links, for error messages.
pub fn links() -> String {
    let show = |ns: &str, what: &str| {
        Spawn::new("ip")
            .args(["-n", &format!("{PREFIX}{ns}"), "-br", what])
            .run(T)
            .map(|o| o.stdout.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    format!(
        "laptop: {}; lan: {}",
        show("laptop", "addr"),
        show("lan", "link")
    )
}
