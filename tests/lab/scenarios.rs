//! The scenarios, in the order they run: following the network here; from 12 on, reachd's Nix
//! support (nix.rs); from 17, its uploads (upload.rs); from 21, faults around the agent
//! (reliability.rs); from 26, a dual-stack Pi and an impostor on the home LAN (hostile_lan.rs);
//! 28, the vanish window (vanish.rs); 29, a NixOS-like firewall (firewall.rs);
//! 30 and 32, sleep and malformed mDNS answers (stress.rs); from 35, `reachd doctor`
//! (doctor.rs); 38, the README's status bar example (status_bar.rs); 40, reloading the
//! configuration (reload.rs); 41, the Pi as remote builder (builder.rs); then the Nix ones again with a current Nix (main.rs). Each one
//! starts from the baseline (home up, Pi present, target active) unless it continues the
//! previous one, asserts the units, reachd's own view and real traffic, and returns a short
//! report of what it measured.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use reachd_testkit::lab::expect::{is_mounted, MOUNT, REACHD, TARGET, TUNNEL};
use reachd_testkit::lab::{Lab, CAFE_UUID, HOME_UUID, IMPOSTOR_ADDR, PI_ADDR, T};
use reachd_testkit::process::{wait_until, Spawn};

use crate::{
    builder, doctor, firewall, hostile_lan, nix, reliability, reload, status_bar, stress, upload,
    vanish,
};

pub type Scenario = fn(&mut Lab) -> Result<String, String>;

/// Name, and whether it always runs (the lab's own check and coldplug set the stage).
pub const SCENARIOS: &[(&str, bool, Scenario)] = &[
    ("0-lab-self-check", true, lab_self_check),
    ("1-coldplug", true, coldplug),
    ("2-nm-down-up", false, nm_down_up),
    ("3-pi-power-loss", false, pi_power_loss),
    ("4-pi-back", false, pi_back),
    ("5-avahi-goodbye", false, avahi_goodbye),
    ("6-foreign-network", false, foreign_network),
    ("7-nm-restart", false, nm_restart),
    ("8-flapping", false, flapping),
    ("9-dispatcher-hook", false, dispatcher_hook),
    ("10-agreement", false, agreement),
    ("11-two-networks", false, two_networks),
    ("12-nix-home", false, nix::nix_home),
    ("13-nix-away", false, nix::nix_away),
    ("14-nix-half-dead", false, nix::nix_half_dead),
    ("15-nix-missing", false, nix::nix_missing),
    ("16-nix-fragment-atomic", false, nix::nix_fragment_atomic),
    ("17-nix-upload-away", false, upload::nix_upload_away),
    ("18-nix-upload-no-agent", false, upload::nix_upload_no_agent),
    ("19-nix-upload-crash", false, upload::nix_upload_crash),
    ("20-nix-upload-vanish", false, upload::nix_upload_vanish),
    ("21-two-agents", false, reliability::two_agents),
    ("22-long-uptime", false, reliability::long_uptime),
    ("23-renumbered-pi", false, reliability::renumbered_pi),
    ("24-manager-reexec", false, reliability::manager_reexec),
    (
        "25-restart-keeps-following",
        false,
        reliability::restart_keeps_following,
    ),
    ("26-dual-stack", false, hostile_lan::dual_stack),
    ("27-home-impostor", false, hostile_lan::home_impostor),
    ("28-nix-vanish-window", false, vanish::nix_vanish_window),
    ("29-nixos-firewall", false, firewall::nixos_firewall),
    ("30-sleep", false, stress::sleep),
    ("31-mdns-flood", false, stress::mdns_flood),
    ("32-malformed-answers", false, stress::malformed_answers),
    ("35-doctor-ok", false, doctor::doctor_ok),
    ("36-doctor-broken", false, doctor::doctor_broken),
    ("37-doctor-host-away", false, doctor::doctor_host_away),
    ("38-status-bar", false, status_bar::status_bar),
    ("40-reload", false, reload::reload),
    ("41-nix-builder", false, builder::nix_builder),
];

/// The default bound for noticing a Pi that vanished without a word.
pub const POWER_LOSS_BOUND: Duration = Duration::from_secs(20);
const EVIL_UUID: &str = "3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a03";
const INJECTED: &str = "/tmp/reachd-lab-injected";

pub use reachd_testkit::lab::secs;

/// Home up, café down, Pi powered with avahi, NetworkManager running; waits for the target.
pub fn baseline(lab: &mut Lab) -> Result<(), String> {
    lab.pi_port(true)?;
    if lab.pi_avahi.is_none() {
        lab.start_pi_avahi()?;
    }
    if lab.nm.as_mut().is_none_or(|nm| nm.exited().is_some()) {
        lab.start_nm()?;
    }
    if !lab.connection_state(CAFE_UUID)?.is_empty() {
        lab.nmcli_con("down", CAFE_UUID)?;
    }
    if lab.connection_state(HOME_UUID)? != "activated" {
        lab.nmcli_con("up", HOME_UUID)?;
    }
    lab.expect_up(T, "baseline")
        .map(drop)
        .map_err(|e| format!("baseline (home up, Pi present) not reached: {e}"))
}

/// Checks the lab before reachd runs, so a later failure is reachd's and not the lab's:
/// NetworkManager, nmcli, the dispatcher hook reaching the user's bus, avahi, sshd, the units,
/// the Pi's and the laptop's Nix.
fn lab_self_check(lab: &mut Lab) -> Result<String, String> {
    let state = lab.nm_state()?;
    if !(50..=70).contains(&state) {
        return Err(format!("NetworkManager State {state}, expected 50+"));
    }
    let addr = wait_until(T, "rpi.local answering in the laptop namespace", || {
        lab.resolve_rpi_from_laptop("192.0.2.2").map(Some)
    })?;
    if addr != PI_ADDR {
        return Err(format!("rpi.local resolved to {addr} from the laptop"));
    }
    let stores = nix::self_check_stores(lab)?;
    // nmcli down/up, and the hook runs on those events and reaches the user's session bus (its
    // Refresh call shows in the bus monitor even with no agent to answer it).
    let mark = lab.user().monitor_mark();
    lab.nmcli_con("down", HOME_UUID)?;
    wait_until(T, "NetworkManager below State 50 after `con down`", || {
        let s = lab.nm_state()?;
        Ok((s < 50).then_some(()))
    })?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.wait_home_up()?;
    wait_until(
        T,
        "the dispatcher hook's Refresh call on the session bus",
        || Ok((!refresh_calls(&lab.user().monitor_since(mark)).is_empty()).then_some(())),
    )?;
    // sshd, the tunnel and the mount, with the target started by hand as reachd would.
    let u = lab.user();
    u.systemctl(&["set-environment", &format!("REACHD_RPI_ADDRESS={PI_ADDR}")])?;
    u.systemctl(&["start", TARGET])?;
    wait_until(T, "the target's units active", || {
        let units = u.units(&[TUNNEL, MOUNT])?;
        let active = units
            .values()
            .filter(|p| p["ActiveState"] == "active")
            .count();
        Ok((active == 2).then_some(()))
    })?;
    let tunnel = nix::self_check_tunnel(lab)?;
    lab.expect_mount()?;
    let u = lab.user();
    u.systemctl(&["stop", TARGET])?;
    u.systemctl(&["unset-environment", "REACHD_RPI_ADDRESS"])?;
    let sock = u.runtime_dir().join("rpi-nix-daemon.sock");
    if sock.exists() || is_mounted(&u.home.join("rpi").to_string_lossy()) {
        return Err("stopping the target left the tunnel socket or the mount behind".into());
    }
    Ok(format!(
        "NM State {state}, rpi.local = {addr}, hook, tunnel and mount work; {stores}; {tunnel}"
    ))
}

/// reachd starts by D-Bus activation (as the CLI or a status bar would start it) with the link
/// up and the Pi present, and brings the target up.
fn coldplug(lab: &mut Lab) -> Result<String, String> {
    let started = Instant::now();
    let u = lab.user();
    let ping = u
        .cmd("busctl")
        .args([
            "--user",
            "--timeout=30",
            "call",
            "org.reachd.Reachd1",
            "/org/reachd/Reachd1",
        ])
        .args(["org.freedesktop.DBus.Peer", "Ping"])
        .run(Duration::from_secs(35))
        .map_err(|e| e.to_string())?;
    if !ping.success() {
        let unit = u.units(&[REACHD])?;
        let log = u.reachd_log();
        return Err(format!(
            "D-Bus activation of org.reachd.Reachd1 failed ({}); reachd.service: {:?}; reachd log: {}",
            ping.stderr.trim(),
            unit.get(REACHD),
            tail(&log, 5)
        ));
    }
    // Type=dbus: the unit is active once systemd has seen the name taken, which may come
    // just after reachd answered the ping.
    let p = wait_until(T, "reachd.service active after activation", || {
        let mut props = u.units(&[REACHD])?;
        let p = props.remove(REACHD).ok_or("no reachd.service")?;
        if p["ActiveState"] == "active" {
            Ok(Some(p))
        } else {
            Err(format!("reachd.service is {}", p["ActiveState"]))
        }
    })?;
    // The unit's hardening is in effect (and did not keep it from starting).
    let proc_status =
        fs::read_to_string(format!("/proc/{}/status", p["MainPID"])).unwrap_or_default();
    for want in ["NoNewPrivs:\t1", "Seccomp:\t2"] {
        if !proc_status.lines().any(|l| l == want) {
            return Err(format!(
                "reachd (pid {}) runs without {want:?}",
                p["MainPID"]
            ));
        }
    }
    let took = lab.expect_up(T, "coldplug")?;
    let env = lab.user().manager_env()?;
    if !env
        .lines()
        .any(|l| l == format!("REACHD_RPI_ADDRESS={PI_ADDR}"))
    {
        return Err(format!(
            "REACHD_RPI_ADDRESS not set in the user manager: {env}"
        ));
    }
    lab.expect_tunnel()?;
    lab.expect_mount()?;
    Ok(format!(
        "activated and target up in {} (target after {}); tunnel and mount work",
        secs(started.elapsed()),
        secs(took)
    ))
}

/// `nmcli con down` then `con up` of home from the baseline: the target stops, then starts
/// again with its tunnel and mount working. How long each took.
pub fn down_up(lab: &mut Lab, step: &str) -> Result<(Duration, Duration), String> {
    lab.nmcli_con("down", HOME_UUID)?;
    let down = lab.expect_down(T, &format!("{step}: home down"))?;
    lab.nmcli_con("up", HOME_UUID)?;
    let up = lab.expect_up(T, &format!("{step}: home up"))?;
    lab.expect_tunnel()?;
    lab.expect_mount()?;
    Ok((down, up))
}

fn nm_down_up(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let (down, up) = down_up(lab, "2")?;
    Ok(format!(
        "stopped {} after `con down`, started {} after `con up`",
        secs(down),
        secs(up)
    ))
}

fn pi_power_loss(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.pi_port(false)?;
    let took = lab.expect_down(POWER_LOSS_BOUND, "pi lost power")?;
    // The mount point answers at once: the mount is gone, nothing waits for the dead Pi.
    let mount_point = lab.user().home.join("rpi");
    let ls = lab
        .user()
        .cmd("ls")
        .arg(&mount_point)
        .run(Duration::from_secs(2));
    match ls {
        Ok(o) if o.success() => {}
        Ok(o) => return Err(format!("ls ~/rpi: {} {}", o.status, o.stderr.trim())),
        Err(e) => return Err(format!("ls ~/rpi did not answer within 2 s: {e}")),
    }
    Ok(format!(
        "stopped {} after the power loss; ls ~/rpi answers",
        secs(took)
    ))
}

fn pi_back(lab: &mut Lab) -> Result<String, String> {
    // Continues scenario 3; run alone, it first takes the Pi's power away.
    if lab.user().active_state(TARGET)? == "active" {
        lab.pi_port(false)?;
        lab.expect_down(POWER_LOSS_BOUND, "pi lost power (for 4)")?;
    }
    lab.pi_port(true)?;
    let took = lab.expect_up(T, "pi back")?;
    lab.expect_tunnel()?;
    lab.expect_mount()?;
    Ok(format!("started {} after power came back", secs(took)))
}

fn avahi_goodbye(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    if let Some(mut avahi) = lab.pi_avahi.take() {
        avahi.stop();
    }
    let down = lab.expect_down(T, "pi avahi stopped")?;
    lab.start_pi_avahi()?;
    let up = lab.expect_up(T, "pi avahi restarted")?;
    lab.expect_tunnel()?;
    Ok(format!(
        "stopped {} after the goodbye, started {} after avahi came back",
        secs(down),
        secs(up)
    ))
}

fn foreign_network(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.nmcli_con("down", HOME_UUID)?;
    lab.expect_down(T, "home down (for 6)")?;
    lab.nmcli_con("up", CAFE_UUID)?;
    // The test is only worth something if rpi.local does answer in the café.
    let addr = impostor_answering(lab)?;
    lab.expect_stays_down(Duration::from_secs(8), "in the café")?;
    lab.nmcli_con("down", CAFE_UUID)?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.expect_up(T, "back home")?;
    Ok(format!(
        "rpi.local answered by {addr} in the café; nothing started for 8 s"
    ))
}

/// Waits until `rpi.local` resolves in the café (from the laptop's café address) to the café's
/// impostor; returns its address.
pub fn impostor_answering(lab: &Lab) -> Result<String, String> {
    let addr = wait_until(T, "the café's impostor answering rpi.local", || {
        lab.resolve_rpi_from_laptop("192.0.2.130").map(Some)
    })?;
    if addr != IMPOSTOR_ADDR {
        return Err(format!("in the café rpi.local resolved to {addr}"));
    }
    Ok(addr)
}

/// Home and the café up at once, the café's impostor answering `rpi.local` there: when the Pi
/// loses power, the impostor must not keep the target up (the host is restricted to home, and
/// reachd checks it only through home's addresses).
fn two_networks(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.nmcli_con("up", CAFE_UUID)?;
    // Restarted now, the impostor announces itself on the café link, where reachd's mDNS
    // resolver (told about the new link by NetworkManager's change) hears it.
    if let Some(mut old) = lab.cafe_avahi.take() {
        old.stop();
    }
    lab.start_cafe()?;
    let addr = impostor_answering(lab)?;
    // The impostor also accepts ssh's port, as the config's `port = 22` asks: nothing but the
    // narrowing of the check to home's addresses can tell it from the Pi.
    let _impostor_ssh = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                lab.namespaces[3].enter_current_thread()?;
                std::net::TcpListener::bind(("0.0.0.0", 22))
            })
            .join()
            .map_err(|_| "the café listener's thread panicked".to_string())?
            .map_err(|e| format!("listening on port 22 in the café: {e}"))
    })?;
    lab.expect_up(T, "home and café up, Pi present")?;
    lab.pi_port(false)?;
    let took = lab.expect_down(POWER_LOSS_BOUND, "pi lost power, impostor in the café")?;
    lab.expect_stays_down(Duration::from_secs(5), "impostor in the café")?;
    lab.nmcli_con("down", CAFE_UUID)?;
    lab.pi_port(true)?;
    lab.expect_up(T, "pi back, café down")?;
    Ok(format!(
        "stopped {} after the power loss although {addr} answered rpi.local in the café",
        secs(took)
    ))
}

fn nm_restart(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let before = lab
        .user()
        .units(&[REACHD])?
        .remove(REACHD)
        .ok_or("no reachd.service")?;
    let nm = lab.nm.as_mut().ok_or("NetworkManager not running")?;
    nm.signal_and_wait(libc::SIGKILL, T)
        .map_err(|e| e.to_string())?;
    lab.nm = None;
    // A while without NetworkManager: reachd must neither exit nor guess.
    std::thread::sleep(Duration::from_secs(2));
    let during = lab.user().units(&[REACHD, TARGET])?;
    lab.start_nm()?;
    lab.wait_home_up()?;
    let took = lab.expect_up(T, "NetworkManager restarted")?;
    let after = lab
        .user()
        .units(&[REACHD])?
        .remove(REACHD)
        .ok_or("no reachd.service")?;
    for (label, p) in [
        ("without NetworkManager", &during[REACHD]),
        ("after", &after),
    ] {
        if p["ActiveState"] != "active" || p["MainPID"] != before["MainPID"] {
            return Err(format!(
                "reachd.service {label}: {} pid {} (was pid {})",
                p["ActiveState"], p["MainPID"], before["MainPID"]
            ));
        }
    }
    if after["NRestarts"] != before["NRestarts"] {
        return Err(format!(
            "reachd.service restarted: NRestarts {} -> {}",
            before["NRestarts"], after["NRestarts"]
        ));
    }
    lab.expect_tunnel()?;
    Ok(format!(
        "reachd kept pid {}; target {} without NM, up {} after the restart",
        after["MainPID"],
        during[TARGET]["ActiveState"],
        secs(took)
    ))
}

fn flapping(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let mark = lab.user().monitor_mark();
    let started = Instant::now();
    for _ in 0..30 {
        lab.nmcli_con("down", HOME_UUID)?;
        lab.nmcli_con("up", HOME_UUID)?;
    }
    let cycles = started.elapsed();
    let took = lab.expect_up(T, "after flapping")?;
    lab.expect_tunnel()?;
    let msgs = lab.user().monitor_since(mark);
    let jobs = msgs
        .iter()
        .filter(|m| m["member"] == "JobNew" && m["payload"]["data"][2] == TARGET)
        .count();
    let calls = |method: &str| {
        msgs.iter()
            .filter(|m| m["type"] == "method_call" && m["member"] == method)
            .filter(|m| m["payload"]["data"][0] == TARGET)
            .count()
    };
    Ok(format!(
        "30 cycles in {}, settled {} later; {jobs} jobs for the target ({} StartUnit, {} StopUnit calls)",
        secs(cycles),
        secs(took),
        calls("StartUnit"),
        calls("StopUnit")
    ))
}

/// Refresh calls to reachd seen on the session bus.
fn refresh_calls(msgs: &[Value]) -> Vec<&Value> {
    msgs.iter()
        .filter(|m| {
            m["type"] == "method_call"
                && m["destination"] == "org.reachd.Reachd1"
                && m["member"] == "Refresh"
        })
        .collect()
}

/// How many of the Refresh calls got a successful reply (reachd handled them).
fn answered(msgs: &[Value], calls: &[&Value]) -> usize {
    calls
        .iter()
        .filter(|c| {
            msgs.iter().any(|r| {
                r["type"] == "method_return"
                    && r["destination"] == c["sender"]
                    && r["reply_cookie"] == c["cookie"]
            })
        })
        .count()
}

fn dispatcher_hook(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let meta = fs::metadata(reachd_testkit::lab::HOOK).map_err(|e| e.to_string())?;
    if meta.uid() != 0 || meta.permissions().mode() & 0o7777 != 0o755 {
        return Err(format!(
            "hook installed with uid {} mode {:o}",
            meta.uid(),
            meta.mode()
        ));
    }
    // Real events: the hook makes the running agent refresh (a Refresh call it answers).
    let mark = lab.user().monitor_mark();
    lab.nmcli_con("down", HOME_UUID)?;
    lab.nmcli_con("up", HOME_UUID)?;
    let handled = wait_until(T, "a Refresh from the hook answered by reachd", || {
        let msgs = lab.user().monitor_since(mark);
        let n = answered(&msgs, &refresh_calls(&msgs));
        Ok((n > 0).then_some(n))
    })?;
    lab.expect_up(T, "after the hook's refresh")?;
    // A hostile connection name: nothing of it may reach a shell.
    let _ = fs::remove_file(INJECTED);
    let evil = format!(
        "evil $(touch {INJECTED}) `touch {INJECTED}` 'q' \"dq\" ;touch {INJECTED} \nsecond line"
    );
    Spawn::new("nmcli")
        .args([
            "connection",
            "add",
            "type",
            "ethernet",
            "ifname",
            "lc0",
            "con-name",
            &evil,
        ])
        .args(["connection.uuid", EVIL_UUID, "connection.autoconnect", "no"])
        .args([
            "ipv4.method",
            "manual",
            "ipv4.addresses",
            "192.0.2.131/25",
            "ipv6.method",
            "disabled",
        ])
        .ok(T)
        .map_err(|e| e.to_string())?;
    let mark = lab.user().monitor_mark();
    let result = (|| {
        lab.nmcli_con("up", EVIL_UUID)?;
        lab.nmcli_con("down", EVIL_UUID)?;
        // The hook did run to its end for both events (else "nothing ran" would prove
        // nothing): its Refresh, its last step, was called for each.
        wait_until(
            T,
            "the hook's Refresh for the evil connection's up and down",
            || Ok((refresh_calls(&lab.user().monitor_since(mark)).len() >= 2).then_some(())),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        if Path::new(INJECTED).exists() {
            return Err(format!(
                "{INJECTED} was created: a connection name reached a shell"
            ));
        }
        Ok(())
    })();
    let _ = Spawn::new("nmcli")
        .args(["connection", "delete", "uuid", EVIL_UUID])
        .run(T);
    let _ = fs::remove_file(INJECTED);
    result?;
    lab.expect_up(T, "after the evil connection")?;
    Ok(format!(
        "{handled} refresh(es) answered after down/up; a hostile connection id ran nothing"
    ))
}

fn agreement(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let u = lab.user();
    let hosts = u
        .cmd("busctl")
        .args([
            "--user",
            "--json=short",
            "get-property",
            "org.reachd.Reachd1",
            "/org/reachd/Reachd1",
        ])
        .args(["org.reachd.Reachd1", "Hosts"])
        .ok(T)
        .map_err(|e| e.to_string())?;
    if !hosts.stdout.contains("/org/reachd/Reachd1/host/rpi") {
        return Err(format!("Hosts property: {}", hosts.stdout.trim()));
    }
    if lab.disagreements.is_empty() {
        Ok(format!(
            "{} checks of check/status/D-Bus/units all agreed",
            lab.agreement_checks
        ))
    } else {
        Err(format!(
            "{} of {} checks disagreed: {}",
            lab.disagreements.len(),
            lab.agreement_checks,
            lab.disagreements.join(" | ")
        ))
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
