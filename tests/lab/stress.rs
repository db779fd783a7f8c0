//! Scenarios from 30 on: what a laptop meets beyond ordinary network changes. Sleep, with
//! logind played by python3-dbusmock on the lab's system bus: the units are stopped before
//! reachd lets the machine sleep, and a laptop that wakes elsewhere never has the old target
//! active. A 30 s mDNS flood on the home LAN: decisions stay right, and the memory it costs is
//! reported (the bench measures it for the release build). Malformed and forged answers for
//! `rpi.local` from a rogue device on the home LAN: no crash, never reachable at an address
//! that does not answer.

mod logind;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reachd_testkit::lab::expect::{is_mounted, MOUNT, REACHD, TARGET, TUNNEL};
use reachd_testkit::lab::flood::{flood, mib, Plan};
use reachd_testkit::lab::forge::{self, Dest, Mix, Rng};
use reachd_testkit::lab::rogue::Rogue;
use reachd_testkit::lab::{Lab, CAFE_UUID, HOME_UUID, PI_ADDR, T};
use reachd_testkit::process::wait_until;

use crate::scenarios::{baseline, impostor_answering, secs, POWER_LOSS_BOUND};
use logind::LogindMock;

/// logind's default `InhibitDelayMaxSec`: a delay inhibitor held longer than this is ignored
/// and the machine sleeps anyway, so the units must be stopped within it.
const INHIBIT_DELAY_MAX: Duration = Duration::from_secs(5);
/// How long the mount's stop is made to take in scenario 30, so that "the inhibitor is held
/// until the units are stopped" is seen over a window the polling cannot miss.
const SLOW_STOP: &str = "1";
/// Between two looks at the inhibitor and the units: each look runs commands, which must not
/// take the machine's cores from reachd and systemd while they stop the units.
const LOOK_EVERY: Duration = Duration::from_millis(20);
/// The flood: at a bounded rate, a misbehaving device's (a busy LAN's mDNS traffic is tens of
/// packets per second), every kind of packet.
const FLOOD: Plan = Plan {
    rate: 2_000,
    period: Duration::from_secs(30),
    mix: Mix::Full,
};
const MALFORMED_RATE: u32 = 1_000;
const MALFORMED_PERIOD: Duration = Duration::from_secs(10);

/// The machine goes to sleep at home and wakes in the café: the units are stopped before reachd
/// releases its delay inhibitor, nothing starts in the café, and at home the target comes back.
pub fn sleep(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let mock = LogindMock::start(lab)?;
    let result = slow_mount_stop(lab, true).and_then(|()| sleep_and_wake(lab, &mock));
    if result.is_err() {
        // Never leave reachd waiting for a wake-up that will not come.
        let _ = mock.prepare_for_sleep(false);
    }
    mock.stop();
    let undone = home_cable(lab, true).and(slow_mount_stop(lab, false));
    let detail = result?;
    undone?;
    // reachd lost logind with the mock: it goes on as without one (the lab's usual state).
    lab.expect_up(T, "after the logind mock stopped")?;
    Ok(detail)
}

fn sleep_and_wake(lab: &mut Lab, mock: &LogindMock) -> Result<String, String> {
    // reachd takes its inhibitor when it starts: restart it now that logind is there.
    lab.user().systemctl(&["restart", REACHD])?;
    wait_until(T, "reachd's delay inhibitor in the logind mock", || {
        Ok((mock.held_by_reachd()? == 1).then_some(()))
    })?;
    lab.expect_up(T, "reachd restarted under the logind mock")?;

    let emitted = Instant::now();
    mock.prepare_for_sleep(true)?;
    let (released, held_while_stopping) = wait_for_release(lab, mock, emitted)?;
    // NetworkManager follows logind too: it puts the network to sleep as well, so the reason
    // reachd gives may be either.
    let asleep = lab.user().status_host()?;
    if asleep["reachable"] != false {
        return Err(format!("asleep, reachd says {asleep}"));
    }

    // Asleep, the laptop is carried to the café: home's cable is out when it wakes.
    home_cable(lab, false)?;
    mock.prepare_for_sleep(false)?;
    wait_until(
        INHIBIT_DELAY_MAX,
        "reachd's inhibitor taken again on waking",
        || Ok((mock.held_by_reachd()? == 1).then_some(())),
    )?;
    wait_until(T, "the café connection up after waking", || {
        lab.nmcli_con("up", CAFE_UUID).map(Some)
    })?;
    let addr = impostor_answering(lab)?;
    lab.expect_stays_down(Duration::from_secs(8), "woke in the café")?;

    lab.nmcli_con("down", CAFE_UUID)?;
    home_cable(lab, true)?;
    // NetworkManager refuses the connection until it has seen the carrier come back.
    wait_until(T, "the home connection up after the cable", || {
        lab.nmcli_con("up", HOME_UUID).map(Some)
    })?;
    let home = lab.expect_up(T, "home again after waking")?;
    Ok(format!(
        "inhibitor released {} after PrepareForSleep(true), held through {held_while_stopping} \
         looks at the units stopping (mount's stop made {SLOW_STOP} s long), tunnel and mount \
         gone before (asleep: {:?}); woke in the café ({addr} answering rpi.local): nothing \
         started for 8 s, inhibitor taken again; home: active {} after `con up`",
        secs(released),
        asleep["reason"].as_str().unwrap_or_default(),
        secs(home)
    ))
}

/// Watches the inhibitor and the units after `PrepareForSleep(true)` until reachd releases its
/// inhibitor; fails if it does so while a unit is still up, or holds it past logind's limit.
/// Returns when it released it and how many looks saw it held while the units were stopping.
fn wait_for_release(
    lab: &Lab,
    mock: &LogindMock,
    emitted: Instant,
) -> Result<(Duration, u32), String> {
    let u = lab.user();
    let sock = u.runtime_dir().join("rpi-nix-daemon.sock");
    let mount_point = u.home.join("rpi").to_string_lossy().into_owned();
    let mut held_while_stopping = 0;
    loop {
        // The inhibitor first, then the units: a release seen here happened before the units'
        // states read next, so units still up then were up at the release.
        let held = mock.held_by_reachd()? > 0;
        let units = u.units(&[TARGET, TUNNEL, MOUNT])?;
        let state = |unit: &str| units[unit]["ActiveState"].clone();
        let stopped = [TARGET, TUNNEL, MOUNT]
            .iter()
            .all(|unit| matches!(state(unit).as_str(), "inactive" | "failed"));
        if !held {
            if !stopped || sock.exists() || is_mounted(&mount_point) {
                return Err(format!(
                    "reachd released its sleep inhibitor {} after PrepareForSleep(true) with \
                     target {}, tunnel {}, mount {}, socket there: {}, mounted: {}",
                    secs(emitted.elapsed()),
                    state(TARGET),
                    state(TUNNEL),
                    state(MOUNT),
                    sock.exists(),
                    is_mounted(&mount_point)
                ));
            }
            if held_while_stopping == 0 {
                return Err(
                    "the inhibitor was never seen held while the units stopped: the check \
                     proves nothing (is the mount's slow stop in place?)"
                        .into(),
                );
            }
            return Ok((emitted.elapsed(), held_while_stopping));
        }
        if !stopped {
            held_while_stopping += 1;
        }
        if emitted.elapsed() > INHIBIT_DELAY_MAX {
            return Err(format!(
                "reachd still holds its inhibitor {} after PrepareForSleep(true): logind would \
                 have put the machine to sleep regardless (target {}, tunnel {}, mount {})",
                secs(emitted.elapsed()),
                state(TARGET),
                state(TUNNEL),
                state(MOUNT)
            ));
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

/// Plugs the laptop's home cable in or out (its switch port, so the laptop's link loses its
/// carrier and NetworkManager cannot bring "home" up).
fn home_cable(lab: &Lab, plugged: bool) -> Result<(), String> {
    let state = if plugged { "up" } else { "down" };
    lab.namespaces[1]
        .ip(&["link", "set", "lan-l", state])
        .map_err(|e| format!("the laptop's switch port: {e}"))
}

/// With `on`, makes the mount's stop take [`SLOW_STOP`] seconds longer (a drop-in, as a slow
/// unmount would); without, removes it. Either way reloads the user manager.
fn slow_mount_stop(lab: &Lab, on: bool) -> Result<(), String> {
    let u = lab.user();
    let dropin = u
        .home
        .join(".config/systemd/user")
        .join(format!("{MOUNT}.d/slow-stop.conf"));
    if on {
        let text = format!("[Service]\nExecStopPost=/bin/sleep {SLOW_STOP}\n");
        write_as_user(lab, &dropin, &text)?;
    } else if dropin.exists() {
        fs::remove_file(&dropin).map_err(|e| format!("{}: {e}", dropin.display()))?;
    }
    u.systemctl(&["daemon-reload"]).map(drop)
}

fn write_as_user(lab: &Lab, path: &Path, text: &str) -> Result<(), String> {
    let u = lab.user();
    let e = |e: std::io::Error| format!("{}: {e}", path.display());
    fs::write(path, text).map_err(e)?;
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(e)
}

/// A 30 s flood at 2,000 packets/s ([`FLOOD`]) from a rogue device on the home LAN (answers and questions
/// for random names and services to the group, forged answers for `rpi.local` at addresses
/// nobody holds to the laptop): the target stays active with reachd at the Pi's address only,
/// neither reachd nor the tunnel restarts, and afterwards a power loss of the Pi and its return
/// are still noticed in time. Reports reachd's memory (the debug build's; the bench measures the
/// release build's against the target).
pub fn mdns_flood(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let reachd = unit_run(lab, REACHD)?;
    let tunnel = unit_run(lab, TUNNEL)?;
    let pid = reachd.0;
    let flooded = flood(lab, pid, FLOOD, || {
        pi_held_reachable(lab, "under the flood")
    })?;
    for (unit, before) in [(REACHD, reachd), (TUNNEL, tunnel)] {
        let after = unit_run(lab, unit)?;
        if after != before {
            return Err(format!(
                "{unit} (MainPID, NRestarts) went from {before:?} to {after:?} under the flood"
            ));
        }
    }
    lab.pi_port(false)?;
    let down = lab.expect_down(POWER_LOSS_BOUND, "pi lost power after the flood");
    lab.pi_port(true)?;
    let down = down?;
    let up = lab.expect_up(T, "pi back after the flood")?;
    Ok(format!(
        "{}; target active at {PI_ADDR} only through {} looks, reachd (pid {}) and the tunnel \
         not restarted; afterwards a power loss stopped it in {}, back in {}; reachd's RSS after \
         the flood {} (debug build)",
        flooded.describe(),
        flooded.sent.watched,
        pid,
        secs(down),
        secs(up),
        mib(flooded.after.rss)
    ))
}

/// Malformed and forged answers for `rpi.local`, sent to the laptop by a rogue device on the
/// home LAN, with the Pi present and then gone: reachd keeps its PID, is only ever reachable at
/// the Pi's address, stops the target when the Pi goes although forged addresses remain, and
/// starts it when the Pi is back.
pub fn malformed_answers(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let before = unit_run(lab, REACHD)?;
    let rogue = Rogue::plug_in(lab)?;
    let result = malformed_with(lab, &rogue);
    // Goodbyes for what was forged, so no later scenario's checks ask those addresses.
    let goodbyes = rogue.send_to_laptop(&forge::goodbyes());
    drop(rogue);
    let detail = result?;
    goodbyes?;
    let after = unit_run(lab, REACHD)?;
    if after != before {
        return Err(format!(
            "reachd.service (MainPID, NRestarts) went from {before:?} to {after:?}"
        ));
    }
    Ok(format!("{detail}; reachd kept pid {}", after.0))
}

fn malformed_with(lab: &mut Lab, rogue: &Rogue) -> Result<String, String> {
    let packets = forge::malformed_answers(&mut Rng::new(seed()));
    let count = packets.len();
    let next = |n: u64| (packets[n as usize % count].clone(), Dest::Laptop);
    let present = rogue.send_while(MALFORMED_RATE, MALFORMED_PERIOD, next, || {
        pi_held_reachable(lab, "malformed answers, Pi present")
    })?;
    // The Pi goes: the forged addresses are all mDNS still offers.
    rogue.send_to_laptop(&packets)?;
    lab.pi_port(false)?;
    let down = lab.expect_down(POWER_LOSS_BOUND, "pi lost power among forged answers");
    let gone = down.and_then(|down| {
        let mut reason = String::new();
        let sent = rogue.send_while(MALFORMED_RATE, MALFORMED_PERIOD, next, || {
            let s = lab.user().status_host()?;
            if s["reachable"] != false || lab.user().active_state(TARGET)? != "inactive" {
                return Err(format!("Pi gone, forged answers only: reachd says {s}"));
            }
            reason = s["reason"].as_str().unwrap_or_default().to_string();
            Ok(())
        })?;
        Ok((down, reason, sent))
    });
    lab.pi_port(true)?;
    let (down, reason, gone) = gone?;
    let up = lab.expect_up(T, "pi back after forged answers")?;
    // The forged answers did reach reachd: its last failed check asked the forged address.
    if !reason.contains(&forge::FORGED_ON_LINK.to_string()) {
        return Err(format!(
            "the forged address {} never reached reachd's checks (last reason: {reason:?}): \
             the scenario proves nothing",
            forge::FORGED_ON_LINK
        ));
    }
    Ok(format!(
        "{count} kinds of malformed answer, {} packets in {} with the Pi present ({} looks: \
         reachable only at {PI_ADDR}) and {} with it gone ({} looks: unreachable), {} send \
         errors; stopped {} after the power loss, back {} after; reachd's last check without \
         the Pi: {reason:?}",
        present.packets,
        secs(present.took),
        present.watched,
        gone.packets,
        gone.watched,
        present.failed_sends + gone.failed_sends,
        secs(down),
        secs(up)
    ))
}

/// The target active and reachd holding the Pi reachable at its own address, nowhere else.
fn pi_held_reachable(lab: &Lab, step: &str) -> Result<(), String> {
    let state = lab.user().active_state(TARGET)?;
    let s = lab.user().status()?;
    if state != "active" || !s.reachable || s.address != PI_ADDR {
        return Err(format!("{step}: {TARGET} {state}, reachd says {s:?}"));
    }
    Ok(())
}

/// A running unit's MainPID and NRestarts.
fn unit_run(lab: &Lab, unit: &str) -> Result<(u32, String), String> {
    let units = lab.user().units(&[unit])?;
    let p = units.get(unit).ok_or_else(|| format!("no {unit}"))?;
    let pid = p["MainPID"]
        .parse()
        .map_err(|e| format!("{unit}'s MainPID {:?}: {e}", p["MainPID"]))?;
    if pid == 0 {
        return Err(format!("{unit} is {}", p["ActiveState"]));
    }
    Ok((pid, p["NRestarts"].clone()))
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
