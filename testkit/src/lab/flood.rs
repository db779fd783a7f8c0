//! An mDNS flood on the home LAN from a rogue device, and what it costs reachd in memory. Shared
//! by lab scenario 31 (which checks reachd's decisions throughout) and the bench's `flood` part
//! (which measures the release agent at several rates), so that both flood alike and read
//! memory alike.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::lab::forge::{self, Mix, Rng};
use crate::lab::rogue::{Rogue, Sent};
use crate::lab::Lab;

/// The same packets every run, so that runs compare; each flood of a run its own names (see
/// [`FLOODS`]).
const SEED: u64 = 0x5eed_f100d;
/// Floods so far in this process: a flood again is of new names, not the last flood's again.
static FLOODS: AtomicU64 = AtomicU64::new(0);
/// Below this share of the stated rate, the flood is not the one stated.
const MIN_RATE_SHARE: f64 = 0.9;

/// A process's memory, from /proc/PID/status, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss: u64,
    /// RssAnon: resident anonymous memory (heap and stacks, not code pages).
    pub anon: u64,
    /// VmHWM: the peak resident set (since the process started or the last reset).
    pub peak: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Memory, String> {
        let path = format!("/proc/{pid}/status");
        let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss: field("VmRSS")?,
            anon: field("RssAnon")?,
            peak: field("VmHWM")?,
        })
    }
}

/// Resets the process's VmHWM to its current RSS (clear_refs "5"), so that the peak read later
/// is that of what came after, not of what came before.
fn reset_peak(pid: u32) -> Result<(), String> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").map_err(|e| format!("{path}: {e}"))
}

/// KiB as MiB, for reports.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A flood: how fast, how long, what.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rate: u32,
    pub period: Duration,
    pub mix: Mix,
}

/// What a flood sent, and reachd's memory around it.
pub struct Flooded {
    pub sent: Sent,
    pub before: Memory,
    /// After the flood; its `peak` is the flood's (reset when it began).
    pub after: Memory,
    /// The largest RssAnon seen while the flood went on (read every 250 ms).
    pub max_anon: u64,
}

impl Flooded {
    pub fn rate(&self) -> f64 {
        self.sent.packets as f64 / self.sent.took.as_secs_f64()
    }

    /// The figures, in words.
    pub fn describe(&self) -> String {
        format!(
            "{} packets in {:.1} s ({:.0}/s, {} send errors); reachd's peak RSS {} (VmHWM, reset \
             as the flood began, RSS {} then); anonymous memory {} before, at most {} during, {} \
             after",
            self.sent.packets,
            self.sent.took.as_secs_f64(),
            self.rate(),
            self.sent.failed_sends,
            mib(self.after.peak),
            mib(self.before.rss),
            mib(self.before.anon),
            mib(self.max_anon),
            mib(self.after.anon),
        )
    }
}

/// Floods the home LAN as `plan` says (see [`forge::flood_packet`]) while `watch` runs every
/// 250 ms, then says goodbye for the forged `rpi.local` addresses.
/// Reads reachd's (`pid`) memory before, during and after. Fails if `watch` does, or if the
/// flood fell short of its rate.
pub fn flood(
    lab: &Lab,
    pid: u32,
    plan: Plan,
    mut watch: impl FnMut() -> Result<(), String>,
) -> Result<Flooded, String> {
    let before = Memory::of(pid)?;
    reset_peak(pid)?;
    let rogue = Rogue::plug_in(lab)?;
    // Seeds two apart: the generator sets a seed's lowest bit.
    let mut rng = Rng::new(SEED + 2 * FLOODS.fetch_add(1, Ordering::Relaxed));
    let mut max_anon = before.anon;
    let sent = rogue.send_while(
        plan.rate,
        plan.period,
        |n| forge::flood_packet(&mut rng, n, plan.mix),
        || {
            max_anon = max_anon.max(Memory::of(pid)?.anon);
            watch()
        },
    );
    // So that no later check asks the forged addresses.
    let goodbyes = rogue.send_to_laptop(&forge::flood_goodbyes());
    drop(rogue);
    let after = Memory::of(pid)?;
    let flooded = Flooded {
        sent: sent?,
        before,
        after,
        max_anon: max_anon.max(after.anon),
    };
    goodbyes?;
    if flooded.rate() < f64::from(plan.rate) * MIN_RATE_SHARE {
        return Err(format!(
            "the flood fell short of {}/s: {}",
            plan.rate,
            flooded.describe()
        ));
    }
    Ok(flooded)
}
