//! The flood part of the bench (`cargo bench --bench lab -- flood`): the release agent's memory
//! under a 30 s mDNS flood on the home LAN from a rogue device (the flood of lab scenario 31, at
//! two rates, and its answers for random names alone, to show where the memory goes), against
//! reachd's target of a peak RSS under 16 MiB; and, after the last flood, its memory once the
//! flood's records have outlived their TTL, and under the same flood again (does it grow on?).

use std::thread;
use std::time::Duration;

use reachd_testkit::lab::bench::TARGET;
use reachd_testkit::lab::flood::{flood, mib, Flooded, Memory, Plan};
use reachd_testkit::lab::forge::{Mix, TTL};
use reachd_testkit::lab::{Lab, T};
use reachd_testkit::process::wait_until;

const PERIOD: Duration = Duration::from_secs(30);
/// The floods: every kind of packet at 200/s and 2,000/s (a busy LAN's mDNS is tens of packets
/// per second); between them, only the answers for random names that the 2,000/s flood holds
/// (a quarter of it).
const PLANS: [Plan; 3] = [
    Plan {
        rate: 200,
        period: PERIOD,
        mix: Mix::Full,
    },
    Plan {
        rate: 500,
        period: PERIOD,
        mix: Mix::RandomNames,
    },
    Plan {
        rate: 2_000,
        period: PERIOD,
        mix: Mix::Full,
    },
];
/// reachd at rest after its start, before the flood.
const SETTLE: Duration = Duration::from_secs(10);
/// reachd's target for its peak resident memory, under the flood too.
const PEAK_TARGET_KIB: u64 = 16 * 1024;

/// One flood: its plan, what it did, and how many of the looks taken during it found the
/// target not active (reachd's decisions, which the lab's scenario 31 asserts).
pub struct Run {
    plan: Plan,
    at_rest: Memory,
    flooded: Flooded,
    target_down_looks: u32,
}

#[derive(Default)]
pub struct FloodReport {
    runs: Vec<Run>,
    /// After the last flood, once its records' TTL has run out.
    after_ttl: Option<Memory>,
    /// The last flood again, then, in the same process.
    again: Option<Flooded>,
}

pub fn run(lab: &mut Lab) -> Result<FloodReport, String> {
    let user = lab.user();
    user.bare_target()?;
    user.configure_reachd(None)?;
    let mut report = FloodReport::default();
    let mut pid = 0;
    for plan in PLANS {
        eprintln!(
            "bench: a {} s mDNS flood at {}/s, {:?} (reachd restarted before)",
            PERIOD.as_secs(),
            plan.rate,
            plan.mix
        );
        pid = fresh_reachd(lab)?;
        thread::sleep(SETTLE);
        let at_rest = Memory::of(pid)?;
        let mut target_down_looks = 0;
        let flooded = flood(lab, pid, plan, || {
            if lab.user().active_state(TARGET)? != "active" {
                target_down_looks += 1;
            }
            Ok(())
        })?;
        eprintln!("bench:   {}", flooded.describe());
        report.runs.push(Run {
            plan,
            at_rest,
            flooded,
            target_down_looks,
        });
    }
    // mdns-sd evicts a record when its TTL has run out (at its next loop, which packets wake).
    let wait = Duration::from_secs(u64::from(TTL) + 10);
    eprintln!(
        "bench: waiting {} s for the flood's records to expire",
        wait.as_secs()
    );
    thread::sleep(wait);
    report.after_ttl = Some(Memory::of(pid)?);
    let last = PLANS[PLANS.len() - 1];
    eprintln!("bench: the last flood again, same reachd");
    report.again = Some(flood(lab, pid, last, || Ok(()))?);
    lab.user().stop_reachd()?;
    Ok(report)
}

/// Starts reachd anew (the embedded default configuration) and waits for the target.
fn fresh_reachd(lab: &Lab) -> Result<u32, String> {
    let user = lab.user();
    user.stop_reachd()?;
    user.systemctl(&["stop", TARGET])?;
    let pid = user.start_reachd()?;
    wait_until(T, "reachd starting the target", || {
        Ok((lab.user().active_state(TARGET)? == "active").then_some(()))
    })?;
    Ok(pid)
}

impl FloodReport {
    pub fn print(&self) {
        println!();
        println!(
            "mDNS flood on the home LAN, {} s, release reachd restarted before each rate \
             (target: peak RSS < {})",
            PERIOD.as_secs(),
            mib(PEAK_TARGET_KIB)
        );
        println!("| flood | sent | peak RSS (VmHWM) | RSS at rest before | anonymous: before / max during / after | looks with target not active | target |");
        println!("|---|---|---|---|---|---|---|");
        for r in &self.runs {
            let f = &r.flooded;
            let met = f.after.peak < PEAK_TARGET_KIB;
            println!(
                "| {}/s, {} | {} in {:.1} s ({:.0}/s) | {} | {} | {} / {} / {} | {} of {} | {} |",
                r.plan.rate,
                match r.plan.mix {
                    Mix::Full => "every kind",
                    Mix::RandomNames => "answers for random names only",
                },
                f.sent.packets,
                f.sent.took.as_secs_f64(),
                f.rate(),
                mib(f.after.peak),
                mib(r.at_rest.rss),
                mib(f.before.anon),
                mib(f.max_anon),
                mib(f.after.anon),
                r.target_down_looks,
                f.sent.watched,
                if met { "met" } else { "MISSED" }
            );
        }
        if let Some(m) = &self.after_ttl {
            println!(
                "{} s after the last flood (its records' TTL is {TTL} s): RSS {}, anonymous {}",
                TTL + 10,
                mib(m.rss),
                mib(m.anon)
            );
        }
        if let Some(f) = &self.again {
            println!(
                "then the same flood again, same process: peak RSS {} (VmHWM, reset as it began), \
                 anonymous at most {}, {} after",
                mib(f.after.peak),
                mib(f.max_anon),
                mib(f.after.anon)
            );
        }
        println!("how: reachd's MainPID's /proc/PID/status; VmHWM reset (clear_refs 5) as each flood began; \
                  anonymous = RssAnon, read every 250 ms during the flood; the flood is a rogue namespace on the \
                  home bridge sending, in turn (every kind), an A answer for a random name (TTL {TTL} s), a random service's \
                  PTR/SRV/TXT and a question for a random name to 224.0.0.251, and an answer for rpi.local at an \
                  unheld home address to the laptop; the Pi stays present.");
    }
}
