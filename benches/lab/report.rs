//! What the bench needs beyond the lab (checked first), and the printed result: the table, reachd's
//! own figures against its targets, the machine, and how each figure was taken.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::measure::{median, ms, summary, Idle, LinkUp, Series, Step, CYCLES};
use reachd_testkit::lab::cleanup::{marked, RUN_AVAHI};
use reachd_testkit::lab::preflight::{problems as lab_problems, which};
use reachd_testkit::lab::{OLD_SCRIPT, T};
use reachd_testkit::process::Spawn;

/// Every reason the bench cannot run here (the lab's, then its own), each with its fix.
pub fn problems() -> Vec<String> {
    let mut out = lab_problems();
    for (prog, pkg) in [("avahi-publish", "avahi-utils")] {
        if which(prog).is_none() {
            out.push(format!(
                "`{prog}` not found: install the Debian package {pkg}"
            ));
        }
    }
    let nss = ["/usr/lib", "/lib"].iter().any(|base| {
        fs::read_dir(base).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.path().join("libnss_mdns4_minimal.so.2").exists())
        })
    });
    if !nss {
        out.push("nss-mdns not found: install the Debian package libnss-mdns".into());
    }
    let nsswitch = fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    if !nsswitch
        .lines()
        .any(|l| l.starts_with("hosts:") && l.contains("mdns4_minimal"))
    {
        out.push(
            "/etc/nsswitch.conf has no mdns4_minimal on its hosts: line (libnss-mdns adds it)"
                .into(),
        );
    }
    if Path::new(OLD_SCRIPT).exists() && marked("old-script").is_none() {
        out.push(format!(
            "{OLD_SCRIPT} exists and is not the bench's: move it away first"
        ));
    }
    if std::os::unix::net::UnixStream::connect(Path::new(RUN_AVAHI).join("socket")).is_ok() {
        out.push(format!(
            "an avahi-daemon serves {RUN_AVAHI}/socket: the bench needs it for the laptop's avahi"
        ));
    }
    out
}

#[derive(Default)]
pub struct Report {
    pub script: Series,
    pub reachd: Series,
    pub idle: Option<Idle>,
    /// UDP datagrams sent in the laptop's namespace in 10 s with reachd stopped.
    pub udp_without: Option<u64>,
    pub link_up: Vec<(usize, LinkUp)>,
    pub nix: Option<crate::nix::NixReport>,
    pub battery: Option<crate::battery::BatteryReport>,
    pub builder: Option<crate::builder::BuilderReport>,
    pub flood: Option<crate::flood::FloodReport>,
}

impl Report {
    pub fn print(&self, elapsed: Duration) {
        println!();
        println!("reachd lab benchmark: {CYCLES} cycles per step; median (min–max)");
        println!("machine: {}", machine());
        println!();
        let rows: Vec<[String; 4]> = Step::ALL
            .iter()
            .map(|&step| {
                let col = |s: &Series| summary(s.took.get(&step).map_or(&[][..], Vec::as_slice));
                let mut nm: Vec<Option<Duration>> = Vec::new();
                for s in [&self.script, &self.reachd] {
                    nm.extend(s.nm.get(&step).into_iter().flatten());
                }
                let floor = if nm.is_empty() {
                    "n/a (NM sees no change)".to_string()
                } else {
                    summary(&nm)
                };
                [
                    step.label().into(),
                    col(&self.script),
                    col(&self.reachd),
                    floor,
                ]
            })
            .collect();
        let header = [
            "step".to_string(),
            "script (NM dispatcher)".into(),
            "reachd (defaults)".into(),
            "floor (NM State)".into(),
        ];
        let widths: Vec<usize> = (0..4)
            .map(|i| {
                rows.iter()
                    .chain([&header])
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |r: &[String; 4]| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("| {} |", cells.join(" | "));
        };
        line(&header);
        println!(
            "|{}|",
            widths
                .iter()
                .map(|w| "-".repeat(w + 2))
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &rows {
            line(r);
        }
        if self.script.by_hand > 0 {
            println!(
                "(script: before {} of its steps the target was not in the step's starting state, \
                 because the script never noticed the step before; the bench put it there by hand)",
                self.script.by_hand
            );
        }
        if self.reachd.by_hand > 0 {
            println!(
                "(reachd: before {} of its steps the bench had to put the target in the step's \
                 starting state by hand)",
                self.reachd.by_hand
            );
        }
        println!();
        println!("reachd alone, against its targets:");
        for (what, got, ok) in self.targets() {
            let verdict = match ok {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "info",
            };
            println!("  {verdict:<6} {what}: {got}");
        }
        println!();
        println!("how each figure was taken:");
        for l in HOW {
            println!("  - {l}");
        }
        self.print_parts();
        println!("  (whole run: {:.0} s)", elapsed.as_secs_f64());
    }

    /// The Nix and flood parts' own tables, those that ran.
    pub fn print_parts(&self) {
        if let Some(nix) = &self.nix {
            nix.print();
        }
        if let Some(battery) = &self.battery {
            battery.print();
        }
        if let Some(builder) = &self.builder {
            builder.print();
        }
        if let Some(flood) = &self.flood {
            flood.print();
        }
    }

    /// (what, measured, target met?) for each of reachd's targets.
    fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let took = |step| {
            self.reachd
                .took
                .get(&step)
                .map_or(&[][..], Vec::as_slice)
                .to_vec()
        };
        let within = |step, bound: Duration| {
            let samples = took(step);
            (
                summary(&samples),
                median(&samples).map(|m| m <= bound).or(Some(false)),
            )
        };
        let mut out = Vec::new();
        let (got, ok) = within(Step::ConDown, Duration::from_millis(100));
        out.push(("con down -> inactive <= 100 ms".into(), got, ok));
        // con up: against NetworkManager's own time in the same cycles.
        let nm = self
            .reachd
            .nm
            .get(&Step::ConUp)
            .cloned()
            .unwrap_or_default();
        let deltas: Vec<Option<Duration>> = took(Step::ConUp)
            .iter()
            .zip(&nm)
            .map(|(r, n)| Some(r.as_ref()?.saturating_sub((*n)?)))
            .collect();
        out.push((
            "con up -> active <= NM's own time + 50 ms".into(),
            format!(
                "{}; minus NM's time in the same cycle: {}",
                summary(&took(Step::ConUp)),
                summary(&deltas)
            ),
            median(&deltas).map(|d| d <= Duration::from_millis(50)),
        ));
        let (got, ok) = within(Step::PiLoss, Duration::from_secs(10));
        out.push(("Pi power loss -> inactive <= 10 s".into(), got, ok));
        let (got, ok) = within(Step::PiBack, Duration::from_secs(3));
        out.push(("Pi back -> active <= 3 s".into(), got, ok));
        if let Some(idle) = &self.idle {
            let mib = idle.rss_kib as f64 / 1024.0;
            out.push((
                "idle RSS <= 10 MiB".into(),
                format!(
                    "{mib:.1} MiB (VmRSS after {} s at rest)",
                    idle.period.as_secs()
                ),
                Some(mib <= 10.0),
            ));
            let pct = idle.cpu.as_secs_f64() / idle.period.as_secs_f64() * 100.0;
            out.push((
                "idle CPU <= 0.1 %".into(),
                format!(
                    "{pct:.3} % ({} of CPU in {} s; /proc/PID/stat says {})",
                    ms(idle.cpu),
                    idle.period.as_secs(),
                    ms(idle.cpu_stat)
                ),
                Some(pct <= 0.1),
            ));
            let per_min = |n: u64| n as f64 * 60.0 / idle.period.as_secs_f64();
            let noise = self
                .udp_without
                .map(|n| format!("; with reachd stopped the namespace sent {n} in 10 s"))
                .unwrap_or_default();
            out.push((
                "idle mDNS packets sent (no target)".into(),
                format!(
                    "{:.0}/min UDP datagrams, of which {:.0}/min multicast{noise}",
                    per_min(idle.udp_out),
                    per_min(idle.mcast_out)
                ),
                None,
            ));
        }
        for (count, l) in &self.link_up {
            let rss = l.rss_kib as f64 / 1024.0;
            let ok = (*count == 50)
                .then(|| median(&l.took).is_some_and(|m| m <= Duration::from_millis(300)));
            let what = if *count == 50 {
                "50 hosts: link up -> all active <= 300 ms".to_string()
            } else {
                format!("{count} host(s): link up -> all active (no target)")
            };
            out.push((
                what,
                format!(
                    "{}; reachd CPU meanwhile {}; RSS after {rss:.1} MiB",
                    summary(&l.took),
                    summary(&l.cpu)
                ),
                ok,
            ));
        }
        out
    }
}

const HOW: &[&str] = &[
    "times: CLOCK_MONOTONIC read by the bench right before it runs the step's command \
     (`nmcli --wait 20 connection up|down uuid …` as root; `ip -n rl-lan link set lan-p down|up`, \
     the Pi's switch port, for power loss and return), to the stamp a watcher took on \
     receiving the D-Bus signal: the user manager's PropertiesChanged for \
     rpi-accessible.target with the new ActiveState (a watcher running as the test user, \
     subscribed on its session bus), or NetworkManager's PropertiesChanged with the new State \
     (a watcher on the lab's system bus). Signals, not polls.",
    "floor: NetworkManager's State reaching >= 50 (up) or < 50 (down), pooled over the script's \
     and reachd's cycles; NetworkManager reports nothing when the Pi loses power or comes back.",
    "script: /etc/NetworkManager/dispatcher.d/50-rpi-accessible (root, 0755) run by the real \
     nm-dispatcher in the root namespace on every event: `getent ahosts rpi.local` (nss-mdns \
     mdns4_minimal -> an avahi-daemon in the laptop's namespace whose socket is \
     /run/avahi-daemon/socket), then `runuser … systemctl --user --no-block start|stop`. \
     reachd stopped; one unmeasured down/up first (nm-dispatcher starts on the first event).",
    "reachd: its unit with no --config and no config file (the embedded default: rpi.local, \
     rpi-accessible.target, default probe settings), no dispatcher hook installed.",
    "the target has nothing hung off it (the lab's tunnel and mount disabled), so the times are \
     noticing plus the job, the same for every column. A pause of 0.5–3.5 s, different each \
     time, comes before each step, so steps fall at different points of reachd's check timers.",
    "never: no change within 15 s of the step.",
    "idle: reachd's VmRSS from /proc/PID/status; its CPU time as the sum of its threads' run \
     time in /proc/PID/task/*/schedstat over 60 s, Pi present and target active (reachd has two \
     threads, the runtime's and mdns-sd's, for its whole life: the sum matched its unit cgroup's \
     cpu.stat usage_usec when checked); packets as \
     the change of Udp OutDatagrams (/proc/net/snmp) and IpExt OutMcastPkts (/proc/net/netstat) \
     of the laptop's namespace, where reachd is the only UDP sender (NetworkManager has static \
     addresses and no connectivity check; the laptop's avahi runs only for the script; checked \
     by the count over 10 s with reachd stopped).",
    "hosts: N names published at the Pi's address by `avahi-publish -a -R` through the Pi's \
     avahi; a config listing h1..hN (hN.local, default settings) with one hN-accessible.target \
     each; time from `nmcli con up` to the last target active, and reachd's CPU time \
     (schedstat, as above) from right before the command to when the bench saw them all active.",
];

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = |prog: &str, arg: &str| {
        Spawn::new(prog)
            .arg(arg)
            .run(T)
            .map(|o| o.stdout.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "nproc {nproc}, kernel {}, CPU {cpu}; NetworkManager {}, {}, {}",
        kernel.trim(),
        version("NetworkManager", "--version"),
        version("/usr/lib/systemd/systemd", "--version"),
        version("avahi-daemon", "--version"),
    )
}
