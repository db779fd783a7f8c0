//! The vanish window (docs/nix-vanish-window.md): the Pi goes while the laptop's link stays up
//! (its power lost, or its sshd frozen: a tunnel that accepts and never answers), and builds
//! started from that moment on, one every 100 ms for 10 s, alternately with the Pi's cache and
//! without it, must all succeed, none with the Pi waiting more than a second longer than those
//! without it beside it; with the cache as the only substituter and with a second one after
//! it. A path the Pi has, asked for right after, is
//! built instead. At home, the cost of asking the Pi first is measured and printed.

use std::time::{Duration, Instant};

use reachd_testkit::lab::nix::{derivation_expr, extra_wait, nonce, Caches, Spread, Timed};
use reachd_testkit::lab::{Lab, T};
use reachd_testkit::process::Frozen;

use crate::scenarios::{baseline, secs};

/// How often a build starts in the window (alternately with the Pi and without), and for how
/// long. A build of a trivial derivation costs the lab machine about 0.1 CPU-second (the client's
/// evaluation, the daemon's worker, the builder, the post-build hook): one every 50 ms saturates
/// a 2-CPU machine within a second, and then every build waits for the CPU, not for the Pi.
const EVERY: Duration = Duration::from_millis(100);
const WINDOW: Duration = Duration::from_secs(10);
/// The promise: no build in the window waits longer than this beyond the slowest of the same
/// builds without the Pi started near it (within [`NEAR`]).
const EXTRA: Duration = Duration::from_secs(1);
const NEAR: Duration = Duration::from_millis(500);
/// Builds at home, with the include and without, for the cost of asking the Pi first.
const HOME_BUILDS: usize = 10;
/// How long the Pi may take to be back in use after the fault is healed.
const BACK: Duration = Duration::from_secs(30);

const ALONE: Caches = Caches {
    pi: true,
    stand_in: false,
};
const WITH_STAND_IN: Caches = Caches {
    pi: true,
    stand_in: true,
};

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The Pi's switch port goes down: no goodbye, the laptop's link stays up.
    PowerLoss,
    /// Every sshd process of the Pi is stopped: the tunnel's socket accepts, nothing answers.
    SshdFrozen,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::PowerLoss => "power loss",
            Fault::SshdFrozen => "sshd frozen",
        }
    }

    /// Brings the fault about; what it returns, dropped, ends a frozen sshd.
    fn inflict(self, lab: &Lab) -> Result<Option<Frozen>, String> {
        match self {
            Fault::PowerLoss => lab.pi_port(false).map(|()| None),
            Fault::SshdFrozen => {
                let sshd = lab.sshd.as_ref().ok_or("sshd is not running")?.pid();
                Ok(Some(Frozen::tree(sshd)))
            }
        }
    }
}

pub fn nix_vanish_window(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    back_in_use(lab)?;
    let mut report = vec![home_cost(lab)?];
    for fault in [Fault::PowerLoss, Fault::SshdFrozen] {
        for caches in [ALONE, WITH_STAND_IN] {
            let line = window(lab, fault, caches)?;
            eprintln!("lab: 28: {line}");
            report.push(line);
        }
    }
    Ok(report.join("; "))
}

/// Home, the Pi's cache in use (the scenario starts and goes on only from there).
fn back_in_use(lab: &Lab) -> Result<(), String> {
    lab.expect_fragment(true, BACK)?;
    lab.expect_nix_in_use(true, T).map(drop)
}

/// At home, the Pi present: builds of new derivations with the include and without, one at a
/// time, alternating. Printed, not judged: a figure for the README's Performance.
fn home_cost(lab: &Lab) -> Result<String, String> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..HOME_BUILDS {
        for (caches, into) in [(ALONE, &mut with), (no_pi(ALONE), &mut without)] {
            let build = lab.build_new(&format!("home-{i}"), caches);
            if let Some(why) = &build.failure {
                return Err(format!("at home, a build failed: {why}"));
            }
            into.push(build);
        }
    }
    let (with, without) = (Spread::of(&with), Spread::of(&without));
    let cost = with.median.as_secs_f64() - without.median.as_secs_f64();
    Ok(format!(
        "at home, a new derivation built in {} with the Pi's cache asked first, {} without \
         (medians of {HOME_BUILDS}: {:+.0} ms, {:+.1} %)",
        secs(with.median),
        secs(without.median),
        cost * 1000.0,
        100.0 * cost / without.median.as_secs_f64()
    ))
}

/// `caches` without the Pi: the user's nix.conf without reachd's include.
fn no_pi(caches: Caches) -> Caches {
    Caches {
        pi: false,
        ..caches
    }
}

/// One fault: from its moment on, a build every [`EVERY`] for [`WINDOW`], alternately with the
/// Pi's cache and without (the same load on both), and at once one of a derivation whose
/// output the Pi has; then the fault healed. Each build with the Pi is compared with the
/// slowest of those without it that started within [`NEAR`] of it.
fn window(lab: &Lab, fault: Fault, caches: Caches) -> Result<String, String> {
    let what = format!(
        "{}, {}",
        fault.name(),
        if caches.stand_in {
            "with a second cache"
        } else {
            "the Pi's cache alone"
        }
    );
    back_in_use(lab).map_err(|e| format!("{what}: before: {e}"))?;
    let nonce = nonce();
    let shared = lab
        .pi_nix_build(&["shared"], &nonce)?
        .pop()
        .ok_or("the Pi built nothing")?;
    let shared_name = format!("p-shared-{nonce}");
    let started = Instant::now();
    let frozen = fault.inflict(lab)?;
    let (builds, pi_has) = std::thread::scope(|s| {
        let pi_has =
            s.spawn(|| lab.build_expr(&derivation_expr(&shared_name, &shared_name), caches));
        let tag = format!("{}-{}", fault.name().replace(' ', "-"), caches.stand_in);
        let builds = lab.builds_every(&tag, EVERY, WINDOW, &[caches, no_pi(caches)]);
        (builds, pi_has.join())
    });
    let window_took = started.elapsed();
    drop(frozen);
    lab.pi_port(true)?;
    let pi_has = pi_has.map_err(|_| "the build's thread panicked".to_string())?;
    // REACHD_LAB_VANISH_DETAIL=1: every build's start, time and caches, to stderr.
    if std::env::var_os("REACHD_LAB_VANISH_DETAIL").is_some() {
        for b in &builds {
            let (at, took) = (b.at.as_secs_f64(), b.took.as_secs_f64());
            eprintln!("{what}: at {at:.2} s took {took:.2} s, Pi {}", b.caches.pi);
        }
    }
    let (with, without): (Vec<Timed>, Vec<Timed>) = builds.into_iter().partition(|b| b.caches.pi);
    let mut extra: Vec<Duration> = with.iter().map(|b| extra_wait(b, &without, NEAR)).collect();
    extra.sort();
    let worst_extra = extra.last().copied().unwrap_or_default();
    let pi_has_extra = extra_wait(&pi_has, &without, NEAR);
    let (with_spread, without_spread) = (Spread::of(&with), Spread::of(&without));
    let back = back_in_use(lab).map_err(|e| format!("{what}: after healing: {e}"));
    let line = format!(
        "{what}: {} builds with the Pi and {} without in {}, worst {} and {}, medians {} and \
         {}; extra wait worst {}, median {}; the Pi's {shared} right after: {} in {} (+{})",
        with_spread.count,
        without_spread.count,
        secs(window_took),
        secs(with_spread.worst),
        secs(without_spread.worst),
        secs(with_spread.median),
        secs(without_spread.median),
        secs(worst_extra),
        secs(extra.get(extra.len() / 2).copied().unwrap_or_default()),
        outcome(lab, &shared, &pi_has),
        secs(pi_has.took),
        secs(pi_has_extra),
    );
    let failures: Vec<&String> = with_spread
        .failures
        .iter()
        .chain(&without_spread.failures)
        .collect();
    if let Some(first) = failures.first() {
        return Err(format!(
            "{line}: {} builds failed, the first {first}",
            failures.len()
        ));
    }
    if let Some(why) = &pi_has.failure {
        return Err(format!("{line}: the Pi's path failed: {why}"));
    }
    if worst_extra > EXTRA || pi_has_extra > EXTRA {
        return Err(format!("{line}: more than {} extra", secs(EXTRA)));
    }
    back?;
    Ok(line)
}

/// What became of the Pi's path: fetched from the Pi (its signature came along) or built here.
fn outcome(lab: &Lab, path: &str, build: &Timed) -> &'static str {
    if build.failure.is_some() {
        return "FAILED";
    }
    match lab.nix_as_user(&["nix", "path-info", "--sigs", path], T) {
        Ok(info) if info.stdout.contains("pi-1:") => "fetched from the Pi",
        Ok(info) if info.code == 0 => "built here",
        _ => "not valid here",
    }
}
