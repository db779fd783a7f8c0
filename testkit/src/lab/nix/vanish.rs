//! The vanish window (docs/nix-vanish-window.md), measured: the Pi goes while the laptop's link
//! stays up (its power lost, or its sshd frozen: a tunnel that accepts and never answers), and
//! builds of new derivations start from that moment on, one every [`EVERY`] for [`WINDOW`],
//! alternately with the Pi's cache and without it, while one build asks for a path the Pi has;
//! and, at home, the cost of asking the Pi first. Scenario 28 judges these figures, the bench
//! prints them (per Nix version, both).

use std::time::{Duration, Instant};

use super::builds::{derivation_expr, extra_wait, Caches, Spread, Timed};
use crate::lab::{secs, Lab, T};
use crate::process::Frozen;

/// How often a build starts in the window (alternately with the Pi and without), and for how
/// long. A build of a trivial derivation costs the lab machine about 0.1 CPU-second (the client's
/// evaluation, the daemon's worker, the builder, the post-build hook): one every 50 ms saturates
/// a 2-CPU machine within a second, and then every build waits for the CPU, not for the Pi.
pub const EVERY: Duration = Duration::from_millis(100);
pub const WINDOW: Duration = Duration::from_secs(10);
/// A build with the Pi is compared with the slowest of the builds without it that started
/// within this of it.
pub const NEAR: Duration = Duration::from_millis(500);
/// How long the Pi may take to be back in use after the fault is healed.
const BACK: Duration = Duration::from_secs(30);

/// The Pi's cache as the only substituter, and with a second one after it.
pub const ALONE: Caches = Caches {
    pi: true,
    stand_in: false,
};
pub const WITH_STAND_IN: Caches = Caches {
    pi: true,
    stand_in: true,
};

/// How the Pi goes.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The Pi's switch port goes down: no goodbye, the laptop's link stays up.
    PowerLoss,
    /// Every sshd process of the Pi is stopped: the tunnel's socket accepts, nothing answers.
    SshdFrozen,
}

impl Fault {
    pub const ALL: [Fault; 2] = [Fault::PowerLoss, Fault::SshdFrozen];

    pub fn name(self) -> &'static str {
        match self {
            Fault::PowerLoss => "power loss",
            Fault::SshdFrozen => "sshd frozen",
        }
    }

    /// Brings the fault about; what it returns, dropped, ends a frozen sshd (a power loss ends
    /// with `pi_port(true)`).
    pub fn inflict(self, lab: &Lab) -> Result<Option<Frozen>, String> {
        match self {
            Fault::PowerLoss => lab.pi_port(false).map(|()| None),
            Fault::SshdFrozen => {
                let sshd = lab.sshd.as_ref().ok_or("sshd is not running")?.pid();
                Ok(Some(Frozen::tree(sshd)))
            }
        }
    }
}

/// `caches` without the Pi: the user's nix.conf without reachd's include.
pub fn no_pi(caches: Caches) -> Caches {
    Caches {
        pi: false,
        ..caches
    }
}

/// One fault's window, measured.
#[derive(Debug)]
pub struct Window {
    /// "power loss, the Pi's cache alone".
    pub what: String,
    /// From the fault to the last build's end.
    pub took: Duration,
    pub with: Spread,
    pub without: Spread,
    /// Each build with the Pi: how much longer it took than its neighbours without ([`NEAR`]),
    /// sorted.
    pub extra: Vec<Duration>,
    /// The Pi's path, asked for at the fault's moment: its store path, the build, its extra.
    pub pi_has_path: String,
    pub pi_has: Timed,
    pub pi_has_extra: Duration,
    /// What became of the Pi's path: "fetched from the Pi", "built here", "not valid here",
    /// "FAILED".
    pub pi_has_outcome: &'static str,
    /// The Pi back in use after healing and a new path of its fetched from it, or why not.
    pub back: Result<(), String>,
}

impl Window {
    pub fn worst_extra(&self) -> Duration {
        self.extra.last().copied().unwrap_or_default()
    }

    pub fn median_extra(&self) -> Duration {
        self.extra
            .get(self.extra.len() / 2)
            .copied()
            .unwrap_or_default()
    }

    /// Every build that failed, those with the Pi first ("at T s: why").
    pub fn failures(&self) -> Vec<&String> {
        self.with
            .failures
            .iter()
            .chain(&self.without.failures)
            .collect()
    }

    /// The figures in one line.
    pub fn line(&self) -> String {
        format!(
            "{}: {} builds with the Pi and {} without in {}, worst {} and {}, medians {} and \
             {}; extra wait worst {}, median {}; the Pi's {} right after: {} in {} (+{})",
            self.what,
            self.with.count,
            self.without.count,
            secs(self.took),
            secs(self.with.worst),
            secs(self.without.worst),
            secs(self.with.median),
            secs(self.without.median),
            secs(self.worst_extra()),
            secs(self.median_extra()),
            self.pi_has_path,
            self.pi_has_outcome,
            secs(self.pi_has.took),
            secs(self.pi_has_extra),
        )
    }
}

/// Builds at home with the include and without, alternating.
#[derive(Debug)]
pub struct HomeCost {
    pub with: Spread,
    pub without: Spread,
}

impl HomeCost {
    /// The medians' difference, in seconds (negative when the Pi's builds were faster).
    pub fn cost(&self) -> f64 {
        self.with.median.as_secs_f64() - self.without.median.as_secs_f64()
    }

    pub fn line(&self) -> String {
        format!(
            "at home, a new derivation built in {} with the Pi's cache asked first, {} without \
             (medians of {}: {:+.0} ms, {:+.1} %)",
            secs(self.with.median),
            secs(self.without.median),
            self.with.count,
            self.cost() * 1000.0,
            100.0 * self.cost() / self.without.median.as_secs_f64()
        )
    }
}

impl Lab {
    /// Home, the Pi's cache in use (each window starts and ends there).
    pub fn pi_cache_back_in_use(&self) -> Result<(), String> {
        self.expect_fragment(true, BACK)?;
        self.expect_nix_in_use(true, T).map(drop)
    }

    /// At home, the Pi present: `count` builds of new derivations with the include and as many
    /// without, one at a time, alternating. An error if one fails.
    pub fn home_cost(&self, count: usize) -> Result<HomeCost, String> {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for i in 0..count {
            for (caches, into) in [(ALONE, &mut with), (no_pi(ALONE), &mut without)] {
                let build = self.build_new(&format!("home-{i}"), caches);
                if let Some(why) = &build.failure {
                    return Err(format!("at home, a build failed: {why}"));
                }
                into.push(build);
            }
        }
        Ok(HomeCost {
            with: Spread::of(&with),
            without: Spread::of(&without),
        })
    }

    /// One fault: from its moment on, a build every [`EVERY`] for [`WINDOW`], alternately with
    /// the Pi's cache and without (the same load on both), and at once one of a derivation
    /// whose output the Pi has; then the fault healed and the Pi's cache awaited.
    pub fn vanish_window(&self, fault: Fault, caches: Caches) -> Result<Window, String> {
        let what = format!(
            "{}, {}",
            fault.name(),
            if caches.stand_in {
                "with a second cache"
            } else {
                "the Pi's cache alone"
            }
        );
        self.pi_cache_back_in_use()
            .map_err(|e| format!("{what}: before: {e}"))?;
        let (shared, shared_name) = self.pi_add_new("shared")?;
        let started = Instant::now();
        let frozen = fault.inflict(self)?;
        let (builds, pi_has) = std::thread::scope(|s| {
            let pi_has =
                s.spawn(|| self.build_expr(&derivation_expr(&shared_name, &shared_name), caches));
            let tag = format!("{}-{}", fault.name().replace(' ', "-"), caches.stand_in);
            let builds = self.builds_every(&tag, EVERY, WINDOW, &[caches, no_pi(caches)]);
            (builds, pi_has.join())
        });
        let took = started.elapsed();
        drop(frozen);
        self.pi_port(true)?;
        let pi_has = pi_has.map_err(|_| "the build's thread panicked".to_string())?;
        // REACHD_LAB_VANISH_DETAIL=1: every build's start, time and caches, to stderr.
        if std::env::var_os("REACHD_LAB_VANISH_DETAIL").is_some() {
            for b in &builds {
                let (at, took) = (b.at.as_secs_f64(), b.took.as_secs_f64());
                eprintln!("{what}: at {at:.2} s took {took:.2} s, Pi {}", b.caches.pi);
            }
        }
        let (with, without): (Vec<Timed>, Vec<Timed>) =
            builds.into_iter().partition(|b| b.caches.pi);
        let mut extra: Vec<Duration> = with.iter().map(|b| extra_wait(b, &without, NEAR)).collect();
        extra.sort();
        Ok(Window {
            pi_has_extra: extra_wait(&pi_has, &without, NEAR),
            pi_has_outcome: self.outcome(&shared, pi_has.failure.is_some()),
            pi_has_path: shared,
            pi_has,
            took,
            with: Spread::of(&with),
            without: Spread::of(&without),
            extra,
            back: self
                .pi_cache_back_in_use()
                .and_then(|()| self.pi_cache_serves())
                .map_err(|e| format!("{what}: after healing: {e}")),
            what,
        })
    }

    /// A path the Pi has just built is fetched from it through the cache (which may have
    /// doubted the Pi until the agent's check was heard).
    fn pi_cache_serves(&self) -> Result<(), String> {
        let (path, _) = self.pi_add_new("shared")?;
        let run = self.nix_as_user(&["nix-store", "-r", &path], T)?;
        match self.outcome(&path, run.code != 0) {
            "fetched from the Pi" => Ok(()),
            other => Err(format!("the Pi's new {path}: {other} ({})", run.summary())),
        }
    }

    /// What became of the Pi's path: fetched from the Pi (its signature came along) or built
    /// here.
    fn outcome(&self, path: &str, failed: bool) -> &'static str {
        if failed {
            return "FAILED";
        }
        match self.nix_as_user(&["nix", "path-info", "--sigs", path], T) {
            Ok(info) if info.stdout.contains("pi-1:") => "fetched from the Pi",
            Ok(info) if info.code == 0 => "built here",
            _ => "not valid here",
        }
    }
}
