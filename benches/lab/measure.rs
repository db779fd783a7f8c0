//! The measurements: the four steps, run in cycles while one tool (the old script or reachd) is
//! in charge of the target; link-up with many hosts; what reachd costs at rest (from /proc); and
//! the summaries (median, min–max).

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::Duration;

use crate::watch::{mono_ns, Events};
use reachd_testkit::lab::bench::TARGET;
use reachd_testkit::lab::flood::Memory;
use reachd_testkit::lab::{Lab, HOME_UUID};

/// A step that has not happened after this is "never".
pub const CAP: Duration = Duration::from_secs(15);
/// Cycles of each measurement.
pub const CYCLES: usize = 5;
/// The deadline for NetworkManager's own change and for link-up with many hosts.
const NM_CAP: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    ConUp,
    ConDown,
    PiLoss,
    PiBack,
}

impl Step {
    /// The order of the table.
    pub const ALL: [Step; 4] = [Step::ConUp, Step::ConDown, Step::PiLoss, Step::PiBack];
    /// The order of a cycle, from the baseline (home up, Pi present, target active).
    const CYCLE: [Step; 4] = [Step::ConDown, Step::ConUp, Step::PiLoss, Step::PiBack];

    pub fn label(self) -> &'static str {
        match self {
            Step::ConUp => "nmcli con up home -> target active",
            Step::ConDown => "nmcli con down home -> target inactive",
            Step::PiLoss => "Pi loses power (laptop on LAN) -> inactive",
            Step::PiBack => "Pi power back -> target active",
        }
    }

    /// Whether the target should be active after the step.
    fn up(self) -> bool {
        matches!(self, Step::ConUp | Step::PiBack)
    }

    fn act(self, lab: &Lab) -> Result<(), String> {
        match self {
            Step::ConUp => lab.nmcli_con("up", HOME_UUID),
            Step::ConDown => lab.nmcli_con("down", HOME_UUID),
            Step::PiLoss => lab.pi_port(false),
            Step::PiBack => lab.pi_port(true),
        }
    }

    /// NetworkManager's own notice of the step, if it has one: State >= 50 (up) or < 50 (down).
    fn nm_notice(self) -> Option<fn(u32) -> bool> {
        match self {
            Step::ConUp => Some(|state| state >= 50),
            Step::ConDown => Some(|state| state < 50),
            Step::PiLoss | Step::PiBack => None,
        }
    }
}

/// The two watchers: the user's units and NetworkManager.
pub struct Watchers {
    pub units: Events,
    pub nm: Events,
}

/// Samples per step: the tool's time to the target's new state, and NetworkManager's own.
#[derive(Default)]
pub struct Series {
    pub took: BTreeMap<Step, Vec<Option<Duration>>>,
    pub nm: BTreeMap<Step, Vec<Option<Duration>>>,
    /// Steps before which the bench put the target in the step's starting state by hand,
    /// because the tool had left it elsewhere (the script, after a step it never noticed).
    pub by_hand: usize,
}

fn since(t0: u64, at: u64) -> Duration {
    Duration::from_nanos(at.saturating_sub(t0))
}

/// A pause before each step, different from step to step (0.5 to 3.5 s), so that the steps fall
/// at different points of reachd's check schedule (every 3 s while present, 2 s while absent).
fn settle(k: usize) -> Duration {
    Duration::from_millis(500 + (k as u64 * 677) % 3000)
}

/// Runs `n` cycles of the four steps, adding to `series`.
pub fn cycles(lab: &Lab, w: &mut Watchers, n: usize, series: &mut Series) -> Result<(), String> {
    for cycle in 0..n {
        for (i, step) in Step::CYCLE.into_iter().enumerate() {
            series.by_hand += usize::from(put_target(lab, !step.up())?);
            thread::sleep(settle(cycle * Step::CYCLE.len() + i));
            let t0 = mono_ns();
            step.act(lab)?;
            let want = if step.up() { "active" } else { "inactive" };
            let deadline = t0 + CAP.as_nanos() as u64;
            let took = w
                .units
                .first(t0, deadline, |e| e.key == TARGET && e.value == want);
            let nm = step.nm_notice().map(|notice| {
                let deadline = t0 + NM_CAP.as_nanos() as u64;
                w.nm.first(t0, deadline, |e| {
                    e.key == "nm-state" && e.value.parse().is_ok_and(notice)
                })
            });
            let show = |t: Option<u64>| t.map_or("never".into(), |at| ms(since(t0, at)));
            eprintln!(
                "bench:   cycle {} {:?}: target {want} after {}{}",
                cycle + 1,
                step,
                show(took),
                nm.map(|t| format!(", NM after {}", show(t)))
                    .unwrap_or_default()
            );
            series
                .took
                .entry(step)
                .or_default()
                .push(took.map(|at| since(t0, at)));
            if let Some(nm) = nm {
                series
                    .nm
                    .entry(step)
                    .or_default()
                    .push(nm.map(|at| since(t0, at)));
            }
        }
    }
    Ok(())
}

/// Puts the target in the given state if it is not; whether it had to.
fn put_target(lab: &Lab, active: bool) -> Result<bool, String> {
    let user = lab.user();
    if (user.active_state(TARGET)? == "active") == active {
        return Ok(false);
    }
    user.systemctl(&[if active { "start" } else { "stop" }, TARGET])?;
    Ok(true)
}

/// Link-up with many hosts: per cycle, the time from `nmcli con up` to every target active and
/// the CPU time reachd (`pid`) used meanwhile.
#[derive(Default)]
pub struct LinkUp {
    pub took: Vec<Option<Duration>>,
    pub cpu: Vec<Option<Duration>>,
    pub rss_kib: u64,
}

pub fn link_up(
    lab: &Lab,
    w: &mut Watchers,
    pid: u32,
    targets: &[String],
    n: usize,
) -> Result<LinkUp, String> {
    let mut out = LinkUp::default();
    for cycle in 0..n {
        let t0 = mono_ns();
        lab.nmcli_con("down", HOME_UUID)?;
        let deadline = t0 + NM_CAP.as_nanos() as u64;
        if w.units.all(t0, deadline, targets, "inactive").is_none() {
            return Err(format!(
                "after `con down` not all {} targets became inactive within {NM_CAP:?}",
                targets.len()
            ));
        }
        thread::sleep(settle(cycle));
        let cpu0 = cpu(pid)?;
        let t0 = mono_ns();
        let deadline = t0 + NM_CAP.as_nanos() as u64;
        // nmcli waits for the whole activation; the targets may be up before it returns.
        let (all, cpu1, nmcli) = thread::scope(|s| {
            let nmcli = s.spawn(|| lab.nmcli_con("up", HOME_UUID));
            let all = w.units.all(t0, deadline, targets, "active");
            let cpu1 = cpu(pid);
            (all, cpu1, nmcli.join())
        });
        nmcli.map_err(|_| "nmcli thread panicked".to_string())??;
        let took = all.map(|at| since(t0, at));
        let used = all.map(|_| cpu1.clone()).transpose()?.map(|c| c - cpu0);
        eprintln!(
            "bench:   {} hosts, cycle {}: all active after {}, reachd CPU {}",
            targets.len(),
            cycle + 1,
            took.map_or("never".into(), ms),
            used.map_or("-".into(), ms)
        );
        out.took.push(took);
        out.cpu.push(used);
    }
    out.rss_kib = rss_kib(pid)?;
    Ok(out)
}

/// reachd at rest over a period: what /proc says about it and its network namespace.
pub struct Idle {
    pub period: Duration,
    pub rss_kib: u64,
    pub cpu: Duration,
    /// The same from /proc/PID/stat (utime + stime: whole clock ticks, but counting threads
    /// that have ended too), as a check.
    pub cpu_stat: Duration,
    pub udp_out: u64,
    pub mcast_out: u64,
}

/// Watches reachd (`pid`) at rest for `period`; `netns_pid` is any process in the laptop's
/// namespace (for its /proc/PID/net counters).
pub fn idle(pid: u32, netns_pid: u32, period: Duration) -> Result<Idle, String> {
    let (cpu0, stat0, (udp0, mc0)) = (cpu(pid)?, cpu_stat(pid)?, net_counters(netns_pid)?);
    thread::sleep(period);
    let (cpu1, stat1, (udp1, mc1)) = (cpu(pid)?, cpu_stat(pid)?, net_counters(netns_pid)?);
    Ok(Idle {
        period,
        rss_kib: rss_kib(pid)?,
        cpu: cpu1 - cpu0,
        cpu_stat: stat1 - stat0,
        udp_out: udp1 - udp0,
        mcast_out: mc1 - mc0,
    })
}

/// UDP datagrams sent in the laptop's namespace over `period` (with reachd stopped: the noise
/// floor of the idle count).
pub fn udp_noise(netns_pid: u32, period: Duration) -> Result<u64, String> {
    let (udp0, _) = net_counters(netns_pid)?;
    thread::sleep(period);
    Ok(net_counters(netns_pid)?.0 - udp0)
}

/// CPU time of a process: the sum of its threads' run time (/proc/PID/task/*/schedstat, ns).
/// reachd's threads (the runtime's and mdns-sd's) live as long as the process.
pub fn cpu(pid: u32) -> Result<Duration, String> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for task in fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
        let path = task.map_err(|e| e.to_string())?.path().join("schedstat");
        let text = fs::read_to_string(&path).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(total))
}

/// utime + stime of /proc/PID/stat.
fn cpu_stat(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command (field 2) is in parentheses and may contain spaces: count after it.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    match fields[..] {
        [utime, stime] => Ok(Duration::from_millis((utime + stime) * 1000 / hz)),
        _ => Err(format!("no utime/stime in {path}")),
    }
}

pub fn rss_kib(pid: u32) -> Result<u64, String> {
    Memory::of(pid).map(|m| m.rss)
}

/// Udp OutDatagrams (/proc/PID/net/snmp) and IpExt OutMcastPkts (/proc/PID/net/netstat) of
/// the network namespace `pid` is in.
fn net_counters(pid: u32) -> Result<(u64, u64), String> {
    Ok((
        net_stat(pid, "snmp", "Udp:", "OutDatagrams")?,
        net_stat(pid, "netstat", "IpExt:", "OutMcastPkts")?,
    ))
}

/// One counter of /proc/PID/net/`file` (snmp, netstat: a row of names, then one of values, per
/// table) in the network namespace `pid` is in.
pub fn net_stat(pid: u32, file: &str, table: &str, name: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/net/{file}");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut rows = text.lines().filter(|l| l.starts_with(table));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return Err(format!("no {table} table in {path}"));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| format!("no {table} {name} in {path}"))
}

/// Packets received and sent on `iface` (/proc/PID/net/dev) in the namespace `pid` is in.
pub fn link_packets(pid: u32, iface: &str) -> Result<(u64, u64), String> {
    let path = format!("/proc/{pid}/net/dev");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // "  lh0: rx_bytes rx_packets ... (8 receive fields) tx_bytes tx_packets ..."
    let fields: Vec<u64> = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{iface}:")))
        .ok_or_else(|| format!("no {iface} in {path}"))?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match (fields.get(1), fields.get(9)) {
        (Some(&rx), Some(&tx)) => Ok((rx, tx)),
        _ => Err(format!("{path}: {iface} has too few fields")),
    }
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// The median of the samples (a missing one counts as the longest) with min–max, e.g.
/// `157 ms (140 ms–200 ms)`, or `never (> 15 s)`.
pub fn summary(samples: &[Option<Duration>]) -> String {
    let got: Vec<Duration> = sorted(samples).into_iter().flatten().collect();
    let never = samples.len() - got.len();
    let mut text = match (median(samples), got.first(), got.last()) {
        (Some(m), Some(min), Some(max)) => format!("{} ({}–{})", ms(m), ms(*min), ms(*max)),
        _ if samples.is_empty() => return "-".into(),
        _ => format!("never (> {} s)", CAP.as_secs()),
    };
    if never > 0 && !got.is_empty() {
        text.push_str(&format!(", {never} of {} never", samples.len()));
    }
    text
}

/// The median of the samples (a missing one counts as the longest); `None` if that is missing.
pub fn median(samples: &[Option<Duration>]) -> Option<Duration> {
    let sorted = sorted(samples);
    sorted
        .get(sorted.len().checked_sub(1)? / 2)
        .copied()
        .flatten()
}

/// Shortest first, missing ones last.
fn sorted(samples: &[Option<Duration>]) -> Vec<Option<Duration>> {
    let mut sorted = samples.to_vec();
    sorted.sort_by_key(|s| s.map_or((1, Duration::ZERO), |d| (0, d)));
    sorted
}
