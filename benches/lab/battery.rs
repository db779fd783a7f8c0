//! The battery part of the bench: what keeps a phone's Wi-Fi awake at home. With the Pi
//! reachable, its tunnel and mount up and its cache in use, the laptop's home link is watched at
//! rest, once with the default checks and once with the battery profile of docs/battery.md
//! (read from that file, so the profile measured is the one documented), applied by a reload.
//! Packets both ways on the link, and the UDP datagrams (mDNS questions) and TCP segments (port
//! checks, cache checks through the tunnel, ssh's own keepalives) the laptop sent.

use std::fs;
use std::time::Duration;

use reachd_testkit::lab::expect::REACHD;
use reachd_testkit::lab::user::reachd_config;
use reachd_testkit::lab::{Lab, HOME_UUID, T};

use crate::measure::{link_packets, net_stat};

/// How long each profile is watched.
const PERIOD: Duration = Duration::from_secs(60);
/// Left to pass before watching: the start's announcements and handshakes, and, after the
/// reload, the checks still due at the old intervals.
const SETTLE: Duration = Duration::from_secs(35);
/// The laptop's home link in the lab.
const LINK: &str = "lh0";
/// Where the profile is documented.
const PROFILE_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/battery.md");

/// What one profile cost over [`PERIOD`].
pub struct Traffic {
    pub profile: &'static str,
    pub received: u64,
    pub sent: u64,
    pub udp_sent: u64,
    pub tcp_sent: u64,
}

pub struct BatteryReport {
    pub traffic: Vec<Traffic>,
}

/// The battery profile's `[probe]` table: the first TOML block of docs/battery.md.
pub fn profile() -> Result<String, String> {
    let doc = fs::read_to_string(PROFILE_DOC).map_err(|e| format!("{PROFILE_DOC}: {e}"))?;
    let start = doc
        .find("```toml\n")
        .ok_or(format!("{PROFILE_DOC} has no ```toml block"))?
        + "```toml\n".len();
    let end = doc[start..]
        .find("```")
        .ok_or(format!("{PROFILE_DOC}: the toml block has no end"))?;
    Ok(doc[start..start + end].to_string())
}

pub fn run(lab: &mut Lab) -> Result<BatteryReport, String> {
    let profile = profile()?;
    lab.start_pi_avahi()?;
    let user = lab.user();
    user.stop_reachd()?;
    user.configure_reachd_lab()?;
    user.systemctl(&["enable", "rpi-nix-tunnel.service", "rpi-mount.service"])?;
    user.start_reachd()?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.pi_cache_back_in_use()?;
    let mut traffic = Vec::new();
    eprintln!(
        "bench: battery: the default checks, at rest for {} s",
        PERIOD.as_secs()
    );
    std::thread::sleep(SETTLE);
    traffic.push(watch(lab, "default")?);

    let config = lab.user().home.join(".config/reachd/config.toml");
    let write = |text: String| fs::write(&config, text).map_err(|e| format!("{config:?}: {e}"));
    write(format!("{profile}\n{}", reachd_config()))?;
    lab.user().systemctl(&["reload", REACHD])?;
    eprintln!(
        "bench: battery: the battery profile, at rest for {} s",
        PERIOD.as_secs()
    );
    std::thread::sleep(SETTLE);
    lab.expect_nix_in_use(true, T)?;
    traffic.push(watch(lab, "battery profile")?);

    write(reachd_config())?;
    lab.user().systemctl(&["reload", REACHD])?;
    Ok(BatteryReport { traffic })
}

fn watch(lab: &Lab, profile: &'static str) -> Result<Traffic, String> {
    let pid = lab
        .nm
        .as_ref()
        .ok_or("NetworkManager is not running")?
        .pid();
    let counters = || -> Result<(u64, u64, u64, u64), String> {
        let (rx, tx) = link_packets(pid, LINK)?;
        Ok((
            rx,
            tx,
            net_stat(pid, "snmp", "Udp:", "OutDatagrams")?,
            net_stat(pid, "snmp", "Tcp:", "OutSegs")?,
        ))
    };
    let before = counters()?;
    std::thread::sleep(PERIOD);
    let after = counters()?;
    Ok(Traffic {
        profile,
        received: after.0 - before.0,
        sent: after.1 - before.1,
        udp_sent: after.2 - before.2,
        tcp_sent: after.3 - before.3,
    })
}

impl BatteryReport {
    pub fn print(&self) {
        let per_min = |n: u64| n as f64 * 60.0 / PERIOD.as_secs_f64();
        println!();
        println!(
            "Battery: the laptop's home link at rest, Pi reachable, tunnel and mount up, cache in use"
        );
        println!(
            "  {:<18} {:>14} {:>14} {:>16} {:>16}",
            "profile", "received/min", "sent/min", "UDP sent/min", "TCP sent/min"
        );
        for t in &self.traffic {
            println!(
                "  {:<18} {:>14.0} {:>14.0} {:>16.0} {:>16.0}",
                t.profile,
                per_min(t.received),
                per_min(t.sent),
                per_min(t.udp_sent),
                per_min(t.tcp_sent)
            );
        }
        println!(
            "  ({} s each after {} s to settle; packets from /proc/net/dev of {LINK}, datagrams and \
             segments from /proc/net/snmp of the laptop's namespace; the profile is docs/battery.md's, \
             applied by `systemctl --user reload reachd`)",
            PERIOD.as_secs(),
            SETTLE.as_secs()
        );
    }
}
