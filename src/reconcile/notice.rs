//! Notices: which desktop notifications to send (`[notify]`), decided here so that the rule
//! is tested without a notification server. Uploads that keep failing are otherwise silent (a
//! host that does not trust the machine's key is retried for hours), so one notice says so
//! once they have failed for `uploads_failing_minutes`, and one more when they work again; with
//! `host_changes`, a host coming and going is told too, but not the first state found at start,
//! nor a sleep and the wake-up to the same state.
//! Without `[notify]` nothing is noticed, though the failures are still followed, so that a
//! reload that adds the table can tell of uploads that failed before it. The clock is passed in.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::NotifySettings;

use super::reach::{Reach, Transition};
use super::upload_timing::{BatchOutcome, Run};

/// At most this many characters of an error go into a notice (Nix's can be pages long).
const ERROR_CHARS: usize = 300;

/// What a notice is about: each host's notices of one kind replace each other on screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    Reach,
    Uploads,
}

/// One desktop notification to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub host: String,
    pub kind: NoticeKind,
    pub summary: String,
    pub body: String,
}

/// What the user was last told of a host's reachability, so that a notice says only what they
/// do not know. A sleep is told nothing (every suspend makes each host unreachable, and the
/// wake-up, at home, makes it reachable again): it leaves what was told as it was, so the
/// wake-up that finds the host again is silent too. One that does not find it (the machine woke
/// away from home) is no change of the host's state, so it is not told either; the next change
/// that differs from what was told is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReachNotices {
    /// The state last told, or the first found (at start, or when the host was added).
    told: Option<Reach>,
}

impl ReachNotices {
    /// A change of the host's reachability (`asleep`: the one the machine's sleep makes): the
    /// notice to send, with `host_changes`, when it differs from what was told.
    pub fn on_transition(
        &mut self,
        host: &str,
        transition: &Transition,
        asleep: bool,
        settings: Option<&NotifySettings>,
    ) -> Option<Notice> {
        if transition.from == Reach::Unknown && self.told.is_none() {
            self.told = Some(transition.to);
            return None;
        }
        if asleep || self.told == Some(transition.to) || transition.to == Reach::Unknown {
            return None;
        }
        self.told = Some(transition.to);
        if !settings?.host_changes {
            return None;
        }
        Some(Notice {
            host: host.to_string(),
            kind: NoticeKind::Reach,
            summary: format!("{host} is {}", transition.to.as_str()),
            body: transition.reason.clone(),
        })
    }
}

/// How the uploads to one host go, as far as notices are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadNotices {
    host: String,
    /// The first failed upload after one that worked (or after the start), while they fail.
    failing_since: Option<Instant>,
    /// Whether "uploads failing" was told for this run of failures.
    told: bool,
}

impl UploadNotices {
    /// For the uploads to `host`, none failed yet.
    pub fn new(host: &str) -> Self {
        UploadNotices {
            host: host.to_string(),
            failing_since: None,
            told: false,
        }
    }

    /// A run over the host's queue ended (its outcome accepted by the upload gate). Only
    /// uploads count: a failed one starts the failure's clock or tells it once it has lasted
    /// `uploads_failing_after`; one that worked (did something, or found the queue empty) ends
    /// it, and tells so if the failure was told. A run that found nothing due and the counts
    /// made while the host is away change nothing.
    pub fn on_run(
        &mut self,
        run: Run,
        outcome: &BatchOutcome,
        settings: Option<&NotifySettings>,
        now: Instant,
    ) -> Option<Notice> {
        if run != Run::Upload {
            return None;
        }
        let host = &self.host;
        if let Some(error) = &outcome.error {
            let since = *self.failing_since.get_or_insert(now);
            let failing = now.saturating_duration_since(since);
            if self.told || failing < settings?.uploads_failing_after {
                return None;
            }
            self.told = true;
            return Some(Notice {
                host: host.to_string(),
                kind: NoticeKind::Uploads,
                summary: format!("Uploads to {host} are failing"),
                body: format!(
                    "{} waiting; failing for {}: {}",
                    builds(outcome.pending),
                    minutes(failing),
                    shortened(error)
                ),
            });
        }
        let worked = outcome.done > 0 || outcome.lost > 0 || outcome.pending == 0;
        if !worked {
            return None;
        }
        self.failing_since = None;
        let told = std::mem::take(&mut self.told);
        (told && settings.is_some()).then(|| Notice {
            host: host.to_string(),
            kind: NoticeKind::Uploads,
            summary: format!("Uploads to {host} work again"),
            body: format!("{} waiting", builds(outcome.pending)),
        })
    }
}

/// "1 build", "12 builds".
fn builds(count: u32) -> String {
    format!("{count} build{}", if count == 1 { "" } else { "s" })
}

/// "31 min", "2 h 5 min" (whole minutes, rounded down).
fn minutes(duration: Duration) -> String {
    let minutes = duration.as_secs() / 60;
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
}

/// `error`, cut to [`ERROR_CHARS`] characters with an ellipsis.
fn shortened(error: &str) -> String {
    match error.char_indices().nth(ERROR_CHARS) {
        Some((at, _)) => format!("{}…", &error[..at]),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF_AN_HOUR: NotifySettings = NotifySettings {
        uploads_failing_after: Duration::from_secs(30 * 60),
        host_changes: false,
    };

    fn failed(pending: u32, error: &str) -> BatchOutcome {
        BatchOutcome {
            pending,
            error: Some(error.into()),
            ..BatchOutcome::default()
        }
    }

    fn uploaded(done: usize, pending: u32) -> BatchOutcome {
        BatchOutcome {
            done,
            copied: done,
            pending,
            ..BatchOutcome::default()
        }
    }

    fn after(t0: Instant, minutes: u64) -> Instant {
        t0 + Duration::from_secs(minutes * 60)
    }

    const UNTRUSTED: &str = "cannot add path: lacks a signature by a trusted key";

    #[test]
    fn uploads_failing_for_the_threshold_are_told_once_then_their_return() {
        let t0 = Instant::now();
        let mut notices = UploadNotices::new("rpi");
        let settings = Some(&HALF_AN_HOUR);
        for minute in [0, 1, 3, 7, 15] {
            let outcome = failed(12, UNTRUSTED);
            let at = after(t0, minute);
            let notice = notices.on_run(Run::Upload, &outcome, settings, at);
            assert_eq!(notice, None, "not yet at minute {minute}");
        }
        let outcome = failed(12, UNTRUSTED);
        let notice = notices.on_run(Run::Upload, &outcome, settings, after(t0, 31));
        assert_eq!(
            notice,
            Some(Notice {
                host: "rpi".into(),
                kind: NoticeKind::Uploads,
                summary: "Uploads to rpi are failing".into(),
                body: format!("12 builds waiting; failing for 31 min: {UNTRUSTED}"),
            })
        );
        for minute in [63, 127, 600] {
            let outcome = failed(13, UNTRUSTED);
            let at = after(t0, minute);
            let notice = notices.on_run(Run::Upload, &outcome, settings, at);
            assert_eq!(notice, None, "told once, not again at minute {minute}");
        }
        let worked = notices.on_run(Run::Upload, &uploaded(13, 0), settings, t0);
        let worked = worked.expect("the return is told");
        assert_eq!(worked.kind, NoticeKind::Uploads, "it replaces the failure");
        assert_eq!(worked.summary, "Uploads to rpi work again");
        assert_eq!(worked.body, "0 builds waiting");

        // A new run of failures starts its own clock.
        let later = after(t0, 1000);
        let outcome = failed(1, UNTRUSTED);
        assert_eq!(notices.on_run(Run::Upload, &outcome, settings, later), None);
        let notice = notices.on_run(Run::Upload, &outcome, settings, after(later, 30));
        assert_eq!(
            notice.expect("told again").body,
            format!("1 build waiting; failing for 30 min: {UNTRUSTED}")
        );
    }

    #[test]
    fn an_upload_that_works_before_the_threshold_restarts_the_clock_and_tells_nothing() {
        let t0 = Instant::now();
        let mut notices = UploadNotices::new("rpi");
        let settings = Some(&HALF_AN_HOUR);
        let outcome = failed(3, "cannot connect");
        assert_eq!(notices.on_run(Run::Upload, &outcome, settings, t0), None);
        let worked = uploaded(1, 2);
        let at = after(t0, 20);
        assert_eq!(notices.on_run(Run::Upload, &worked, settings, at), None);
        let at = after(t0, 40);
        assert_eq!(
            notices.on_run(Run::Upload, &outcome, settings, at),
            None,
            "failing for 0 min since the upload that worked"
        );
    }

    #[test]
    fn counts_and_runs_that_find_nothing_due_change_nothing() {
        let t0 = Instant::now();
        let mut notices = UploadNotices::new("rpi");
        let settings = Some(&HALF_AN_HOUR);
        let outcome = failed(3, "cannot connect");
        notices.on_run(Run::Upload, &outcome, settings, t0);
        // Away: only counted, without and with an error.
        let counted = uploaded(0, 3);
        let at = after(t0, 10);
        assert_eq!(notices.on_run(Run::Count, &counted, settings, at), None);
        assert_eq!(notices.on_run(Run::Count, &outcome, settings, at), None);
        // Back, every entry waiting out its backoff: nothing done, no error.
        let waiting = uploaded(0, 3);
        assert_eq!(notices.on_run(Run::Upload, &waiting, settings, at), None);
        let notice = notices.on_run(Run::Upload, &outcome, settings, after(t0, 30));
        assert_eq!(
            notice.expect("the failure went on").body,
            "3 builds waiting; failing for 30 min: cannot connect"
        );
    }

    #[test]
    fn without_notify_nothing_is_told_but_failures_are_followed() {
        let t0 = Instant::now();
        let mut notices = UploadNotices::new("rpi");
        let outcome = failed(3, "cannot connect");
        for minute in [0, 45] {
            let at = after(t0, minute);
            assert_eq!(notices.on_run(Run::Upload, &outcome, None, at), None);
        }
        // A reload adds [notify]: the next failure tells the hour it lasted.
        let notice = notices.on_run(Run::Upload, &outcome, Some(&HALF_AN_HOUR), after(t0, 61));
        assert_eq!(
            notice.expect("told").body,
            "3 builds waiting; failing for 1 h 1 min: cannot connect"
        );
        // [notify] removed again: the return is not told.
        assert_eq!(notices.on_run(Run::Upload, &uploaded(3, 0), None, t0), None);
    }

    #[test]
    fn a_long_error_is_shortened() {
        let t0 = Instant::now();
        let mut notices = UploadNotices::new("rpi");
        let error = "é".repeat(ERROR_CHARS + 50);
        let settings = NotifySettings {
            uploads_failing_after: Duration::from_secs(60),
            host_changes: false,
        };
        let outcome = failed(1, &error);
        notices.on_run(Run::Upload, &outcome, Some(&settings), t0);
        let notice = notices.on_run(Run::Upload, &outcome, Some(&settings), after(t0, 120));
        let body = notice.expect("told").body;
        assert!(
            body.ends_with(&format!("{}…", "é".repeat(ERROR_CHARS))),
            "{body}"
        );
        assert!(!body.contains(&"é".repeat(ERROR_CHARS + 1)), "{body}");
    }

    fn transition(from: Reach, to: Reach, reason: &str) -> Transition {
        Transition {
            from,
            to,
            reason: reason.into(),
        }
    }

    #[test]
    fn hosts_coming_and_going_are_told_with_host_changes_only() {
        let changes = NotifySettings {
            host_changes: true,
            ..HALF_AN_HOUR
        };
        let found = transition(Reach::Unknown, Reach::Unreachable, "network disconnected");
        let came = transition(
            Reach::Unreachable,
            Reach::Reachable,
            "answered at 192.0.2.10",
        );
        let went = transition(Reach::Reachable, Reach::Unreachable, "network disconnected");
        let mut notices = ReachNotices::default();
        let mut tell = |t: &Transition, settings| notices.on_transition("rpi", t, false, settings);
        assert_eq!(tell(&found, Some(&changes)), None, "not the first state");
        assert_eq!(
            tell(&came, Some(&changes)),
            Some(Notice {
                host: "rpi".into(),
                kind: NoticeKind::Reach,
                summary: "rpi is reachable".into(),
                body: "answered at 192.0.2.10".into(),
            })
        );
        let notice = tell(&went, Some(&changes)).expect("told");
        assert_eq!(notice.summary, "rpi is unreachable");
        assert_eq!(notice.body, "network disconnected");
        assert_eq!(tell(&came, Some(&HALF_AN_HOUR)), None, "no host_changes");
        assert_eq!(tell(&went, None), None, "no [notify]");
        let notice = tell(&came, Some(&changes)).expect("told");
        assert_eq!(notice.summary, "rpi is reachable", "after the silent ones");
    }

    #[test]
    fn a_sleep_and_a_wake_up_to_the_same_state_tell_nothing() {
        let changes = NotifySettings {
            host_changes: true,
            ..HALF_AN_HOUR
        };
        let mut notices = ReachNotices::default();
        let at_home = transition(Reach::Unknown, Reach::Reachable, "answered at 192.0.2.10");
        assert_eq!(
            notices.on_transition("rpi", &at_home, false, Some(&changes)),
            None
        );
        let sleep = transition(
            Reach::Reachable,
            Reach::Unreachable,
            "the machine is going to sleep",
        );
        assert_eq!(
            notices.on_transition("rpi", &sleep, true, Some(&changes)),
            None
        );
        let woke = transition(
            Reach::Unreachable,
            Reach::Reachable,
            "answered at 192.0.2.10",
        );
        assert_eq!(
            notices.on_transition("rpi", &woke, false, Some(&changes)),
            None,
            "reachable, as told before the sleep"
        );
        assert_eq!(
            notices.on_transition("rpi", &sleep, true, Some(&changes)),
            None
        );
        let gone = transition(Reach::Reachable, Reach::Unreachable, "no mDNS answer");
        assert_eq!(
            notices
                .on_transition("rpi", &gone, false, Some(&changes))
                .map(|n| n.summary),
            Some("rpi is unreachable".into()),
            "a change after the wake-up is told"
        );
    }

    #[test]
    fn durations_read_in_minutes_and_hours() {
        assert_eq!(minutes(Duration::from_secs(59)), "0 min");
        assert_eq!(minutes(Duration::from_secs(31 * 60 + 59)), "31 min");
        assert_eq!(minutes(Duration::from_secs(120 * 60)), "2 h");
        assert_eq!(minutes(Duration::from_secs(125 * 60)), "2 h 5 min");
        assert_eq!(builds(1), "1 build");
        assert_eq!(builds(0), "0 builds");
    }
}
