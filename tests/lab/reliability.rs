//! Issue 10's faults in the real lab: a second agent in the session, coming home after a long
//! uptime, the Pi renumbered while reachable, the user manager re-executed and reloaded under a
//! running agent, and a restarted agent still following a move. The bus tests prove the same
//! decisions with fakes; these prove their effects on real units, tunnels and mounts.

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use reachd_testkit::lab::expect::{MOUNT, REACHD, TARGET, TUNNEL};
use reachd_testkit::lab::{dir, Lab, HOME_UUID, PI_ADDR, T};
use reachd_testkit::process::{wait_until, Spawn};

use crate::scenarios::{baseline, down_up, secs};

/// Where scenarios 23 and 25 renumber the Pi, and the extra address of 23's control.
const RENUMBERED_ADDR: &str = "192.0.2.11";
const SECOND_ADDR: &str = "192.0.2.12";
/// Issue 10: the tunnel carries bytes and ~/rpi reads again this long after the renumbering.
const MOVE_BOUND: Duration = Duration::from_secs(10);
/// Coming home to a Pi that is already up: the target is active this long after `con up`.
const HOME_BOUND: Duration = Duration::from_secs(2);
/// A second agent gives up at once; the bound leaves room for a loaded machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(5);
/// `con down/up` after the manager was re-executed or reloaded: stopped and started within
/// this (tens of milliseconds normally; a lost job or unit signal would wait forever).
const FOLLOW_BOUND: Duration = Duration::from_secs(5);
/// The control watches this long that nothing restarts: more than two checks (every 3 s).
const CONTROL_HOLD: Duration = Duration::from_secs(8);
/// Scenario 22: at home with the Pi away, then away from home. mdns-sd repeats a question at
/// 0, 1, 3, 7, 15, 31, 63 s... after it was first asked, so coming home 45 s or more after the
/// agent started falls between two repeats at least 15 s apart (after an hour, up to an hour).
const HOME_WITHOUT_PI: Duration = Duration::from_secs(10);
const AWAY: Duration = Duration::from_secs(35);
/// How long scenario 22 waits for the target at all, so that a failure says when it came:
/// beyond mdns-sd's next repeat.
const HOME_MEASURED: Duration = Duration::from_secs(60);

/// One unit's properties, as `TestUser::units` reads them (`MainPID`, `ActiveState`...).
fn unit(lab: &Lab, name: &str) -> Result<HashMap<String, String>, String> {
    lab.user()
        .units(&[name])?
        .remove(name)
        .ok_or_else(|| format!("no {name}"))
}

/// reachd.service still the same process, active and never restarted since `before`.
fn same_agent(lab: &Lab, before: &HashMap<String, String>, when: &str) -> Result<(), String> {
    let now = unit(lab, REACHD)?;
    for key in ["ActiveState", "MainPID", "NRestarts"] {
        if now.get(key) != before.get(key) {
            return Err(format!(
                "reachd.service {when}: {key} {:?}, was {:?}",
                now.get(key),
                before.get(key)
            ));
        }
    }
    Ok(())
}

/// The pid of the process that owns `org.reachd.Reachd1` on the user's session bus.
fn bus_name_owner(lab: &Lab) -> Result<String, String> {
    let out = lab
        .user()
        .cmd("busctl")
        .args([
            "--user",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
        ])
        .args(["org.freedesktop.DBus", "GetConnectionUnixProcessID"])
        .args(["s", "org.reachd.Reachd1"])
        .ok(T)
        .map_err(|e| e.to_string())?;
    // "u 1234"
    out.stdout
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("GetConnectionUnixProcessID answered {:?}", out.stdout))
}

/// Issue 10 item 1: a second `reachd run` in the session of the running service (a user trying
/// it in a terminal, with the same configuration) refuses at once, naming the running agent's
/// pid, and exits non-zero; the service keeps the bus name (its process owns it, unrestarted)
/// and still drives the target: a `con down/up` afterwards stops and starts it.
pub fn two_agents(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let before = unit(lab, REACHD)?;
    let pid = before.get("MainPID").cloned().unwrap_or_default();
    let started = Instant::now();
    let second = lab
        .user()
        .cmd(&dir().join("bin/reachd").to_string_lossy())
        .arg("run")
        .run(Duration::from_secs(15))
        .map_err(|e| format!("the second `reachd run`: {e}"))?;
    let took = started.elapsed();
    // Its one error line (the log lines before it carry timestamps).
    let said = second
        .stderr
        .lines()
        .find(|l| l.contains("already running"))
        .map_or(second.stderr.trim(), |l| {
            l.split_once("ERROR ").map_or(l, |(_, message)| message)
        });
    if second.success() || took > REFUSAL_BOUND {
        return Err(format!(
            "the second `reachd run` exited {} after {}: {said}",
            second.status,
            secs(took)
        ));
    }
    if !said.contains(&format!("pid {pid}")) {
        return Err(format!(
            "the second `reachd run` does not name the running agent (pid {pid}): {said}"
        ));
    }
    let owner = bus_name_owner(lab)?;
    if owner != pid {
        return Err(format!(
            "org.reachd.Reachd1 is owned by pid {owner}, not the service's pid {pid}"
        ));
    }
    same_agent(lab, &before, "after the second agent")?;
    let (down, up) = down_up(lab, "21")?;
    same_agent(lab, &before, "after con down/up")?;
    Ok(format!(
        "refused in {} ({said:?}); pid {pid} kept the name, then stopped the target {} after \
         `con down` and started it {} after `con up`",
        secs(took),
        secs(down),
        secs(up)
    ))
}

/// Issue 10 item 3: coming home after a long uptime. reachd runs at home with the Pi away (it
/// is restarted then, so that, like an agent started away from home, it knows no address to
/// check directly: only mDNS can find the Pi), the laptop leaves (its connection down and its
/// link cut, as out of a Wi-Fi's range: nothing of the home LAN reaches it), the Pi comes up and
/// announces itself while the laptop is away (unheard), and the laptop comes back 35 s after it
/// left. By then mdns-sd's own repeats of the question (at 0, 1, 3, 7, 15, 31, 63 s... after it
/// was first asked) are 16 s or more apart: left to them, the Pi would be found at the next one,
/// seconds later (after a long uptime, up to an hour). The target must be active within 2 s of
/// `con up`: reachd asks the question again at once on the network change.
pub fn long_uptime(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let result = away_while_the_pi_comes_up(lab);
    // Whatever happened, the laptop is back in range for the next scenario.
    let in_range = laptop_in_range(lab, true);
    let report = result?;
    in_range?;
    lab.expect_up(T, "22: home again")?;
    lab.expect_tunnel()?;
    Ok(report)
}

/// Scenario 22 from the baseline to the target active again.
fn away_while_the_pi_comes_up(lab: &mut Lab) -> Result<String, String> {
    // The Pi shuts down cleanly: its goodbye empties mdns-sd's cache.
    if let Some(mut avahi) = lab.pi_avahi.take() {
        avahi.stop();
    }
    lab.expect_down(T, "22: the Pi gone")?;
    let old_pid = unit(lab, REACHD)?.get("MainPID").cloned();
    lab.user().systemctl(&["restart", REACHD])?;
    wait_until(T, "the restarted reachd saying unreachable", || {
        let now = unit(lab, REACHD)?;
        if now.get("MainPID") == old_pid.as_ref()
            || now.get("ActiveState").map(String::as_str) != Some("active")
        {
            return Err(format!("reachd.service {now:?}"));
        }
        let s = lab.user().status()?;
        Ok((s.state == "unreachable").then_some(()))
    })?;
    std::thread::sleep(HOME_WITHOUT_PI);
    lab.nmcli_con("down", HOME_UUID)?;
    laptop_in_range(lab, false)?;
    let left = Instant::now();
    lab.expect_down(T, "22: laptop away")?;
    lab.start_pi_avahi()?;
    let announced = left.elapsed();
    std::thread::sleep(AWAY.saturating_sub(left.elapsed()));
    laptop_in_range(lab, true)?;
    wait_until(T, "NetworkManager seeing the laptop's link again", || {
        let out = Spawn::new("nmcli")
            .args(["-g", "GENERAL.STATE", "device", "show", "lh0"])
            .ok(T)
            .map_err(|e| e.to_string())?;
        let state = out.stdout.trim().to_string();
        if state.starts_with("30") {
            Ok(Some(()))
        } else {
            Err(format!("lh0: {state}"))
        }
    })?;
    let came_back = Instant::now();
    lab.nmcli_con("up", HOME_UUID)?;
    let took = wait_until(HOME_MEASURED, "the target active after coming home", || {
        let state = lab.user().active_state(TARGET)?;
        Ok((state == "active").then(|| came_back.elapsed()))
    })?;
    if took > HOME_BOUND {
        return Err(format!(
            "the target became active {} after `con up` (bound {})",
            secs(took),
            secs(HOME_BOUND)
        ));
    }
    Ok(format!(
        "Pi announced {} after leaving, laptop back {} after leaving: target active {} after \
         `con up`",
        secs(announced),
        secs(AWAY),
        secs(took)
    ))
}

/// The laptop's port on the home switch: down is the laptop out of the home LAN's range.
fn laptop_in_range(lab: &Lab, up: bool) -> Result<(), String> {
    lab.namespaces[1]
        .ip(&["link", "set", "lan-l", if up { "up" } else { "down" }])
        .map_err(|e| format!("the laptop's switch port: {e}"))
}

/// Issue 10 item 2: the Pi renumbered while reachable. First the control: a second address
/// announced while the first still answers restarts nothing (the tunnel and mount keep their
/// processes, reachd its address). Then the renumbering (new address added and announced, the
/// old one removed, as with a new DHCP lease): within 10 s the tunnel is a new process on the
/// new address whose socket reaches the Pi's nix-daemon, and ~/rpi reads the Pi's file again.
/// The Pi is then moved back to its address (followed the same way) and left there.
pub fn renumbered_pi(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let report = restoring_pi_address(lab, |lab| {
        let control = second_address_restarts_nothing(lab)?;
        let moves = renumber_and_back(lab)?;
        Ok(format!("{control}; {moves}"))
    })?;
    at_home_address(lab, "23")?;
    Ok(report)
}

/// `systemctl --user daemon-reexec` and then `daemon-reload` under a running agent: after each,
/// reachd is the same process (not restarted), the target is still active, and a `con down/up`
/// still stops and starts it within 5 s.
pub fn manager_reexec(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let before = unit(lab, REACHD)?;
    let mut report = Vec::new();
    for verb in ["daemon-reexec", "daemon-reload"] {
        lab.user().systemctl(&[verb])?;
        wait_until(
            T,
            &format!("the user manager answering after {verb}"),
            || lab.user().manager_up().map(drop).map(Some),
        )?;
        same_agent(lab, &before, &format!("after {verb}"))?;
        lab.expect_up(T, &format!("24: after {verb}"))?;
        let (down, up) = down_up(lab, &format!("24: after {verb}"))?;
        if down.max(up) > FOLLOW_BOUND {
            return Err(format!(
                "after {verb}: stopped {} after `con down`, started {} after `con up` (bound {})",
                secs(down),
                secs(up),
                secs(FOLLOW_BOUND)
            ));
        }
        report.push(format!(
            "after {verb}: stopped {}, started {}",
            secs(down),
            secs(up)
        ));
    }
    same_agent(lab, &before, "at the end")?;
    Ok(format!(
        "reachd kept pid {}; {}",
        before.get("MainPID").cloned().unwrap_or_default(),
        report.join("; ")
    ))
}

/// Issue 10 item 2, second half: reachd restarted (`systemctl --user restart reachd`) while the
/// target is active leaves the tunnel running (the same process), and still follows a later
/// renumbering of the Pi, as in scenario 23.
pub fn restart_keeps_following(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let old_pid = unit(lab, REACHD)?.get("MainPID").cloned();
    let tunnel = unit(lab, TUNNEL)?.get("MainPID").cloned();
    let pid = |p: &Option<String>| p.clone().unwrap_or_default();
    lab.user().systemctl(&["restart", REACHD])?;
    let new_pid = wait_until(T, "reachd restarted", || {
        let now = unit(lab, REACHD)?;
        let pid = now.get("MainPID").cloned();
        Ok(
            (now.get("ActiveState").map(String::as_str) == Some("active")
                && pid != old_pid
                && pid.is_some())
            .then_some(pid),
        )
    })?;
    lab.expect_up(T, "25: reachd restarted")?;
    let tunnel_now = unit(lab, TUNNEL)?.get("MainPID").cloned();
    if tunnel_now != tunnel {
        return Err(format!(
            "restarting reachd restarted the tunnel: pid {tunnel:?} -> {tunnel_now:?}"
        ));
    }
    let moves = restoring_pi_address(lab, renumber_and_back)?;
    at_home_address(lab, "25")?;
    Ok(format!(
        "reachd pid {} -> {}, tunnel (pid {}) left running; {moves}",
        pid(&old_pid),
        pid(&new_pid),
        pid(&tunnel)
    ))
}

/// Adds (`add`) or removes (`del`) one of the Pi's addresses on its interface.
fn pi_address(lab: &Lab, verb: &str, address: &str) -> Result<(), String> {
    lab.namespaces[2]
        .ip(&["addr", verb, &format!("{address}/24"), "dev", "pi0"])
        .map_err(|e| format!("ip addr {verb} {address} on the Pi: {e}"))
}

/// How many times the Pi's avahi registered (and so announced) `address`, from its log.
fn announcements(address: &str) -> usize {
    let log = dir().join("pi/avahi/avahi.log");
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&format!("Registering new address record for {address} "))
        .count()
}

/// Adds `address` to the Pi and waits until its avahi announces it.
fn add_announced(lab: &Lab, address: &str) -> Result<(), String> {
    let before = announcements(address);
    pi_address(lab, "add", address)?;
    wait_until(T, &format!("the Pi's avahi announcing {address}"), || {
        Ok((announcements(address) > before).then_some(()))
    })
}

/// Runs `steps`, then gives the Pi back its one address whatever happened, so that the next
/// scenario finds the lab as it was.
fn restoring_pi_address(
    lab: &mut Lab,
    steps: impl FnOnce(&mut Lab) -> Result<String, String>,
) -> Result<String, String> {
    // Without this the kernel removes every address of a subnet with its first one, so taking
    // the old address away would leave the Pi with none. systemd sets it everywhere
    // (sysctl.d/50-default.conf), so a real Pi renumbers this way.
    let promote = Spawn::new("ip")
        .args(["netns", "exec", lab.namespaces[2].name()])
        .args([
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.pi0.promote_secondaries=1",
        ])
        .ok(T)
        .map_err(|e| format!("keeping the Pi's other addresses: {e}"));
    let result = promote.and_then(|_| steps(lab));
    // Each may already be as wanted ("File exists", "Cannot assign"): only the end state counts,
    // and at_home_address checks it.
    let _ = pi_address(lab, "add", PI_ADDR);
    for other in [RENUMBERED_ADDR, SECOND_ADDR] {
        let _ = pi_address(lab, "del", other);
    }
    result
}

/// The baseline again after a renumbering: reachd at the Pi's own address, tunnel and mount.
fn at_home_address(lab: &mut Lab, step: &str) -> Result<(), String> {
    lab.expect_up(T, &format!("{step}: the Pi back at {PI_ADDR}"))?;
    lab.expect_tunnel()?;
    lab.expect_mount()
}

/// The control of scenario 23: a second address, announced while the first still answers.
fn second_address_restarts_nothing(lab: &mut Lab) -> Result<String, String> {
    let pids = |lab: &Lab| -> Result<Vec<Option<String>>, String> {
        [TUNNEL, MOUNT]
            .iter()
            .map(|u| Ok(unit(lab, u)?.get("MainPID").cloned()))
            .collect()
    };
    let before = pids(lab)?;
    add_announced(lab, SECOND_ADDR)?;
    let start = Instant::now();
    while start.elapsed() < CONTROL_HOLD {
        let now = pids(lab)?;
        if now != before {
            return Err(format!(
                "a second address restarted the units: tunnel and mount pids {before:?} -> \
                 {now:?} after {}",
                secs(start.elapsed())
            ));
        }
        let s = lab.user().status()?;
        if !s.reachable || s.address != PI_ADDR {
            return Err(format!("with a second address, reachd says {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    pi_address(lab, "del", SECOND_ADDR)?;
    Ok(format!(
        "{SECOND_ADDR} announced beside {PI_ADDR}: nothing restarted in {}",
        secs(CONTROL_HOLD)
    ))
}

/// Renumbers the Pi to [`RENUMBERED_ADDR`] (within [`MOVE_BOUND`]) and back.
fn renumber_and_back(lab: &mut Lab) -> Result<String, String> {
    let moved = move_pi(lab, PI_ADDR, RENUMBERED_ADDR, MOVE_BOUND)?;
    let back = move_pi(lab, RENUMBERED_ADDR, PI_ADDR, T)?;
    Ok(format!(
        "renumbered {PI_ADDR} -> {RENUMBERED_ADDR}: tunnel bytes and ~/rpi again {} later; \
         moved back in {}",
        secs(moved),
        secs(back)
    ))
}

/// Renumbers the Pi from `from` to `to` as a new lease does (the new address added and
/// announced, then the old one removed) and waits until the units work on the new one:
/// REACHD_RPI_ADDRESS says `to`, the tunnel is a new process whose socket reaches the Pi's
/// nix-daemon, ~/rpi reads the Pi's file and reachd shows `to`. Returns how long that took
/// from the removal of the old address, which must be within `bound`.
fn move_pi(lab: &mut Lab, from: &str, to: &str, bound: Duration) -> Result<Duration, String> {
    let tunnel = unit(lab, TUNNEL)?.get("MainPID").cloned();
    add_announced(lab, to)?;
    pi_address(lab, "del", from)?;
    let moved = Instant::now();
    let variable = format!("REACHD_RPI_ADDRESS={to}");
    let took = wait_until(bound, &format!("the units working on {to}"), || {
        if !lab.user().manager_env()?.lines().any(|l| l == variable) {
            return Err(format!("{variable} not in the user manager's environment"));
        }
        let now = unit(lab, TUNNEL)?;
        if now.get("MainPID") == tunnel.as_ref()
            || now.get("ActiveState").map(String::as_str) != Some("active")
        {
            return Err(format!("the tunnel not restarted: {now:?}"));
        }
        lab.tunnel_handshake()?;
        lab.mount_reads()?;
        let s = lab.user().status()?;
        if !s.reachable || s.address != to {
            return Err(format!("reachd says {s:?}"));
        }
        Ok(Some(moved.elapsed()))
    })?;
    // A poll that started before the bound may end after it.
    if took > bound {
        return Err(format!(
            "the units worked on {to} only {} after the renumbering (bound {})",
            secs(took),
            secs(bound)
        ));
    }
    Ok(took)
}
