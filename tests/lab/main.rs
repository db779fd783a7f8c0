//! reachd's end-to-end lab: the real NetworkManager, systemd --user, avahi, sshd and sshfs in
//! network namespaces (testkit/src/lab/ has the topology and the recipe), with reachd running
//! as the test user's service from the repo's systemd/ units. The scenarios are here; the lab
//! itself is in reachd-testkit, shared with the benchmark.
//!
//! `cargo test --test lab [-- SUBSTRING...]` as root. It builds the lab once, runs the lab's
//! self-check and coldplug, then the scenarios whose names contain one of the substrings (all
//! without any), printing one line each and then `N passed, M failed`; exit status 1 on any
//! failure. The laptop runs the machine's Nix (Debian 12's 2.8) at first; then the Nix
//! scenarios (`-nix-` in their names) run again with a current Nix on the laptop, named
//! `12-nix-home (Nix 2.34.8)` and so on: Debian sid's, from the chroot tests/current-nix makes
//! (`REACHD_LAB_CURRENT_NIX`, default /var/lib/reachd-tests/nix-sid; the lab fails at once,
//! saying so, without it). It cleans up after itself even when a scenario fails or panics, and
//! at start after an earlier run that died. A watchdog ends a run that exceeds its time budget.
//! `REACHD_LAB_LOGS=DIR` keeps the daemons' logs and reachd's (copied to DIR before cleanup);
//! `REACHD_LAB_RUST_LOG=FILTER` is reachd's `RUST_LOG` (e.g. `reachd=debug`).
//!
//! Never run two labs at once on one machine: each starts by removing the other's leftovers.

mod builder;
mod doctor;
mod firewall;
mod hostile_lan;
mod nix;
mod reliability;
mod reload;
mod scenarios;
mod status_bar;
mod stress;
mod upload;
mod vanish;

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reachd_testkit::lab::nix::LaptopNix;
use reachd_testkit::lab::{self, cleanup, preflight, Binaries, Lab};
use scenarios::{tail, Scenario, SCENARIOS};

/// The whole run, lab included, must end before this. A normal run takes about eight minutes;
/// the scenarios' own deadlines (a fetch may take a minute before it counts as hung, a drain
/// may wait out an upload's backoff) need room beyond that on a slow machine, within CI's
/// budget of 30 minutes for two runs.
const BUDGET: Duration = Duration::from_secs(18 * 60);

fn main() -> ExitCode {
    preflight::fix_path();
    let filters = filters(std::env::args().skip(1));
    let problems = preflight::problems();
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("lab: cannot run: {p}");
        }
        println!("0 passed, 1 failed");
        return ExitCode::FAILURE;
    }
    let (Some(reachd), Some(upload_hook)) = (
        option_env!("CARGO_BIN_EXE_reachd"),
        option_env!("CARGO_BIN_EXE_reachd-nix-upload"),
    ) else {
        eprintln!(
            "lab: cannot run: the crate lacks the `reachd` or `reachd-nix-upload` binary target"
        );
        println!("0 passed, 1 failed");
        return ExitCode::FAILURE;
    };
    let current_nix = LaptopNix::current().expect("preflight found the current Nix");
    let bins = Binaries {
        reachd: Path::new(reachd),
        upload_hook: Path::new(upload_hook),
    };
    cleanup::watchdog(BUDGET, "lab", || {
        println!("lab: FAILED: timed out");
        println!("0 passed, 1 failed");
    });
    let started = Instant::now();
    eprintln!("lab: building the lab in {} ...", lab::DIR);
    let built = panic::catch_unwind(|| Lab::build(bins));
    let mut lab = match built {
        Ok(Ok(lab)) => lab,
        Ok(Err(e)) => return setup_failed(&e),
        Err(p) => return setup_failed(&panic_message(p.as_ref())),
    };
    eprintln!("lab: built in {:.1} s", started.elapsed().as_secs_f64());
    let mut tally = Tally::default();
    for (name, always, scenario) in SCENARIOS {
        if *always || selected(&filters, name) {
            tally.run(&mut lab, name, *always, *scenario);
        }
    }
    // The Nix scenarios again, with the current Nix on the laptop.
    let again: Vec<(String, Scenario)> = SCENARIOS
        .iter()
        .filter(|(name, ..)| name.contains("-nix-"))
        .map(|(name, _, s)| (format!("{name} ({})", current_nix.label()), *s))
        .filter(|(name, _)| selected(&filters, name))
        .collect();
    if !again.is_empty() {
        eprintln!(
            "lab: the laptop's Nix is now {} ({})",
            current_nix.label(),
            current_nix
                .root
                .as_deref()
                .unwrap_or(Path::new("/"))
                .display()
        );
        if let Err(e) = lab.use_laptop_nix(current_nix.clone()) {
            tally.blocked.get_or_insert(format!(
                "not run: the laptop's {} did not start: {e}",
                current_nix.label()
            ));
        }
        for (name, scenario) in &again {
            tally.run(&mut lab, name, false, *scenario);
        }
    }
    let Tally { passed, failed, .. } = tally;
    if failed > 0 {
        if let Some(u) = &lab.user {
            eprintln!(
                "lab: last lines of reachd's log:\n{}",
                tail(&u.reachd_log(), 40)
            );
        }
    }
    eprintln!("lab: tearing down");
    drop(lab);
    eprintln!("lab: done in {:.1} s", started.elapsed().as_secs_f64());
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The scenarios' outcomes so far, and why the rest cannot run (a scenario that sets the stage
/// failed).
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    blocked: Option<String>,
}

impl Tally {
    /// Runs `scenario` (unless blocked) and prints its line.
    fn run(&mut self, lab: &mut Lab, name: &str, always: bool, scenario: Scenario) {
        let t = Instant::now();
        let outcome = match &self.blocked {
            Some(why) => Err(why.clone()),
            None => match panic::catch_unwind(AssertUnwindSafe(|| scenario(lab))) {
                Ok(r) => r,
                Err(p) => Err(format!("panicked: {}", panic_message(p.as_ref()))),
            },
        };
        match outcome {
            Ok(detail) => {
                self.passed += 1;
                println!("{name}: ok ({detail}) [{:.1} s]", t.elapsed().as_secs_f64());
            }
            Err(why) => {
                self.failed += 1;
                println!("{name}: FAILED: {why} [{:.1} s]", t.elapsed().as_secs_f64());
                if always {
                    // Without the lab or a running agent the rest would only repeat this.
                    self.blocked
                        .get_or_insert(format!("not run: {name} failed"));
                }
            }
        }
    }
}

/// Whether the scenario `name` runs: every one without filters, else those naming one.
fn selected(filters: &[String], name: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// The scenario filters among the arguments: libtest's own options (and their values, for those
/// that take one) are ignored, so `cargo test -- --test-threads 1` still runs everything.
fn filters(args: impl Iterator<Item = String>) -> Vec<String> {
    const WITH_VALUE: &[&str] = &[
        "--test-threads",
        "--skip",
        "--logfile",
        "--format",
        "--color",
        "-Z",
    ];
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if a.starts_with('-') {
            skip_next = WITH_VALUE.contains(&a.as_str());
        } else {
            out.push(a);
        }
    }
    out
}

fn setup_failed(why: &str) -> ExitCode {
    println!("lab setup: FAILED: {why}");
    eprintln!(
        "lab: logs of the lab's daemons were in {}/logs (removed)",
        lab::DIR
    );
    // The partial lab was dropped (and cleaned up) already; make sure of it.
    cleanup::recover();
    println!("0 passed, 1 failed");
    ExitCode::FAILURE
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}
