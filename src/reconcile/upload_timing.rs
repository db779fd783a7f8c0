//! Upload timing: when to drain a host's upload queue. Batches run only while the host's cache
//! answers (reachable, target active, and the daemon seen through the tunnel), one at a time; the
//! next starts at once while due entries remain, after the backoff when it failed, and every
//! [`SPOOL_POLL`] otherwise, to pick up new builds. A host lost mid-batch has the batch stopped
//! at once (its entries stay queued). While the host is away the queue is still counted every
//! [`SPOOL_POLL`], so that "12 paths waiting for rpi" shows at a glance.
//!
//! The spool's backoff rules are here too: a queue whose store cannot be reached waits
//! [`QUEUE_BACKOFF`], an entry the store refused [`ENTRY_BACKOFF`] (never dropped), and
//! [`BatchEnd::next_batch`] says when a queue can next do something. They are on `SystemTime`,
//! the spool's clock on disk; the upload wing applies them. The clock is passed in.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// How often the spool is looked at when nothing else is due (new builds, the count away).
pub const SPOOL_POLL: Duration = Duration::from_secs(5);

/// Backoff of a queue whose store cannot be reached: 15 s, doubling, at most 15 min.
pub const QUEUE_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(15),
    max: Duration::from_secs(15 * 60),
};

/// Backoff of an entry the store refused: 1 min, doubling, at most 6 h. It is never dropped.
pub const ENTRY_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(60),
    max: Duration::from_secs(6 * 3600),
};

/// Exponential backoff: `first` after one failure, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `attempts` consecutive failures (at least 1).
    pub fn after(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(31);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

/// One more failure after `previous` consecutive ones: the attempts it makes, and when the next
/// may start (the end of `backoff`).
pub fn after_failure(backoff: Backoff, previous: u32, now: SystemTime) -> (u32, SystemTime) {
    let attempts = previous.saturating_add(1);
    (attempts, now + backoff.after(attempts))
}

/// Whether an entry or queue that must wait until `next_try` may be tried at `now`.
pub fn is_due(next_try: SystemTime, now: SystemTime) -> bool {
    next_try <= now
}

/// How a batch over a queue ended, as far as the time of the next one goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchEnd {
    /// Entries still queued.
    pub pending: usize,
    /// Whether due entries may remain beyond the batch.
    pub more: bool,
    /// Whether the whole queue failed (its backoff is among `backoffs`).
    pub queue_failed: bool,
    /// The ends of the backoffs that the batch's failures started.
    pub backoffs: Vec<SystemTime>,
    /// The earliest end of a backoff among the entries that were waiting already.
    pub waiting_until: Option<SystemTime>,
}

impl BatchEnd {
    /// When another batch can do something, after this one ended at `now`: `None` when nothing
    /// is pending; after the queue's backoff when the whole queue failed; at once while due
    /// entries remain; else at the first end of a backoff, new or older, and at once if there
    /// is none.
    pub fn next_batch(&self, now: SystemTime) -> Option<SystemTime> {
        if self.pending == 0 {
            return None;
        }
        let backoffs = self.backoffs.iter().copied();
        let wait = match (self.more, self.queue_failed) {
            (_, true) => backoffs.min(),
            (true, false) => Some(now),
            (false, false) => backoffs.chain(self.waiting_until).min(),
        };
        Some(wait.unwrap_or(now))
    }
}

/// What one run over the spool found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Entries still queued for the host after the run.
    pub pending: u32,
    /// Paths copied to the host's store by the run.
    pub copied: usize,
    /// Paths collected on this machine before they could be uploaded: given up.
    pub lost: usize,
    /// Builds (queue entries) done: uploaded, or found on the host already.
    pub done: usize,
    /// Why (part of) the run failed.
    pub error: Option<String>,
    /// When another run can do something: `None` when the queue is empty.
    pub next_try: Option<Instant>,
}

/// A run to start: only count (and claim new builds), or upload too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Count,
    Upload,
}

/// What the agent must do about a host's uploads now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadPlan {
    pub start: Option<Run>,
    /// Stop the upload under way (the host is gone).
    pub stop: bool,
    /// Call `plan` again no later than this.
    pub wake: Option<Instant>,
}

/// The decision state of one host's uploads, and what its D-Bus object shows of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadGate {
    /// Entries queued for the host, at the last count.
    pub pending: u32,
    /// The last run that copied something, in words.
    pub last_upload: String,
    /// The last run's error; empty after a run without one.
    pub last_error: String,
    running: Option<Run>,
    /// Bumped when an upload is stopped, so that its late outcome is dropped.
    epoch: u64,
    next: Option<Instant>,
    eligible: bool,
}

impl Default for UploadGate {
    fn default() -> Self {
        Self::new()
    }
}

impl UploadGate {
    pub fn new() -> Self {
        UploadGate {
            pending: 0,
            last_upload: String::new(),
            last_error: String::new(),
            running: None,
            epoch: 0,
            next: None,
            eligible: false,
        }
    }

    /// The epoch to tag a run with when starting it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes whether the host may be uploaded to now and says what to start or stop.
    pub fn plan(&mut self, eligible: bool, now: Instant) -> UploadPlan {
        let mut plan = UploadPlan::default();
        if eligible != self.eligible {
            self.eligible = eligible;
            self.next = None; // Look at once: the host just came, or a count is due.
            if !eligible && self.running == Some(Run::Upload) {
                self.running = None;
                self.epoch += 1;
                plan.stop = true;
            }
        }
        if self.running.is_some() {
            return plan; // Its outcome wakes the agent.
        }
        match self.next {
            Some(at) if at > now => plan.wake = Some(at),
            _ => {
                let run = if eligible { Run::Upload } else { Run::Count };
                self.running = Some(run);
                plan.start = Some(run);
            }
        }
        plan
    }

    /// A run ended: returns which, or `None` for the outcome of a run that was stopped.
    pub fn on_outcome(&mut self, epoch: u64, outcome: &BatchOutcome, now: Instant) -> Option<Run> {
        if epoch != self.epoch {
            return None;
        }
        let finished = self.running.take()?;
        self.pending = outcome.pending;
        if outcome.done > 0 || outcome.lost > 0 {
            self.last_upload = format!(
                "{} build{} done, {} path{} copied{}",
                outcome.done,
                if outcome.done == 1 { "" } else { "s" },
                outcome.copied,
                if outcome.copied == 1 { "" } else { "s" },
                if outcome.lost > 0 {
                    format!(", {} collected before upload (lost)", outcome.lost)
                } else {
                    String::new()
                }
            );
        }
        self.last_error = outcome.error.clone().unwrap_or_default();
        self.next = Some(match outcome.next_try {
            // A count that ended after the host came: upload at once.
            _ if finished == Run::Count && self.eligible => now,
            Some(at) if self.eligible => at.max(now),
            _ => now + SPOOL_POLL,
        });
        Some(finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        assert_eq!(QUEUE_BACKOFF.after(0), Duration::from_secs(15));
        assert_eq!(QUEUE_BACKOFF.after(1), Duration::from_secs(15));
        assert_eq!(QUEUE_BACKOFF.after(3), Duration::from_secs(60));
        assert_eq!(QUEUE_BACKOFF.after(40), Duration::from_secs(900));
        assert_eq!(ENTRY_BACKOFF.after(u32::MAX), Duration::from_secs(6 * 3600));
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_failure_counts_one_more_attempt_and_waits_its_backoff() {
        assert_eq!(after_failure(QUEUE_BACKOFF, 0, at(100)), (1, at(115)));
        assert_eq!(after_failure(QUEUE_BACKOFF, 2, at(100)), (3, at(160)));
        assert_eq!(after_failure(ENTRY_BACKOFF, 0, at(100)), (1, at(160)));
        assert_eq!(
            after_failure(ENTRY_BACKOFF, u32::MAX, at(0)),
            (u32::MAX, at(6 * 3600)),
            "attempts saturate, the wait stays at its maximum"
        );
    }

    #[test]
    fn due_at_the_end_of_its_backoff_not_before() {
        assert!(!is_due(at(10), at(9)));
        assert!(is_due(at(10), at(10)));
        assert!(is_due(at(10), at(11)));
    }

    fn end(
        pending: usize,
        more: bool,
        queue_failed: bool,
        backoffs: &[SystemTime],
        waiting_until: Option<SystemTime>,
    ) -> BatchEnd {
        BatchEnd {
            pending,
            more,
            queue_failed,
            backoffs: backoffs.to_vec(),
            waiting_until,
        }
    }

    #[test]
    fn next_batch_follows_the_queue_then_due_entries_then_backoffs() {
        let now = at(100);
        // An empty queue: nothing to do.
        assert_eq!(
            end(0, true, true, &[at(200)], Some(at(150))).next_batch(now),
            None
        );
        // The whole queue failed: its backoff, even with due entries left.
        assert_eq!(
            end(3, true, true, &[at(115)], Some(at(105))).next_batch(now),
            Some(at(115))
        );
        // Due entries remain beyond the batch: at once.
        assert_eq!(
            end(3, true, false, &[at(160)], Some(at(150))).next_batch(now),
            Some(now)
        );
        // Otherwise the first end of a backoff, new or older.
        assert_eq!(
            end(3, false, false, &[at(160)], Some(at(150))).next_batch(now),
            Some(at(150))
        );
        assert_eq!(
            end(3, false, false, &[at(140)], Some(at(150))).next_batch(now),
            Some(at(140))
        );
        assert_eq!(
            end(3, false, false, &[], Some(at(150))).next_batch(now),
            Some(at(150))
        );
        // Pending but no backoff known: at once.
        assert_eq!(end(3, false, false, &[], None).next_batch(now), Some(now));
        assert_eq!(end(3, false, true, &[], None).next_batch(now), Some(now));
    }

    fn outcome(pending: u32, next_try: Option<Instant>) -> BatchOutcome {
        BatchOutcome {
            pending,
            next_try,
            ..BatchOutcome::default()
        }
    }

    #[test]
    fn away_the_queue_is_only_counted_then_drained_on_return() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        assert_eq!(gate.plan(false, t0).start, Some(Run::Count));
        assert_eq!(
            gate.plan(false, t0),
            UploadPlan::default(),
            "one run at a time"
        );
        assert_eq!(
            gate.on_outcome(gate.epoch(), &outcome(12, Some(t0)), t0),
            Some(Run::Count)
        );
        assert_eq!(gate.pending, 12);
        // Counted again after the poll interval, not before, while away.
        assert_eq!(gate.plan(false, t0).wake, Some(t0 + SPOOL_POLL));
        // Home: an upload at once.
        assert_eq!(gate.plan(true, t0).start, Some(Run::Upload));
    }

    #[test]
    fn batches_follow_each_other_while_entries_are_due() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        assert_eq!(gate.plan(true, t0).start, Some(Run::Upload));
        let done = BatchOutcome {
            pending: 900,
            copied: 100,
            done: 100,
            next_try: Some(t0),
            ..BatchOutcome::default()
        };
        assert_eq!(gate.on_outcome(gate.epoch(), &done, t0), Some(Run::Upload));
        assert_eq!(gate.last_upload, "100 builds done, 100 paths copied");
        assert_eq!(gate.plan(true, t0).start, Some(Run::Upload), "at once");
        // The queue empties: new builds are looked for every SPOOL_POLL.
        assert_eq!(
            gate.on_outcome(gate.epoch(), &outcome(0, None), t0),
            Some(Run::Upload)
        );
        assert_eq!(gate.plan(true, t0).wake, Some(t0 + SPOOL_POLL));
    }

    #[test]
    fn a_count_that_ends_after_the_host_came_is_followed_by_an_upload_at_once() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        assert_eq!(gate.plan(false, t0).start, Some(Run::Count));
        assert_eq!(
            gate.plan(true, t0),
            UploadPlan::default(),
            "the count still runs"
        );
        assert_eq!(
            gate.on_outcome(gate.epoch(), &outcome(3, None), t0),
            Some(Run::Count)
        );
        assert_eq!(gate.plan(true, t0).start, Some(Run::Upload));
    }

    #[test]
    fn builds_already_on_the_host_are_reported_done() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        gate.plan(true, t0);
        let known = BatchOutcome {
            done: 2,
            ..BatchOutcome::default()
        };
        assert_eq!(gate.on_outcome(gate.epoch(), &known, t0), Some(Run::Upload));
        assert_eq!(gate.last_upload, "2 builds done, 0 paths copied");
    }

    #[test]
    fn a_failure_waits_for_its_backoff_and_keeps_its_error() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        gate.plan(true, t0);
        let later = t0 + Duration::from_secs(15);
        let failed = BatchOutcome {
            pending: 3,
            error: Some("cannot connect to the store".into()),
            next_try: Some(later),
            ..BatchOutcome::default()
        };
        assert_eq!(
            gate.on_outcome(gate.epoch(), &failed, t0),
            Some(Run::Upload)
        );
        assert_eq!(gate.last_error, "cannot connect to the store");
        assert_eq!(gate.plan(true, t0).wake, Some(later));
        assert_eq!(gate.plan(true, later).start, Some(Run::Upload));
    }

    #[test]
    fn losing_the_host_stops_the_upload_and_drops_its_outcome() {
        let t0 = Instant::now();
        let mut gate = UploadGate::new();
        gate.plan(true, t0);
        let running = gate.epoch();
        let plan = gate.plan(false, t0);
        assert!(plan.stop);
        assert_eq!(plan.start, Some(Run::Count), "still counted while away");
        assert_eq!(
            gate.on_outcome(running, &outcome(0, None), t0),
            None,
            "stale"
        );
        assert_eq!(
            gate.on_outcome(gate.epoch(), &outcome(5, Some(t0)), t0),
            Some(Run::Count)
        );
        assert_eq!(gate.pending, 5);
        assert_eq!(gate.plan(true, t0).start, Some(Run::Upload));
    }
}
