//! A firewall like NixOS's default one on the laptop (its nftables form: loopback, replies to
//! what the laptop sent, ICMP; everything else dropped). The Pi answers mDNS questions by
//! multicast to 224.0.0.251:5353, which conntrack cannot match to the laptop's question, so the
//! answers are dropped: a reachd that starts behind it never finds the Pi. With UDP port 5353
//! open (what the NixOS module's `openFirewall` does, as avahi's does), it is found.

use std::fs;
use std::time::{Duration, Instant};

use reachd_testkit::lab::expect::{REACHD, TARGET};
use reachd_testkit::lab::{dir, Lab, T};
use reachd_testkit::process::Spawn;

use crate::scenarios::{baseline, secs};

/// How long reachd must keep not finding the Pi behind the firewall.
const NOT_FOUND: Duration = Duration::from_secs(15);
/// How long it may take to find it once UDP 5353 is open: mdns-sd repeats its question at
/// doubling intervals (1, 2, 4, 8, 16 s...: opened after 15 s, the next one comes ~16 s later);
/// `reachd refresh` checks again but does not ask the question again.
const FOUND: Duration = Duration::from_secs(40);

/// NixOS's default input policy (networking.firewall, nftables form), without its open ports.
const NIXOS_LIKE: &str = "table inet reachd-lab-fw {
  chain input {
    type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    meta l4proto { icmp, ipv6-icmp } accept
  }
}
";

pub fn nixos_firewall(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    nft(&["-f", &ruleset()?])?;
    let outcome = behind_the_firewall(lab);
    let removed = nft(&["delete", "table", "inet", "reachd-lab-fw"]);
    let report = outcome?;
    removed?;
    baseline(lab)?;
    Ok(report)
}

fn behind_the_firewall(lab: &mut Lab) -> Result<String, String> {
    let u = lab.user();
    // A fresh start: nothing known of the Pi, it must be found.
    u.systemctl(&["stop", REACHD])?;
    u.systemctl(&["stop", TARGET])?;
    u.systemctl(&["start", REACHD])?;
    let start = Instant::now();
    while start.elapsed() < NOT_FOUND {
        if u.active_state(TARGET)? != "inactive" || u.status()?.reachable {
            return Err(format!(
                "behind the firewall the Pi was found after {}: the test shows nothing",
                secs(start.elapsed())
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let state = u.status()?.state;
    nft(&[
        "add",
        "rule",
        "inet",
        "reachd-lab-fw",
        "input",
        "udp",
        "dport",
        "5353",
        "accept",
    ])?;
    let opened = Instant::now();
    u.reachd(&["refresh"])?;
    lab.expect_up(FOUND, "29: UDP 5353 open")?;
    Ok(format!(
        "behind a NixOS-like firewall not found for {} (reachd: {state:?}); found {} after \
         opening UDP 5353",
        secs(NOT_FOUND),
        secs(opened.elapsed())
    ))
}

fn ruleset() -> Result<String, String> {
    let path = dir().join("nixos-like-firewall.nft");
    fs::write(&path, NIXOS_LIKE).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

/// `nft ARGS` in the laptop's namespace (only there).
fn nft(args: &[&str]) -> Result<(), String> {
    Spawn::new("nft")
        .args(args)
        .netns(Lab::netns_path("laptop"))
        .ok(T)
        .map(drop)
        .map_err(|e| format!("nft {}: {e}", args.join(" ")))
}
