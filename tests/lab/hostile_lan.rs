//! The home LAN as it really is and as an attacker makes it (issue 10, items 4 and 5): the Pi
//! answers on IPv4 and on IPv6 link-local, and a second machine on the same bridge answers
//! `rpi.local` too, with an sshd of its own. reachd must hold the address units were given, say
//! who else answers, and the pinned host key must keep the tunnel and the mount off the
//! impostor.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use reachd::address::HostAddress;
use reachd::probe;
use reachd_testkit::lab::expect::TARGET;
use reachd_testkit::lab::impostor::HOME_IMPOSTOR_ADDR;
use reachd_testkit::lab::{Lab, HOME_UUID, PI_ADDR, T};
use reachd_testkit::netns::link_local;
use reachd_testkit::process::wait_until;

use crate::scenarios::{baseline, secs};

/// How long scenario 26 watches the address, a `con down/up` included.
const WATCH: Duration = Duration::from_secs(20);

/// The Pi answers on 192.0.2.10 and on its fe80:: address; over 20 s and across a `con
/// down/up`, reachd's Address and REACHD_RPI_ADDRESS stay the IPv4 one and the target is never
/// restarted for a move.
pub fn dual_stack(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let pi_v6 = pi_answers_on_link_local(lab)?;
    let mark = lab.user().monitor_mark();
    let log_before = lab.user().reachd_log().len();
    let started = Instant::now();
    let mut looks = 0;
    let mut flipped_down_up = false;
    while started.elapsed() < WATCH {
        if !flipped_down_up && started.elapsed() >= WATCH / 3 {
            lab.nmcli_con("down", HOME_UUID)?;
            lab.expect_down(T, "dual stack: home down")?;
            lab.nmcli_con("up", HOME_UUID)?;
            lab.expect_up(T, "dual stack: home up")?;
            flipped_down_up = true;
        }
        let status = lab.user().status()?;
        if !status.address.is_empty() && status.address != PI_ADDR {
            return Err(format!(
                "after {}: reachd's Address is {} (the Pi answers at {PI_ADDR} and {pi_v6})",
                secs(started.elapsed()),
                status.address
            ));
        }
        let env = lab.user().manager_env()?;
        let variable = env.lines().find(|l| l.starts_with("REACHD_RPI_ADDRESS="));
        if variable != Some(&format!("REACHD_RPI_ADDRESS={PI_ADDR}")) {
            return Err(format!(
                "after {}: the user manager has {variable:?}",
                secs(started.elapsed())
            ));
        }
        looks += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let restarts = restart_calls(lab, mark);
    if restarts > 0 {
        return Err(format!("{restarts} RestartUnit call(s) for {TARGET}"));
    }
    let log = lab.user().reachd_log();
    let set: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("REACHD_RPI_ADDRESS=") && !l.contains(PI_ADDR))
        .collect();
    if !set.is_empty() {
        return Err(format!("reachd set another address: {}", set.join(" | ")));
    }
    lab.expect_tunnel()?;
    Ok(format!(
        "the Pi answers at {PI_ADDR} and {pi_v6}; Address and REACHD_RPI_ADDRESS stayed \
         {PI_ADDR} over {looks} looks in {} with a con down/up; no restart",
        secs(started.elapsed())
    ))
}

/// Waits for both ends' link-local addresses, then checks (with reachd's own check, from the
/// laptop) that the Pi answers `rpi.local` on its fe80:: address: else the scenario would
/// prove nothing. Returns that address.
fn pi_answers_on_link_local(lab: &Lab) -> Result<String, String> {
    let err = |e: std::io::Error| e.to_string();
    let pi_v6 = link_local(&lab.namespaces[2], "pi0").map_err(err)?;
    link_local(&lab.namespaces[0], "lh0").map_err(err)?;
    let answered = lab.namespaces[0]
        .run_in(|| check_link_local(pi_v6, "lh0"))
        .map_err(err)??;
    Ok(answered.to_string())
}

/// reachd's check of `rpi.local` at `address` on `iface`, from the calling thread's namespace.
fn check_link_local(address: Ipv6Addr, iface: &str) -> Result<HostAddress, String> {
    let name = std::ffi::CString::new(iface).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {iface} in the laptop namespace"));
    }
    let candidate = HostAddress {
        ip: IpAddr::V6(address),
        scope: Some((index, iface.to_string())),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let limit = Duration::from_secs(1);
    wait_until(T, "the Pi answering rpi.local on IPv6 link-local", || {
        runtime
            .block_on(probe::check(
                "rpi.local",
                std::slice::from_ref(&candidate),
                None,
                limit,
                None,
            ))
            .map(|answered| Some(answered.address))
    })
}

/// RestartUnit calls for the target on the session bus since `mark`.
fn restart_calls(lab: &Lab, mark: u64) -> usize {
    lab.user()
        .monitor_since(mark)
        .iter()
        .filter(|m| m["type"] == "method_call" && m["member"] == "RestartUnit")
        .filter(|m| m["payload"]["data"][0] == TARGET)
        .count()
}

/// A second machine on the home bridge claims `rpi.local` (its own address, port 22 open,
/// another host key, the user's key authorised). With the Pi present reachd stays on the Pi
/// and names the impostor; once the Pi loses power reachd may follow the name to the impostor,
/// but ssh refuses its host key: no session, no tunnel bytes, no mount.
pub fn home_impostor(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let log_before = lab.user().reachd_log().len();
    let impostor = lab.start_home_impostor()?;
    let also = format!("also answered by {HOME_IMPOSTOR_ADDR}");
    let seen = Instant::now();
    let reason = wait_until(T, "reachd's Reason naming the impostor", || {
        let reason = reason(lab)?;
        Ok(reason.contains(&also).then_some(reason))
    })?;
    let named_after = seen.elapsed();
    let log = lab.user().reachd_log();
    if !log[log_before..]
        .lines()
        .any(|l| l.contains(&HOME_IMPOSTOR_ADDR.to_string()))
    {
        return Err(format!("reachd's log does not name {HOME_IMPOSTOR_ADDR}"));
    }
    // The Pi keeps the host: address, units and the tunnel's bytes.
    lab.expect_up(T, "impostor on the LAN, Pi present")?;
    lab.expect_tunnel()?;
    if impostor.sshd_log().contains("Connection from") {
        return Err(format!(
            "ssh went to the impostor while the Pi answered: {}",
            impostor.sshd_log()
        ));
    }

    lab.pi_port(false)?;
    let lost = Instant::now();
    let moved = wait_until(T, "reachd following rpi.local to the impostor", || {
        let status = lab.user().status()?;
        Ok((status.reachable && status.address == HOME_IMPOSTOR_ADDR.to_string()).then_some(()))
    });
    // ssh closing the connection during key exchange: "[preauth]" (reachd's TCP check of
    // port 22 closes before it and shows as "kex_exchange_identification" instead).
    let tried = wait_until(T, "the units' ssh trying the impostor", || {
        Ok(impostor.sshd_log().contains("[preauth]").then_some(()))
    });
    // For a while after that: no session on the impostor, no bytes through the tunnel, no mount.
    let watched = Instant::now();
    let (mut looks, mut mount_attempts) = (0, 0);
    let served = loop {
        if watched.elapsed() >= Duration::from_secs(10) {
            break Ok(());
        }
        if let Ok(version) = lab.tunnel_handshake() {
            break Err(format!(
                "a nix-daemon (protocol {version}) answered through the tunnel to the impostor"
            ));
        }
        if let Some(how) = mount_serves(lab) {
            break Err(how);
        }
        mount_attempts += usize::from(mounted_from_impostor(lab));
        let nix = lab.user().nix_status()?;
        if nix.in_use {
            break Err(format!("Nix uses the impostor's cache: {nix:?}"));
        }
        looks += 1;
        std::thread::sleep(Duration::from_millis(500));
    };
    let sshd_log = impostor.sshd_log();
    let result = (|| {
        moved.map_err(|e| format!("after the Pi lost power: {e}"))?;
        tried?;
        served?;
        if sshd_log.contains("Accepted") {
            return Err(format!("the impostor's sshd let ssh in: {sshd_log}"));
        }
        Ok(())
    })();
    let connections = sshd_log.matches("[preauth]").count();
    impostor.stop()?;
    lab.pi_port(true)?;
    let back = lab.expect_up(T, "impostor gone, Pi back");
    result?;
    let back = back?;
    lab.expect_tunnel()?;
    Ok(format!(
        "reason {reason:?} {} after the impostor appeared; once the Pi lost power reachd \
         followed rpi.local to {HOME_IMPOSTOR_ADDR} after {}, ssh connected {connections} \
         time(s) and was refused the host key (over 10 s, {looks} looks: no daemon through the \
         tunnel, no file through the mount (seen mounted from the impostor, serving nothing, \
         at {mount_attempts} looks), Nix not pointed at it); Pi back {} after the impostor left",
        secs(named_after),
        secs(watched.duration_since(lost)),
        secs(back)
    ))
}

/// reachd's Reason for the Pi, from `reachd status --json`.
fn reason(lab: &Lab) -> Result<String, String> {
    let host = lab.user().status_host()?;
    Ok(host["reason"].as_str().unwrap_or_default().to_string())
}

/// What ~/rpi serves, if anything: the Pi's greeting (which the impostor's disk has too: it
/// shares the lab's directory) read as the user within 2 s.
fn mount_serves(lab: &Lab) -> Option<String> {
    let read = lab
        .user()
        .cmd("cat")
        .arg(lab.user().home.join("rpi/greeting.txt"))
        .run(Duration::from_secs(2));
    match read {
        Ok(out) if out.success() => Some(format!("~/rpi serves {:?}", out.stdout)),
        _ => None,
    }
}

/// Whether sshfs has ~/rpi mounted from the impostor right now. sshfs 3.7 mounts before its ssh
/// session is up, so each refused attempt shows such a mount for a moment, serving nothing.
fn mounted_from_impostor(lab: &Lab) -> bool {
    let mount_point = lab.user().home.join("rpi");
    let mount_point = mount_point.to_string_lossy();
    let source = format!("@{HOME_IMPOSTOR_ADDR}:");
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&mount_point) && l.contains(&source))
}
