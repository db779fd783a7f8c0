//! Builds of new derivations as the lab user, one at a time or many on a schedule, each timed:
//! what the vanish-window scenario and the benchmark measure. Every build is of a derivation no
//! store has seen (its name carries a tag, a number and the time), so Nix asks every
//! substituter for its output and then builds it.

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::laptop::NixRun;
use super::places::{stand_in_url, user_conf_without_include};
use crate::lab::Lab;

/// The longest one build may take before it counts as hung.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a build's Nix looks for the output first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caches {
    /// The user's nix.conf with reachd's fragment (else without the `!include`: no Pi at all).
    pub pi: bool,
    /// A second substituter after the Pi's (a stand-in for cache.nixos.org: a `file://` cache
    /// with `Priority: 40`, which has none of these outputs).
    pub stand_in: bool,
}

/// One timed build: when it started (from the schedule's start), with which caches, how long
/// it took, and its failure, if it failed.
#[derive(Debug, Clone)]
pub struct Timed {
    pub at: Duration,
    pub caches: Caches,
    pub took: Duration,
    pub failure: Option<String>,
}

/// A derivation named `name` that needs nothing but /bin/sh.
pub fn derivation_expr(name: &str, text: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" \"echo {text} > $out\" ]; }}"
    )
}

/// A string no earlier call gave: the time in nanoseconds, for names of new derivations.
pub fn nonce() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .to_string()
}

impl Lab {
    /// `nix-build` of the derivation `expr` as the user, with `caches`; timed.
    pub fn build_expr(&self, expr: &str, caches: Caches) -> Timed {
        let stand_in = stand_in_url();
        let mut args = vec!["nix-build", "--no-out-link", "-E", expr];
        if caches.stand_in {
            args.extend(["--option", "extra-substituters", &stand_in]);
        }
        let mut spawn = self.user_nix(&args);
        if !caches.pi {
            spawn = spawn.env("NIX_USER_CONF_FILES", user_conf_without_include());
        }
        let (timed, _) = timed_build(spawn);
        Timed { caches, ..timed }
    }

    /// `nix-build ARGS` as the user, with reachd's fragment; timed, and the store path it
    /// printed when it succeeded.
    pub fn build_args(&self, args: &[&str]) -> (Timed, Option<String>) {
        timed_build(self.user_nix(args))
    }

    /// A build of a new derivation (tagged `tag`), timed.
    pub fn build_new(&self, tag: &str, caches: Caches) -> Timed {
        let name = format!("w-{tag}-{}", nonce());
        self.build_expr(&derivation_expr(&name, &name), caches)
    }

    /// Starts a build of a new derivation every `every` for `span` from now, each on its own
    /// thread, with `kinds` in turn, and returns them all once every one ended (in the order
    /// they were due). Builds of different kinds side by side share the machine's load, so
    /// that they can be compared even on a busy machine.
    pub fn builds_every(
        &self,
        tag: &str,
        every: Duration,
        span: Duration,
        kinds: &[Caches],
    ) -> Vec<Timed> {
        let start = Instant::now();
        let count = (span.as_millis() / every.as_millis().max(1)) as u32;
        thread::scope(|s| {
            let builds: Vec<_> = (0..count)
                .map(|i| {
                    let at = every * i;
                    let caches = kinds[i as usize % kinds.len()];
                    s.spawn(move || {
                        thread::sleep((start + at).saturating_duration_since(Instant::now()));
                        let started = start.elapsed();
                        Timed {
                            at: started,
                            ..self.build_new(&format!("{tag}-{i}"), caches)
                        }
                    })
                })
                .collect();
            builds
                .into_iter()
                .map(|b| {
                    b.join().unwrap_or_else(|_| Timed {
                        at: Duration::ZERO,
                        caches: kinds[0],
                        took: Duration::ZERO,
                        failure: Some("the build's thread panicked".into()),
                    })
                })
                .collect()
        })
    }
}

/// Runs the nix-build `spawn`, timed; the store path it printed when it succeeded.
fn timed_build(spawn: crate::process::Spawn) -> (Timed, Option<String>) {
    let start = Instant::now();
    let (failure, path) = match NixRun::of(spawn, BUILD_TIMEOUT) {
        Ok(run) if run.code == 0 && run.stdout.trim().starts_with("/nix/store/") => {
            (None, Some(run.stdout.trim().to_string()))
        }
        Ok(run) => (Some(run.summary()), None),
        Err(e) => (Some(e), None),
    };
    let timed = Timed {
        at: Duration::ZERO,
        caches: Caches {
            pi: true,
            stand_in: false,
        },
        took: start.elapsed(),
        failure,
    };
    (timed, path)
}

/// How much longer than its neighbours `build` took: its time less the slowest of the builds in
/// `others` that started within `near` of it (none: the whole of its time).
pub fn extra_wait(build: &Timed, others: &[Timed], near: Duration) -> Duration {
    let neighbours = others
        .iter()
        .filter(|o| o.at.abs_diff(build.at) <= near)
        .map(|o| o.took)
        .max()
        .unwrap_or_default();
    build.took.saturating_sub(neighbours)
}

/// The slowest and the median of `builds`, and their failures ("at T s: why").
#[derive(Debug, Clone)]
pub struct Spread {
    pub count: usize,
    pub worst: Duration,
    pub median: Duration,
    pub failures: Vec<String>,
}

impl Spread {
    pub fn of(builds: &[Timed]) -> Spread {
        let mut took: Vec<Duration> = builds.iter().map(|b| b.took).collect();
        took.sort();
        Spread {
            count: builds.len(),
            worst: took.last().copied().unwrap_or_default(),
            median: took.get(took.len() / 2).copied().unwrap_or_default(),
            failures: builds
                .iter()
                .filter_map(|b| {
                    let why = b.failure.as_ref()?;
                    Some(format!("at {:.2} s: {why}", b.at.as_secs_f64()))
                })
                .collect(),
        }
    }
}
