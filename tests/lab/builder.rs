//! The Pi as the laptop's remote builder (docs/remote-builder.md): root lists it in the laptop
//! daemon's machines file, reachd's `[host.builder]` switches remote builds off while it is not
//! reachable. At home a build of the untrusted lab user runs on the Pi, with no option; the
//! user cannot make the daemon build on a machine root did not list; away, builds run here
//! without asking the Pi; after the Pi lost power or its sshd froze, builds run here, none
//! failing: those started
//! before reachd switched remote builds off (its cache hears the Pi go silent when Nix asks it,
//! within about half a second) wait at most root's connect timeout for the Pi, those after it
//! not at all.

use std::time::{Duration, Instant};

use reachd_testkit::lab::nix::vanish::Fault;
use reachd_testkit::lab::nix::{pi_machine_line, BuiltOn, Timed, CONNECT_TIMEOUT};
use reachd_testkit::lab::{secs, Lab, HOME_UUID, T};

use crate::scenarios::baseline;

/// Beyond root's connect timeout, how much longer than a build that never asks a builder one
/// may take in the vanish window (a build away: this alone).
const EXTRA: Duration = Duration::from_secs(1);
/// How long builds are started after the Pi went.
const WINDOW: Duration = Duration::from_secs(8);
/// The argument that keeps a build from asking any builder: what the others are compared with.
const NO_BUILDERS: [&str; 2] = ["--builders", ""];

pub fn nix_builder(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.list_pi_builder(true)?;
    let outcome = with_builder(lab);
    // Whatever happened: root's list and reachd's config as the other scenarios have them.
    let restored = restore(lab);
    let report = outcome?;
    restored?;
    Ok(report)
}

fn with_builder(lab: &mut Lab) -> Result<String, String> {
    lab.use_pi_builder(true)?;
    lab.expect_builders_off(false, T)?;

    // Home: the Pi builds, for the untrusted user, with no option.
    let (home, on) = lab.build_telling_where("home", &[]);
    built(&home, on, BuiltOn::Pi, "at home")?;

    // Root lists no builder: the user naming the Pi does not make the daemon use it.
    lab.list_pi_builder(false)?;
    let line = pi_machine_line();
    let (own, on) = lab.build_telling_where("own", &["--builders", &line]);
    lab.list_pi_builder(true)?;
    built(&own, on, BuiltOn::Laptop, "with the user's own --builders")?;

    // Away: reachd switches remote builds off; builds run here at once.
    lab.nmcli_con("down", HOME_UUID)?;
    lab.expect_down(T, "home down (builder)")?;
    lab.expect_builders_off(true, T)?;
    let mut away = Vec::new();
    for i in 0..3 {
        away.push(pair(lab, &format!("away-{i}"), "away")?);
    }
    let away_worst = away.iter().max().copied().unwrap_or_default();
    if away_worst > EXTRA {
        return Err(format!(
            "away, a build took {} longer than one asking no builder",
            secs(away_worst)
        ));
    }
    lab.nmcli_con("up", HOME_UUID)?;
    lab.expect_up(T, "back home (builder)")?;
    lab.expect_builders_off(false, T)?;
    let (back, on) = lab.build_telling_where("back", &[]);
    built(&back, on, BuiltOn::Pi, "back home")?;

    let mut faults = Vec::new();
    for fault in Fault::ALL {
        faults.push(vanish(lab, fault)?);
    }
    Ok(format!(
        "home: built on the Pi in {}; the user's own builder not used; away: worst extra {} over \
         3 builds; {}",
        secs(home.took),
        secs(away_worst),
        faults.join("; ")
    ))
}

/// The Pi goes (`fault`), the link stays up: builds from that moment on, while a watcher times
/// reachd's switch; then the Pi comes back and is used again.
fn vanish(lab: &Lab, fault: Fault) -> Result<String, String> {
    let what = fault.name();
    // The cache in use, as at home: Nix asking it is what makes reachd hear the Pi go at once.
    lab.pi_cache_back_in_use()
        .map_err(|e| format!("before the {what}: {e}"))?;
    let start = Instant::now();
    let healing = fault.inflict(lab)?;
    let (window, off_after) = std::thread::scope(|s| {
        let watcher = s.spawn(|| lab.expect_builders_off(true, T).map(|()| start.elapsed()));
        let mut window = Vec::new();
        let mut i = 0;
        while start.elapsed() < WINDOW {
            let started = start.elapsed();
            let tag = format!("{}-{i}", what.replace(' ', "-"));
            match pair(lab, &tag, &format!("after the {what}")) {
                Ok(extra) => window.push((extra, started)),
                Err(e) => return (Err(e), Ok(Duration::ZERO)),
            }
            i += 1;
        }
        let off_after = watcher
            .join()
            .unwrap_or_else(|_| Err("the watcher panicked".into()));
        (Ok(window), off_after)
    });
    drop(healing);
    lab.pi_port(true)?;
    let window = window?;
    let off_after = off_after.map_err(|e| format!("after the {what}: {e}"))?;
    // The builds started after the switch, which must not have asked the Pi at all.
    let after_switch: Vec<Duration> = window
        .iter()
        .filter(|(_, started)| *started > off_after)
        .map(|(extra, _)| *extra)
        .collect();
    let mut extra: Vec<Duration> = window.into_iter().map(|(extra, _)| extra).collect();
    extra.sort();
    let worst = extra.last().copied().unwrap_or_default();
    if worst > CONNECT_TIMEOUT + EXTRA {
        return Err(format!(
            "after the {what}, a build took {} longer than one asking no builder (root's \
             connect timeout is {})",
            secs(worst),
            secs(CONNECT_TIMEOUT)
        ));
    }
    let worst_after = after_switch.iter().max().copied().unwrap_or_default();
    if worst_after > EXTRA {
        return Err(format!(
            "after the {what}, once reachd switched remote builds off, a build took {} longer \
             than one asking no builder",
            secs(worst_after)
        ));
    }
    lab.expect_builders_off(false, Duration::from_secs(30))
        .map_err(|e| format!("the Pi back after the {what}: {e}"))?;
    let (back, on) = lab.build_telling_where("back", &[]);
    built(&back, on, BuiltOn::Pi, &format!("back after the {what}"))?;
    Ok(format!(
        "{what}: remote builds off {} after, {} builds, extra worst {} median {}, worst of the \
         {} started after the switch {}",
        secs(off_after),
        extra.len(),
        secs(worst),
        secs(extra[extra.len() / 2]),
        after_switch.len(),
        secs(worst_after)
    ))
}

/// A build with reachd's fragment, then one that asks no builder; both must run here. How much
/// longer the first took.
fn pair(lab: &Lab, tag: &str, when: &str) -> Result<Duration, String> {
    let (with, on) = lab.build_telling_where(tag, &[]);
    built(&with, on, BuiltOn::Laptop, when)?;
    let (without, on) = lab.build_telling_where(&format!("{tag}-none"), &NO_BUILDERS);
    built(
        &without,
        on,
        BuiltOn::Laptop,
        &format!("{when}, asking no builder"),
    )?;
    Ok(with.took.saturating_sub(without.took))
}

/// The build succeeded, on `wanted`.
fn built(build: &Timed, on: Option<BuiltOn>, wanted: BuiltOn, when: &str) -> Result<(), String> {
    if let Some(why) = &build.failure {
        return Err(format!("{when}: the build failed: {why}"));
    }
    match on {
        Some(on) if on == wanted => Ok(()),
        other => Err(format!(
            "{when}: built on {other:?}, not {wanted:?} ({} s)",
            build.took.as_secs_f64()
        )),
    }
}

/// The lab's own configuration again (no builder) and no machine listed.
fn restore(lab: &mut Lab) -> Result<(), String> {
    lab.pi_port(true)?;
    lab.use_pi_builder(false)?;
    lab.expect_builders_off(false, T)?;
    baseline(lab)
}
