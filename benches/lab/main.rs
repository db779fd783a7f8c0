//! `cargo bench --bench lab` (as root): reachd against the NetworkManager dispatcher script it
//! replaces, side by side in the end-to-end lab of tests/lab (real NetworkManager, nm-dispatcher,
//! systemd --user, avahi and nss-mdns in network namespaces), with NetworkManager's own notice of
//! each change as the floor. It prints one table, reachd's costs at rest, with many hosts and
//! under an mDNS flood, the machine, and how each figure was taken. Not a test: it asserts nothing, but says which of
//! reachd's targets a figure misses. About 7 minutes; it cleans up like the lab, also on failure
//! (and a run that was killed is cleaned up by the next bench or lab run, from its markers).

mod battery;
mod builder;
mod flood;
mod measure;
mod nix;
mod report;
mod watch;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use measure::{Watchers, CYCLES};
use reachd_testkit::lab::bench::{PiNames, TARGET};
use reachd_testkit::lab::{self, cleanup, preflight, Binaries, Lab};
use reachd_testkit::process::wait_until;
use report::Report;
use watch::Events;

/// The whole run must end before this (it takes about 7 minutes).
const BUDGET: Duration = Duration::from_secs(20 * 60);
/// How long reachd is watched at rest.
const IDLE: Duration = Duration::from_secs(60);
/// Configured hosts for the link-up measurement.
const HOST_COUNTS: [usize; 3] = [1, 10, 50];

fn main() -> ExitCode {
    // The watchers are this binary run again (see watch.rs).
    if let Some(kind @ ("watch-units" | "watch-nm")) = std::env::args().nth(1).as_deref() {
        return watch::main(kind);
    }
    preflight::fix_path();
    let problems = report::problems();
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("bench: cannot run: {p}");
        }
        return ExitCode::FAILURE;
    }
    cleanup::watchdog(BUDGET, "bench", || println!("bench: FAILED: timed out"));
    let started = Instant::now();
    let bins = Binaries {
        reachd: Path::new(env!("CARGO_BIN_EXE_reachd")),
        upload_hook: Path::new(env!("CARGO_BIN_EXE_reachd-nix-upload")),
    };
    eprintln!("bench: building the lab in {} ...", lab::DIR);
    // `cargo bench --bench lab -- nix` (or `-- flood`, `-- battery`, `-- builder`): only that
    // part.
    let only = std::env::args()
        .skip(1)
        .find(|a| ["nix", "flood", "battery", "builder"].contains(&a.as_str()));
    let result = Lab::build_with(bins, false).and_then(|mut lab| {
        let report = match only.as_deref() {
            Some("nix") => nix::run(&mut lab).map(|nix| Report {
                nix: Some(nix),
                ..Report::default()
            }),
            Some("battery") => battery::run(&mut lab).map(|battery| Report {
                battery: Some(battery),
                ..Report::default()
            }),
            Some("builder") => builder::run(&mut lab).map(|builder| Report {
                builder: Some(builder),
                ..Report::default()
            }),
            Some(_) => flood::run(&mut lab).map(|flood| Report {
                flood: Some(flood),
                ..Report::default()
            }),
            None => run(&mut lab),
        };
        if report.is_err() {
            if let Some(u) = &lab.user {
                let log = u.reachd_log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("bench: last lines of reachd's log:");
                for line in tail.iter().rev() {
                    eprintln!("  {line}");
                }
            }
        }
        eprintln!("bench: tearing down");
        drop(lab);
        report
    });
    match result {
        Ok(report) if only.is_some() => {
            report.print_parts();
            println!("(whole run: {:.0} s)", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            report.print(started.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            cleanup::recover();
            println!("bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(lab: &mut Lab) -> Result<Report, String> {
    let mut report = Report::default();
    let user = lab.user();
    user.bare_target()?;
    user.configure_reachd(None)?;
    user.stop_reachd()?; // Not started yet (nothing activates it); make sure.
    let mut w = Watchers {
        units: Events::units(lab)?,
        nm: Events::nm(lab)?,
    };

    eprintln!("bench: the old dispatcher script ({CYCLES} cycles; reachd stopped)");
    {
        let _old_way = lab.install_old_way()?;
        // Warm-up, not counted: nm-dispatcher is activated on the first event.
        lab.nmcli_con("down", lab::HOME_UUID)?;
        lab.nmcli_con("up", lab::HOME_UUID)?;
        wait_target_active(lab, "the script starting the target")?;
        measure::cycles(lab, &mut w, CYCLES, &mut report.script)?;
        // Let a script still running finish before its avahi goes.
        std::thread::sleep(Duration::from_secs(6));
    }

    eprintln!("bench: reachd, embedded default configuration ({CYCLES} cycles)");
    let nm_pid = lab
        .nm
        .as_ref()
        .ok_or("NetworkManager is not running")?
        .pid();
    report.udp_without = Some(measure::udp_noise(nm_pid, Duration::from_secs(10))?);
    let user = lab.user();
    user.systemctl(&["stop", TARGET])?;
    let pid = user.start_reachd()?;
    wait_target_active(lab, "reachd starting the target")?;
    measure::cycles(lab, &mut w, CYCLES, &mut report.reachd)?;
    wait_target_active(lab, "the target active before the idle period")?;
    eprintln!("bench: reachd at rest for {} s", IDLE.as_secs());
    report.idle = Some(measure::idle(pid, nm_pid, IDLE)?);

    let mut names = PiNames::default();
    for count in HOST_COUNTS {
        eprintln!("bench: reachd with {count} configured hosts, link up ({CYCLES} cycles)");
        let hosts: Vec<String> = (1..=count).map(|i| format!("h{i}")).collect();
        let targets: Vec<String> = hosts
            .iter()
            .map(|h| format!("{h}-accessible.target"))
            .collect();
        let user = lab.user();
        user.stop_reachd()?;
        names.publish(lab, &hosts)?;
        let user = lab.user();
        user.configure_reachd(Some(&hosts))?;
        let pid = user.start_reachd()?;
        wait_until(
            Duration::from_secs(30),
            "every host's target active",
            || {
                let units = lab
                    .user()
                    .units(&targets.iter().map(String::as_str).collect::<Vec<_>>())?;
                let active = units
                    .values()
                    .filter(|p| p["ActiveState"] == "active")
                    .count();
                if active == count {
                    Ok(Some(()))
                } else {
                    Err(format!("{active} of {count} active"))
                }
            },
        )?;
        let link_up = measure::link_up(lab, &mut w, pid, &targets, CYCLES)?;
        report.link_up.push((count, link_up));
    }
    lab.user().stop_reachd()?;
    drop(names);
    report.nix = Some(nix::run(lab)?);
    report.battery = Some(battery::run(lab)?);
    report.builder = Some(builder::run(lab)?);
    report.flood = Some(flood::run(lab)?);
    Ok(report)
}

fn wait_target_active(lab: &Lab, what: &str) -> Result<(), String> {
    wait_until(lab::T, what, || {
        Ok((lab.user().active_state(TARGET)? == "active").then_some(()))
    })
}
