//! The target: what reachd knows about a host's systemd target, and the one action that brings
//! it where reachability says it should be (start, stop, give its units the host's new address,
//! or nothing). Jobs are sent one at a time, never while the unit's state is unknown, and a
//! failed job is retried after a delay rather than in a loop. The clock is passed in.

use std::time::Duration;

use tokio::time::Instant;

use crate::address::HostAddress;

/// How long after a failed job the same job is tried again (when still wanted).
pub const JOB_RETRY_DELAY: Duration = Duration::from_secs(30);
/// How long after a failed update of the address in the user manager's environment it is
/// tried again.
pub const ADDRESS_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A unit's state as systemd reports it, reduced to what decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitState {
    /// Not read yet.
    Unknown,
    NotFound,
    Inactive,
    Activating,
    Active,
    Deactivating,
    Failed,
}

impl UnitState {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitState::Unknown => "unknown",
            UnitState::NotFound => "not-found",
            UnitState::Inactive => "inactive",
            UnitState::Activating => "activating",
            UnitState::Active => "active",
            UnitState::Deactivating => "deactivating",
            UnitState::Failed => "failed",
        }
    }
}

/// The jobs reachd sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Start,
    Stop,
    /// Restarts the target and, through their `PartOf=`, the units it started.
    Restart,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Start => "start",
            JobKind::Stop => "stop",
            JobKind::Restart => "restart",
        }
    }
}

/// What the agent must do about a host's target now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAction {
    /// Nothing; look again no later than this, if set (a failed job waiting for its retry).
    Nothing(Option<Instant>),
    /// Put this address in the user manager's environment (if known), then start the target.
    Start(Option<HostAddress>),
    Stop,
    /// The target runs and this agent does not know which address its units were given (they
    /// were started before it): put the host's in the environment, leave the target alone.
    SetAddress(HostAddress),
    /// The address the units were given stopped answering and the host answers at this one (a
    /// new lease): put it in the environment, then restart the target, so that the units it
    /// started (`PartOf=`) come back on the new address instead of talking to the old one.
    Move(HostAddress),
}

/// What reachd knows about a host's target, and what it last did to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    pub state: UnitState,
    /// The last job reachd sent and its result, in words ("start: done").
    pub last_job: String,
    /// Jobs sent since the agent started.
    pub jobs_sent: u32,
    /// The job reachd sent and is waiting for.
    job_running: Option<JobKind>,
    /// The last job that did not succeed, and when it ended.
    last_failure: Option<(JobKind, Instant)>,
    /// The address last put in the user manager's environment for this host's units (`None`:
    /// not known, e.g. the target was started before this agent).
    environment_address: Option<HostAddress>,
    /// When putting the address there last failed.
    address_failure: Option<Instant>,
}

impl Default for TargetView {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetView {
    pub fn new() -> Self {
        TargetView {
            state: UnitState::Unknown,
            last_job: String::new(),
            jobs_sent: 0,
            job_running: None,
            last_failure: None,
            environment_address: None,
            address_failure: None,
        }
    }

    /// The action that brings the target where `want_active` says (`None`: the host is
    /// undecided, so a running target is left alone until the first check says more, and a
    /// restart of reachd does not interrupt tunnels and mounts). `address` is where the host
    /// answers. The action returned is taken as carried out: a job counts as sent.
    pub fn next_action(
        &mut self,
        want_active: Option<bool>,
        address: Option<&HostAddress>,
        now: Instant,
    ) -> TargetAction {
        let action = self.decide(want_active, address, now);
        match &action {
            TargetAction::Start(address) => {
                self.environment_address.clone_from(address);
                self.job_sent(JobKind::Start);
            }
            TargetAction::Stop => self.job_sent(JobKind::Stop),
            TargetAction::SetAddress(address) => self.environment_address = Some(address.clone()),
            TargetAction::Move(address) => {
                self.environment_address = Some(address.clone());
                self.job_sent(JobKind::Restart);
            }
            TargetAction::Nothing(_) => {}
        }
        action
    }

    fn decide(
        &self,
        want_active: Option<bool>,
        address: Option<&HostAddress>,
        now: Instant,
    ) -> TargetAction {
        use UnitState::*;
        let Some(want_active) = want_active else {
            return TargetAction::Nothing(None);
        };
        if self.job_running.is_some() || self.state == Unknown {
            return TargetAction::Nothing(None);
        }
        let job = match (want_active, self.state) {
            (true, Activating | Active) => return self.address_update(address, now),
            (true, _) => JobKind::Start,
            (false, Active | Activating) => JobKind::Stop,
            (false, _) => return TargetAction::Nothing(None),
        };
        match self.last_failure {
            Some((failed, at)) if failed == job && now < at + JOB_RETRY_DELAY => {
                TargetAction::Nothing(Some(at + JOB_RETRY_DELAY))
            }
            _ if job == JobKind::Start => TargetAction::Start(address.cloned()),
            _ => TargetAction::Stop,
        }
    }

    /// A running target whose units were given another address than the host's (it moved: the
    /// check takes a new address only once the old one stopped answering), or one this agent
    /// does not know. A failed update or restart is retried after a delay.
    fn address_update(&self, address: Option<&HostAddress>, now: Instant) -> TargetAction {
        let Some(address) = address else {
            return TargetAction::Nothing(None);
        };
        if self.environment_address.as_ref() == Some(address) {
            return TargetAction::Nothing(None);
        }
        if let Some(at) = self.address_failure {
            if now < at + ADDRESS_RETRY_DELAY {
                return TargetAction::Nothing(Some(at + ADDRESS_RETRY_DELAY));
            }
        }
        match self.last_failure {
            Some((JobKind::Restart, at)) if now < at + JOB_RETRY_DELAY => {
                TargetAction::Nothing(Some(at + JOB_RETRY_DELAY))
            }
            Some((JobKind::Restart, _)) => TargetAction::Move(address.clone()),
            _ if self.environment_address.is_none() => TargetAction::SetAddress(address.clone()),
            _ => TargetAction::Move(address.clone()),
        }
    }

    fn job_sent(&mut self, kind: JobKind) {
        self.job_running = Some(kind);
        self.jobs_sent += 1;
        self.last_job = format!("{}: running", kind.as_str());
    }

    /// Whether reachd sent a job that has not ended yet.
    pub fn busy(&self) -> bool {
        self.job_running.is_some()
    }

    /// Whether reachd sent a stop job that has not ended yet.
    pub fn stopping(&self) -> bool {
        self.job_running == Some(JobKind::Stop)
    }

    /// systemd reported the unit's state (a change, or the first read).
    pub fn on_state(&mut self, state: UnitState) {
        self.state = state;
    }

    /// The job sent last ended with `result`; `state` is the unit's state read right after.
    pub fn on_job_done(
        &mut self,
        kind: JobKind,
        result: &Result<(), String>,
        state: Option<UnitState>,
        now: Instant,
    ) {
        self.job_running = None;
        if let Some(state) = state {
            self.state = state;
        }
        match result {
            Ok(()) => {
                self.last_failure = None;
                self.last_job = format!("{}: done", kind.as_str());
            }
            Err(why) => {
                self.last_failure = Some((kind, now));
                self.last_job = format!("{}: {why}", kind.as_str());
                if kind == JobKind::Restart {
                    // Whether the new address reached the environment is not known.
                    self.environment_address = None;
                }
            }
        }
    }

    /// The address update sent last ended with `result`.
    pub fn on_address_set(&mut self, result: &Result<(), String>, now: Instant) {
        match result {
            Ok(()) => self.address_failure = None,
            Err(_) => {
                self.environment_address = None;
                self.address_failure = Some(now);
            }
        }
    }

    /// Someone asked to look again now: a failed job is retried now rather than after its delay.
    pub fn on_refresh(&mut self) {
        self.last_failure = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi() -> HostAddress {
        HostAddress::v4("192.0.2.10".parse().unwrap())
    }

    fn view(state: UnitState) -> TargetView {
        TargetView {
            state,
            ..TargetView::new()
        }
    }

    /// The action for a fresh view in `state`.
    fn action(want: Option<bool>, state: UnitState, now: Instant) -> TargetAction {
        view(state).next_action(want, Some(&pi()), now)
    }

    #[test]
    fn target_jobs_follow_the_wanted_state() {
        use TargetAction::*;
        use UnitState::*;
        let now = Instant::now();
        assert_eq!(action(Some(true), Inactive, now), Start(Some(pi())));
        assert_eq!(action(Some(true), Failed, now), Start(Some(pi())));
        assert_eq!(action(Some(true), NotFound, now), Start(Some(pi())));
        // No job for a target already active (only the address, when its units lack it).
        assert_eq!(
            view(Active).next_action(Some(true), None, now),
            Nothing(None)
        );
        assert_eq!(action(Some(true), Active, now), SetAddress(pi()));
        assert_eq!(action(Some(false), Active, now), Stop);
        assert_eq!(action(Some(false), Activating, now), Stop);
        assert_eq!(action(Some(false), Inactive, now), Nothing(None));
        assert_eq!(action(Some(false), Failed, now), Nothing(None));
        assert_eq!(action(Some(true), Unknown, now), Nothing(None));
        // An undecided host leaves a running target alone (a restart of reachd).
        assert_eq!(action(None, Active, now), Nothing(None));
        // One job at a time.
        let mut running = view(Inactive);
        assert_eq!(running.next_action(Some(true), None, now), Start(None));
        assert_eq!(running.next_action(Some(false), None, now), Nothing(None));
        assert_eq!(
            (running.jobs_sent, running.last_job.as_str()),
            (1, "start: running")
        );
    }

    #[test]
    fn failed_job_is_retried_later_not_in_a_loop() {
        let now = Instant::now();
        let mut view = view(UnitState::Inactive);
        assert!(matches!(
            view.next_action(Some(true), None, now),
            TargetAction::Start(_)
        ));
        view.on_job_done(
            JobKind::Start,
            &Err("failed".into()),
            Some(UnitState::Failed),
            now,
        );
        assert_eq!(view.last_job, "start: failed");
        assert_eq!(
            view.next_action(Some(true), None, now + Duration::from_secs(1)),
            TargetAction::Nothing(Some(now + JOB_RETRY_DELAY))
        );
        assert_eq!(
            view.next_action(Some(true), None, now + JOB_RETRY_DELAY),
            TargetAction::Start(None)
        );
    }

    #[test]
    fn refresh_retries_a_failed_job_at_once() {
        let now = Instant::now();
        let mut view = view(UnitState::Active);
        view.next_action(Some(false), None, now);
        view.on_job_done(JobKind::Stop, &Err("timeout".into()), None, now);
        assert_eq!(
            view.next_action(Some(false), None, now),
            TargetAction::Nothing(Some(now + JOB_RETRY_DELAY))
        );
        view.on_refresh();
        assert_eq!(view.next_action(Some(false), None, now), TargetAction::Stop);
    }

    #[test]
    fn a_target_started_before_this_agent_gets_the_address_then_follows_moves() {
        let now = Instant::now();
        let moved = HostAddress::v4("192.0.2.11".parse().unwrap());
        let mut view = view(UnitState::Active);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::SetAddress(pi())
        );
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::Nothing(None)
        );
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Move(moved)
        );
        assert_eq!(view.last_job, "restart: running");
    }

    #[test]
    fn a_failed_restart_after_a_move_is_tried_again_later() {
        let now = Instant::now();
        let moved = HostAddress::v4("192.0.2.11".parse().unwrap());
        let mut view = view(UnitState::Inactive);
        view.next_action(Some(true), Some(&pi()), now);
        view.on_job_done(JobKind::Start, &Ok(()), Some(UnitState::Active), now);
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Move(moved.clone())
        );
        view.on_job_done(
            JobKind::Restart,
            &Err("failed".into()),
            Some(UnitState::Active),
            now,
        );
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Nothing(Some(now + JOB_RETRY_DELAY))
        );
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now + JOB_RETRY_DELAY),
            TargetAction::Move(moved)
        );
    }

    #[test]
    fn a_failed_address_update_is_retried_after_a_delay() {
        let now = Instant::now();
        let mut view = view(UnitState::Active);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::SetAddress(pi())
        );
        view.on_address_set(&Err("no manager".into()), now);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::Nothing(Some(now + ADDRESS_RETRY_DELAY))
        );
        let later = now + ADDRESS_RETRY_DELAY;
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), later),
            TargetAction::SetAddress(pi())
        );
        view.on_address_set(&Ok(()), later);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), later),
            TargetAction::Nothing(None)
        );
    }

    #[test]
    fn a_host_that_moves_while_its_target_runs_gets_its_address_updated_once() {
        let now = Instant::now();
        let moved = HostAddress::v4("192.0.2.11".parse().unwrap());
        let mut view = view(UnitState::Inactive);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::Start(Some(pi()))
        );
        view.on_job_done(JobKind::Start, &Ok(()), Some(UnitState::Active), now);
        assert_eq!(
            view.next_action(Some(true), Some(&pi()), now),
            TargetAction::Nothing(None)
        );
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Move(moved.clone())
        );
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Nothing(None),
            "one restart, then wait for it"
        );
        view.on_job_done(JobKind::Restart, &Ok(()), Some(UnitState::Active), now);
        assert_eq!(
            view.next_action(Some(true), Some(&moved), now),
            TargetAction::Nothing(None)
        );
        assert_eq!(view.jobs_sent, 2, "one start, one restart");
    }
}
