//! One configured host as the agent holds it: its configuration, what reconcile decided about
//! it, and how that reads on the bus and in the log.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::address::HostAddress;
use crate::config::{HostConfig, NotifySettings};
use crate::event::HostId;
use tokio::task::AbortHandle;

use crate::reconcile::{
    BatchOutcome, HostTracker, JobKind, NixGate, Notice, Reach, ReachNotices, TargetView,
    Transition, UploadGate, UploadNotices,
};
use crate::status::{self, HostStatus};

/// Everything the agent holds about one host.
pub(super) struct Host {
    pub id: HostId,
    pub config: HostConfig,
    pub tracker: HostTracker,
    pub target: TargetView,
    /// Whether Nix may use the host's cache; `None` without `[host.nix]`.
    pub nix: Option<NixGate>,
    /// When to upload builds to the host; `None` without `upload = true`.
    pub upload: Option<UploadGate>,
    /// The run over its upload queue under way, to stop it when the host goes.
    pub upload_run: Option<AbortHandle>,
    /// What the user was told of its reachability, and whether its uploads keep failing, for
    /// `[notify]`.
    reach_notices: ReachNotices,
    upload_notices: UploadNotices,
    /// Wall-clock time of the last transition, microseconds since the epoch.
    since: u64,
}

impl Host {
    pub fn new(id: HostId, config: HostConfig, now: Instant) -> Self {
        Host {
            id,
            nix: config.nix.as_ref().map(|_| NixGate::new()),
            upload: config.upload.as_ref().map(|_| UploadGate::new()),
            upload_run: None,
            reach_notices: ReachNotices::default(),
            upload_notices: UploadNotices::new(&config.name),
            config,
            tracker: HostTracker::new(now),
            target: TargetView::new(),
            since: status::wall_clock_micros(),
        }
    }

    /// Whether the host is a remote builder that is reachable, its cache (if it has one) not
    /// gone silent: while one is, root's remote builders stay on. The cache hears a vanished
    /// host within half a second of Nix asking it, long before the next check would.
    pub fn builder_in_use(&self) -> bool {
        self.config.builder.is_some() && self.builder_unusable().is_none()
    }

    /// Why the host's remote builder is used or not; empty for a host that is none.
    fn builder_reason(&self) -> String {
        match (&self.config.builder, self.builder_unusable()) {
            (None, _) => String::new(),
            (Some(_), None) => "in use".into(),
            (Some(_), Some(why)) => why,
        }
    }

    /// Why the host could not build now, if it could not: not reachable, or its nix-daemon
    /// heard going silent.
    fn builder_unusable(&self) -> Option<String> {
        match self.tracker.reach {
            Reach::Reachable if self.nix.as_ref().is_some_and(NixGate::went_silent) => {
                Some("the host's nix-daemon went silent".into())
            }
            Reach::Reachable => None,
            reach => Some(format!("host {}", reach.as_str())),
        }
    }

    /// What the host's D-Bus object shows.
    pub fn status(&self) -> HostStatus {
        HostStatus {
            name: self.config.name.clone(),
            hostname: self.config.hostname.clone(),
            target: self.config.target.clone(),
            reachable: self.tracker.reach == Reach::Reachable,
            state: self.tracker.reach.as_str().into(),
            address: self
                .tracker
                .address
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            reason: self.tracker.reason.clone(),
            since: self.since,
            target_state: self.target.state.as_str().into(),
            last_job: self.target.last_job.clone(),
            jobs_sent: self.target.jobs_sent,
            nix_in_use: self.nix.as_ref().is_some_and(NixGate::in_use),
            nix_reason: self
                .nix
                .as_ref()
                .map(|g| g.reason.clone())
                .unwrap_or_default(),
            uploads_pending: self.upload.as_ref().map_or(0, |u| u.pending),
            last_upload: self
                .upload
                .as_ref()
                .map(|u| u.last_upload.clone())
                .unwrap_or_default(),
            upload_error: self
                .upload
                .as_ref()
                .map(|u| u.last_error.clone())
                .unwrap_or_default(),
            builder_in_use: self.builder_in_use(),
            builder_reason: self.builder_reason(),
        }
    }

    /// Records and logs a change of reachability; `took` is the check's duration, if a check
    /// decided it. Returns the notice to send about it, if `notify` asks for one.
    pub fn transition(
        &mut self,
        transition: Option<Transition>,
        took: Option<Duration>,
        notify: Option<&NotifySettings>,
    ) -> Option<Notice> {
        let t = transition?;
        self.since = status::wall_clock_micros();
        info!(
            host = %self.config.name,
            from = t.from.as_str(),
            to = t.to.as_str(),
            reason = %t.reason,
            address = %self.tracker.address.as_ref().map(ToString::to_string).unwrap_or_default(),
            probe_ms = took.map(|d| d.as_millis() as u64),
            "{}: {} -> {} ({})",
            self.config.name,
            t.from.as_str(),
            t.to.as_str(),
            t.reason
        );
        let asleep = self.tracker.is_asleep();
        self.reach_notices
            .on_transition(&self.config.name, &t, asleep, notify)
    }

    /// A run over the upload queue ended: logs it, takes it into the upload gate (unless it is
    /// the late outcome of a run that was stopped) and returns the notice to send about it, if
    /// `notify` asks for one.
    pub fn on_upload(
        &mut self,
        epoch: u64,
        outcome: &BatchOutcome,
        notify: Option<&NotifySettings>,
        now: Instant,
    ) -> Option<Notice> {
        self.log_upload(outcome);
        let run = self.upload.as_mut()?.on_outcome(epoch, outcome, now)?;
        self.upload_run = None;
        self.upload_notices.on_run(run, outcome, notify, now)
    }

    /// Logs a change in who else answers the host's name: another device claiming it (an
    /// impostor, or the host on a second interface), or the end of that. `before` is the list
    /// before the last check.
    pub fn log_other_responders(&self, before: &[HostAddress]) {
        let now = &self.tracker.other_responders;
        if now.as_slice() == before {
            return;
        }
        let (host, hostname) = (&self.config.name, &self.config.hostname);
        let kept = self.tracker.address.as_ref().map(ToString::to_string);
        let kept = kept.unwrap_or_default();
        if now.is_empty() {
            info!(host = %host, "{host}: only {kept} answers {hostname} now");
        } else {
            let others: Vec<String> = now.iter().map(ToString::to_string).collect();
            let others = others.join(", ");
            warn!(host = %host, others, "{host}: {hostname} also answered by {others}: another device claims the name; keeping {kept}");
        }
    }

    /// Logs a run over the upload queue that did something or failed.
    fn log_upload(&self, outcome: &BatchOutcome) {
        let host = &self.config.name;
        let pending = outcome.pending;
        if let Some(error) = &outcome.error {
            warn!(host = %host, pending, "{host}: upload: {error} ({pending} waiting)");
        } else if outcome.copied > 0 || outcome.lost > 0 {
            let (copied, lost) = (outcome.copied, outcome.lost);
            info!(host = %host, copied, lost, pending, "{host}: uploaded {copied} paths, {lost} lost, {pending} waiting");
        }
    }

    /// Logs an update of the address in the user manager's environment.
    pub fn log_address(&self, address: &HostAddress, result: &Result<(), String>) {
        let (host, variable) = (&self.config.name, self.config.address_variable());
        match result {
            Ok(()) => info!(host = %host, %address, "{variable}={address}"),
            Err(why) => warn!(host = %host, "{why}; trying again"),
        }
    }

    /// Logs the end of a job for the host's target.
    pub fn log_job(&self, kind: JobKind, result: &Result<(), String>) {
        let (host, unit, job) = (&self.config.name, &self.config.target, kind.as_str());
        match result {
            Ok(()) => info!(host = %host, unit, job, "{job} {unit}: done"),
            Err(why) => warn!(host = %host, unit, job, "{job} {unit} failed: {why}"),
        }
    }
}
