//! The cache gate: whether Nix may be pointed at a host's cache now. Only while the host is reachable, its
//! target is active (so the tunnel unit runs) and the cache answered its last check; the check
//! is repeated while that holds (every `[probe] cache_check_interval_ms`), so a cache that stops
//! answering (a half-dead tunnel) is dropped within that interval + the check's deadline, or at once when the cache reachd
//! serves heard nothing from the host for a moment ([`NixGate::on_silence`]). Away from home
//! Nix never hears of the host. The clock is passed in.

use std::time::Duration;

use tokio::time::Instant;

use super::reach::{HostTracker, Reach};
use super::target::{TargetView, UnitState};

/// How long one check may take before the cache counts as not answering.
pub const NIX_CHECK_DEADLINE: Duration = Duration::from_secs(2);
/// Just after the target became active its units are still starting (the tunnel's socket may
/// not exist yet): for this long a failed check is repeated after [`NIX_CHECK_RETRY`] instead.
pub const NIX_START_GRACE: Duration = Duration::from_secs(5);
pub const NIX_CHECK_RETRY: Duration = Duration::from_millis(250);

/// Whether a host's cache may be used at all now (reachable, target active), and if not, why.
pub fn nix_eligibility(tracker: &HostTracker, target: &TargetView) -> Result<(), String> {
    if tracker.reach != Reach::Reachable {
        return Err(format!("host {}", tracker.reach.as_str()));
    }
    if target.state != UnitState::Active || target.stopping() {
        return Err(format!("target {}", target.state.as_str()));
    }
    Ok(())
}

/// What the agent must do about a host's cache now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NixPlan {
    /// Start a check of the cache.
    pub check: bool,
    /// Call `plan` again no later than this.
    pub wake: Option<Instant>,
}

/// The decision state of one host's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixGate {
    in_use: bool,
    /// Why the cache is or is not in use, in words.
    pub reason: String,
    eligible: bool,
    /// When the host last became eligible.
    eligible_since: Option<Instant>,
    /// Bumped whenever the host stops being eligible, so that older check results are dropped.
    epoch: u64,
    check_started: Option<Instant>,
    check_due: Option<Instant>,
    /// The host's daemon went silent while the cache served, and no check has seen it answer
    /// since: the host is most likely gone (its remote builder is dropped too).
    silent: bool,
}

impl Default for NixGate {
    fn default() -> Self {
        Self::new()
    }
}

impl NixGate {
    pub fn new() -> Self {
        NixGate {
            in_use: false,
            reason: "starting".into(),
            eligible: false,
            eligible_since: None,
            epoch: 0,
            check_started: None,
            check_due: None,
            silent: false,
        }
    }

    /// Whether Nix is to be pointed at the cache.
    pub fn in_use(&self) -> bool {
        self.in_use
    }

    /// Whether the host's daemon went silent while the cache served it, and no check has seen
    /// it answer since.
    pub fn went_silent(&self) -> bool {
        self.silent
    }

    /// The epoch to tag a check with when starting it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes the host's eligibility (see [`nix_eligibility`]) and says whether to check the
    /// cache now and when to look again. An ineligible host's cache is out of use at once.
    pub fn plan(&mut self, eligibility: Result<(), String>, now: Instant) -> NixPlan {
        if let Err(why) = eligibility {
            if self.eligible {
                self.epoch += 1;
            }
            *self = NixGate {
                reason: why,
                epoch: self.epoch,
                ..NixGate::new()
            };
            return NixPlan::default();
        }
        if !self.eligible {
            self.eligible = true;
            self.eligible_since = Some(now);
            self.check_due = Some(now);
            self.reason = "checking the cache".into();
        }
        if self.check_started.is_some() {
            return NixPlan::default(); // Its result wakes the agent.
        }
        match self.check_due {
            Some(due) if due <= now => {
                self.check_due = None;
                self.check_started = Some(now);
                NixPlan {
                    check: true,
                    wake: None,
                }
            }
            wake => NixPlan { check: false, wake },
        }
    }

    /// The cache reachd serves heard nothing from the host's daemon for a moment (and answers
    /// "not here" until it does): out of use at once, and checked again at once, so that a host
    /// that was only slow comes back as soon as a check sees it answer. A check under way
    /// started before the silence: its result is dropped.
    pub fn on_silence(&mut self, now: Instant) -> Option<bool> {
        if !self.eligible {
            return None;
        }
        self.epoch += 1;
        self.check_started = None;
        self.check_due = Some(now);
        self.reason = "cache not answering: the host's nix-daemon went silent".into();
        self.silent = true;
        std::mem::take(&mut self.in_use).then_some(false)
    }

    /// A check ended; the next is due `interval` after this one started. Results of checks
    /// started before the host last stopped being eligible are dropped. Returns the new
    /// `in_use` when it changed.
    pub fn on_check(
        &mut self,
        epoch: u64,
        result: Result<(), String>,
        interval: Duration,
        now: Instant,
    ) -> Option<bool> {
        if epoch != self.epoch {
            return None;
        }
        let started = self.check_started.take()?;
        let starting = self
            .eligible_since
            .is_some_and(|since| now < since + NIX_START_GRACE);
        let interval = match (&result, starting) {
            (Err(_), true) => NIX_CHECK_RETRY,
            _ => interval,
        };
        self.check_due = Some((started + interval).max(now));
        let was = self.in_use;
        match result {
            Ok(()) => {
                self.in_use = true;
                self.silent = false;
                self.reason = "in use".into();
            }
            Err(why) => {
                self.in_use = false;
                self.reason = format!("cache not answering: {why}");
            }
        }
        (was != self.in_use).then_some(self.in_use)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `cache_check_interval_ms`.
    const INTERVAL: Duration = Duration::from_secs(2);

    fn eligible_checked(gate: &mut NixGate, result: Result<(), String>, now: Instant) {
        let plan = gate.plan(Ok(()), now);
        assert!(plan.check, "a check is due at once: {plan:?}");
        gate.on_check(gate.epoch(), result, INTERVAL, now);
    }

    #[test]
    fn in_use_only_once_a_check_answered() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        assert_eq!(
            gate.plan(Err("host unknown".into()), t0),
            NixPlan::default()
        );
        assert!(!gate.in_use());
        assert!(gate.plan(Ok(()), t0).check);
        assert!(!gate.in_use(), "not before the check answers");
        assert_eq!(
            gate.plan(Ok(()), t0),
            NixPlan::default(),
            "one check at a time"
        );
        assert_eq!(
            gate.on_check(gate.epoch(), Ok(()), INTERVAL, t0),
            Some(true)
        );
        assert_eq!(gate.reason, "in use");
        // Checked again after the interval, from the check's start.
        assert_eq!(gate.plan(Ok(()), t0).wake, Some(t0 + INTERVAL));
    }

    #[test]
    fn the_next_check_is_due_the_configured_interval_after_the_last_started() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        assert!(gate.plan(Ok(()), t0).check);
        let long = Duration::from_secs(30);
        let answered = t0 + Duration::from_millis(40);
        gate.on_check(gate.epoch(), Ok(()), long, answered);
        assert_eq!(gate.plan(Ok(()), answered).wake, Some(t0 + long));
        assert!(gate.plan(Ok(()), t0 + long).check);
    }

    #[test]
    fn a_failed_or_timed_out_check_takes_the_cache_out_of_use() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        eligible_checked(&mut gate, Ok(()), t0);
        let t1 = t0 + INTERVAL;
        assert!(gate.plan(Ok(()), t1).check);
        let end = t1 + NIX_CHECK_DEADLINE;
        assert_eq!(
            gate.on_check(
                gate.epoch(),
                Err("no answer within 2 s".into()),
                INTERVAL,
                end
            ),
            Some(false)
        );
        assert_eq!(gate.reason, "cache not answering: no answer within 2 s");
        // Retried on the same schedule (here at once: the check took the whole interval), and
        // back in use when it answers.
        let next = (t1 + INTERVAL).max(end);
        assert_eq!(gate.plan(Ok(()), t1).wake, Some(next));
        eligible_checked(&mut gate, Ok(()), next);
        assert!(gate.in_use());
    }

    #[test]
    fn just_after_the_target_started_a_failed_check_is_repeated_soon() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        eligible_checked(&mut gate, Err("no socket yet".into()), t0);
        assert_eq!(gate.plan(Ok(()), t0).wake, Some(t0 + NIX_CHECK_RETRY));
        let later = t0 + NIX_START_GRACE;
        assert!(gate.plan(Ok(()), later).check);
        gate.on_check(gate.epoch(), Err("still not".into()), INTERVAL, later);
        assert_eq!(gate.plan(Ok(()), later).wake, Some(later + INTERVAL));
    }

    #[test]
    fn losing_eligibility_drops_the_cache_at_once_and_ignores_late_results() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        eligible_checked(&mut gate, Ok(()), t0);
        let t1 = t0 + INTERVAL;
        assert!(gate.plan(Ok(()), t1).check);
        let running = gate.epoch();
        assert_eq!(
            gate.plan(Err("host unreachable".into()), t1),
            NixPlan::default()
        );
        assert!(!gate.in_use());
        assert_eq!(gate.reason, "host unreachable");
        assert_eq!(
            gate.on_check(running, Ok(()), INTERVAL, t1),
            None,
            "a stale answer"
        );
        assert!(!gate.in_use());
        // Eligible again: checked afresh before use.
        assert!(gate.plan(Ok(()), t1).check);
        assert!(!gate.in_use());
    }

    #[test]
    fn silence_takes_the_cache_out_of_use_until_a_new_check_answers() {
        let t0 = Instant::now();
        let mut gate = NixGate::new();
        assert_eq!(gate.on_silence(t0), None, "not eligible: nothing to do");
        eligible_checked(&mut gate, Ok(()), t0);
        let t1 = t0 + INTERVAL;
        assert!(gate.plan(Ok(()), t1).check);
        let running = gate.epoch();
        assert!(!gate.went_silent());
        assert_eq!(gate.on_silence(t1), Some(false));
        assert!(!gate.in_use());
        assert!(gate.went_silent());
        assert_eq!(gate.on_silence(t1), None, "already out of use");
        assert_eq!(
            gate.on_check(running, Ok(()), INTERVAL, t1),
            None,
            "started before"
        );
        assert!(!gate.in_use());
        assert!(gate.plan(Ok(()), t1).check, "checked again at once");
        assert!(gate.went_silent(), "until a check sees it answer");
        assert_eq!(
            gate.on_check(gate.epoch(), Ok(()), INTERVAL, t1),
            Some(true)
        );
        assert!(!gate.went_silent());
    }

    #[test]
    fn eligibility_needs_a_reachable_host_and_an_active_target() {
        let t0 = Instant::now();
        let mut tracker = HostTracker::new(t0);
        let mut target = TargetView::new();
        assert_eq!(
            nix_eligibility(&tracker, &target),
            Err("host unknown".into())
        );
        tracker.reach = Reach::Reachable;
        assert_eq!(
            nix_eligibility(&tracker, &target),
            Err("target unknown".into())
        );
        target.on_state(UnitState::Activating);
        assert_eq!(
            nix_eligibility(&tracker, &target),
            Err("target activating".into())
        );
        target.on_state(UnitState::Active);
        assert_eq!(nix_eligibility(&tracker, &target), Ok(()));
        tracker.reach = Reach::Unreachable;
        assert_eq!(
            nix_eligibility(&tracker, &target),
            Err("host unreachable".into())
        );
    }
}
