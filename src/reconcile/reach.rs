//! Reachability: is the host there? From NetworkManager's view, what mDNS finds and loses and
//! the results of checks, [`HostTracker`] decides reachable or not, when to check next, and
//! what a check should try. The clock is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::address::{Answered, HostAddress};
use crate::config::{HostConfig, ProbeSettings};

/// How long a host that was just lost (or a network that just came up) is re-checked at the
/// fast `absent_interval` before the interval starts doubling towards `absent_max_interval`.
pub const ABSENT_FAST_PERIOD: Duration = Duration::from_secs(120);
/// How long to wait for mDNS to find a host that has no known address before calling it
/// unreachable, after the network comes up.
pub const RESOLVE_GRACE: Duration = Duration::from_secs(3);
/// At most this many addresses are asked by one check (each opens a socket), whatever a device
/// on the LAN announces. More than that are asked in turn, this many a check: mdns-sd reports an
/// address once, when it enters its cache, so one that reachd ignored would never come back
/// (a flood of forged addresses could then hide the host's own new one for as long as mdns-sd
/// keeps them).
pub const MAX_ASKED: usize = 16;
/// How soon a failed check of a reachable host is repeated, before it counts as lost.
pub const RETRY_DELAY: Duration = Duration::from_millis(500);

/// What NetworkManager says, reduced to what decisions need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkView {
    /// NetworkManager's State is 50, 60 or 70 (connected local, site or global). On a LAN
    /// without internet it stays at 50 or 60, so 70 is never required.
    pub connected: bool,
    /// The connections in state "activated", by UUID (lower case), each with the machine's own
    /// addresses on it.
    pub active: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl NetworkView {
    /// Whether this network may carry the host, and if not, why.
    pub fn verdict(&self, host: &HostConfig) -> Result<(), String> {
        if !self.connected {
            return Err("network disconnected".into());
        }
        if !host.connections.is_empty()
            && !host.connections.iter().any(|u| self.active.contains_key(u))
        {
            return Err("not on one of the host's configured connections".into());
        }
        Ok(())
    }

    /// The machine's addresses a check of `host` may go out from: those of its activated
    /// `connections`, so that another machine answering the same name on another link at the
    /// same time is not taken for it. `None` (no narrowing) when the host may be reached on any
    /// network. Fails closed: a restricted host whose connections have no address from
    /// NetworkManager gets an empty set, and is not checked at all.
    pub fn local_addresses_for(&self, host: &HostConfig) -> Option<BTreeSet<IpAddr>> {
        if host.connections.is_empty() {
            return None;
        }
        let allowed = host.connections.iter().filter_map(|u| self.active.get(u));
        Some(allowed.flatten().copied().collect())
    }
}

/// What reachd holds about a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Unknown,
    Reachable,
    Unreachable,
}

impl Reach {
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Unknown => "unknown",
            Reach::Reachable => "reachable",
            Reach::Unreachable => "unreachable",
        }
    }
}

/// The outcome of one check of a host, as the probe reports it.
pub type CheckOutcome = Result<Answered, String>;

/// A change of a host's reachability, for the log and the status objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Reach,
    pub to: Reach,
    pub reason: String,
}

/// What the agent must do for a host now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Start a check against these addresses (empty: none known; the check fails at once).
    pub check: Option<Vec<HostAddress>>,
    /// Call `plan` again no later than this.
    pub wake: Option<Instant>,
}

/// The decision state of one host.
#[derive(Debug, Clone)]
pub struct HostTracker {
    pub reach: Reach,
    /// The address that answered the last successful check.
    pub address: Option<HostAddress>,
    /// Other devices that answered the host's name in the last successful check: addresses of the same
    /// kind as [`HostTracker::address`] (see [`HostAddress::same_kind`]), so not the host's
    /// own IPv6 address beside its IPv4 one. Named in the reason; the address is not changed.
    pub other_responders: Vec<HostAddress>,
    pub reason: String,
    /// Addresses mDNS currently reports for the host.
    mdns_addresses: BTreeSet<HostAddress>,
    /// Where the next check starts among them when they are more than it asks.
    ask_from: usize,
    /// Whether the network may carry the host (see [`NetworkView::verdict`]).
    network_ok: bool,
    /// The machine sleeps (or is about to): no check until it wakes.
    asleep: bool,
    /// When the network last became usable for this host.
    network_since: Instant,
    /// Failed checks in a row while reachable.
    failures: u32,
    /// A goodbye or a network change casts doubt: the next failed check is final.
    suspect: bool,
    /// When the next check is due (None: none scheduled).
    check_due: Option<Instant>,
    /// When the running check started (None: none runs). Its result is only accepted with a
    /// matching epoch; the next check is timed from this start, not from the result, so that a
    /// check that waited out its timeout does not stretch the interval.
    check_started: Option<Instant>,
    /// Bumped when the network changes, so that results of checks started before are dropped.
    epoch: u64,
    /// The current interval between checks of an unreachable host, and since when it is absent.
    absent_interval: Duration,
    absent_since: Instant,
}

impl HostTracker {
    pub fn new(now: Instant) -> Self {
        HostTracker {
            reach: Reach::Unknown,
            address: None,
            other_responders: Vec::new(),
            reason: "starting".into(),
            mdns_addresses: BTreeSet::new(),
            ask_from: 0,
            network_ok: false,
            asleep: false,
            network_since: now,
            failures: 0,
            suspect: false,
            check_due: None,
            check_started: None,
            epoch: 0,
            absent_interval: Duration::ZERO,
            absent_since: now,
        }
    }

    /// The epoch to tag a check with when starting it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The addresses a check should try, best first: the last address that answered (mDNS keeps
    /// stale records for their TTL and forgets a host that stopped answering; the last address
    /// is where a returning host most likely is, and units were given it), then what mDNS
    /// reports, IPv4 before IPv6. The check takes the best one that answers, so the choice is
    /// stable, not a race between a host's addresses.
    /// At most [`MAX_ASKED`]: when mDNS reports more, each check asks the next ones in turn
    /// after the last address that answered.
    pub fn candidates(&self) -> Vec<HostAddress> {
        let rest: Vec<&HostAddress> = self
            .mdns_addresses
            .iter()
            .filter(|a| Some(*a) != self.address.as_ref())
            .collect();
        let room = self.room_for_others();
        let start = if rest.len() > room {
            self.ask_from % rest.len()
        } else {
            0
        };
        let turn = rest.iter().cycle().skip(start).take(room.min(rest.len()));
        self.address.iter().chain(turn.copied()).cloned().collect()
    }

    /// How many of mDNS's other addresses one check asks besides the last one that answered.
    fn room_for_others(&self) -> usize {
        MAX_ASKED - usize::from(self.address.is_some())
    }

    /// NetworkManager's view changed (or was read for the first time).
    pub fn on_network(&mut self, verdict: Result<(), String>, now: Instant) -> Option<Transition> {
        self.epoch += 1;
        self.check_started = None;
        self.failures = 0;
        match verdict {
            Err(reason) => {
                self.network_ok = false;
                self.check_due = None;
                self.suspect = false;
                self.set(Reach::Unreachable, reason)
            }
            Ok(()) => {
                if !self.network_ok {
                    self.network_since = now;
                    self.absent_since = now;
                    self.absent_interval = Duration::ZERO;
                }
                self.network_ok = true;
                // Whatever was true on the old network must be confirmed on this one.
                self.suspect = self.reach == Reach::Reachable;
                self.check_due = Some(now);
                None
            }
        }
    }

    /// mDNS reported new addresses for the host.
    pub fn on_addresses_found(
        &mut self,
        found: impl IntoIterator<Item = HostAddress>,
        now: Instant,
    ) {
        let before = self.mdns_addresses.len();
        // All of them, as mdns-sd holds them (it drops them with their TTL or a goodbye, and
        // then says so): a check asks at most [`MAX_ASKED`].
        self.mdns_addresses.extend(found);
        if self.mdns_addresses.len() != before && self.reach != Reach::Reachable {
            self.check_due = Some(now);
        }
    }

    /// mDNS reported addresses gone: a goodbye packet or the end of their TTL.
    pub fn on_addresses_removed(&mut self, removed: &[HostAddress], now: Instant) {
        for address in removed {
            self.mdns_addresses.remove(address);
        }
        if self.reach == Reach::Reachable
            && self.address.as_ref().is_some_and(|a| removed.contains(a))
        {
            self.suspect = true;
            self.check_due = Some(now);
        }
    }

    /// Someone asked to look again now (`reachd refresh`, the dispatcher hook).
    pub fn on_refresh(&mut self, now: Instant) {
        if self.network_ok {
            self.check_due = Some(now);
        }
    }

    /// The machine is about to sleep: nothing found before holds once it wakes, perhaps on
    /// another network, so the host counts as unreachable now (and its target is stopped before
    /// the machine sleeps); no check until [`HostTracker::on_resume`].
    pub fn on_sleep(&mut self) -> Option<Transition> {
        self.epoch += 1;
        self.check_started = None;
        self.check_due = None;
        self.failures = 0;
        self.suspect = false;
        self.asleep = true;
        self.set(Reach::Unreachable, "the machine is going to sleep".into())
    }

    /// Whether the machine is asleep, for reachd (between [`HostTracker::on_sleep`] and
    /// [`HostTracker::on_resume`]).
    pub fn is_asleep(&self) -> bool {
        self.asleep
    }

    /// The machine woke up: check at once, on whatever network NetworkManager reports.
    pub fn on_resume(&mut self, now: Instant) {
        self.asleep = false;
        self.absent_since = now;
        self.absent_interval = Duration::ZERO;
        if self.network_ok {
            self.check_due = Some(now);
        }
    }

    /// A check finished. Results of checks started before the last network change are dropped.
    pub fn on_check(
        &mut self,
        epoch: u64,
        outcome: CheckOutcome,
        settings: &ProbeSettings,
        now: Instant,
    ) -> Option<Transition> {
        if epoch != self.epoch {
            return None;
        }
        let started = self.check_started.take()?;
        let after = |interval: Duration| Some((started + interval).max(now));
        match outcome {
            Ok(Answered { address, also }) => {
                self.failures = 0;
                self.suspect = false;
                self.absent_interval = Duration::ZERO;
                self.check_due = after(settings.present_interval);
                self.other_responders = also
                    .into_iter()
                    .filter(|other| other.same_kind(&address))
                    .collect();
                let mut reason = format!("answered at {address}");
                if !self.other_responders.is_empty() {
                    let others: Vec<String> = self
                        .other_responders
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    reason += &format!("; also answered by {}", others.join(", "));
                }
                self.address = Some(address);
                self.set(Reach::Reachable, reason)
            }
            Err(reason) => {
                if self.reach == Reach::Reachable {
                    self.failures += 1;
                    if !self.suspect && self.failures < settings.failures {
                        self.check_due = Some(now + RETRY_DELAY);
                        return None;
                    }
                    self.absent_since = now;
                    self.absent_interval = Duration::ZERO;
                }
                self.failures = 0;
                self.suspect = false;
                self.check_due = after(self.next_absent_interval(settings, now));
                self.set(Reach::Unreachable, reason)
            }
        }
    }

    /// Whether a check should start now, and when to look again.
    pub fn plan(&mut self, now: Instant) -> Plan {
        if !self.network_ok || self.asleep || self.check_started.is_some() {
            return Plan::default();
        }
        let mut due = self.check_due;
        if self.reach == Reach::Unknown && self.mdns_addresses.is_empty() && self.address.is_none()
        {
            // Give mDNS a moment to find the host before calling it unreachable.
            due = due.map(|d| d.max(self.network_since + RESOLVE_GRACE));
        }
        match due {
            Some(due) if due <= now => {
                self.check_due = None;
                self.check_started = Some(now);
                let candidates = self.candidates();
                self.ask_from = self.ask_from.wrapping_add(self.room_for_others());
                Plan {
                    check: Some(candidates),
                    wake: None,
                }
            }
            wake => Plan { check: None, wake },
        }
    }

    /// Whether reachd wants the host's target active; `None` while the host is undecided
    /// (just started): a running target is then left alone until the first check says more,
    /// so that restarting reachd does not interrupt tunnels and mounts.
    pub fn wants_target(&self) -> Option<bool> {
        match self.reach {
            Reach::Unknown => None,
            Reach::Reachable => Some(true),
            Reach::Unreachable => Some(false),
        }
    }

    fn next_absent_interval(&mut self, settings: &ProbeSettings, now: Instant) -> Duration {
        self.absent_interval = if now.duration_since(self.absent_since) < ABSENT_FAST_PERIOD
            || self.absent_interval.is_zero()
        {
            settings.absent_interval
        } else {
            (self.absent_interval * 2).min(settings.absent_max_interval)
        };
        self.absent_interval
    }

    fn set(&mut self, to: Reach, reason: String) -> Option<Transition> {
        let from = self.reach;
        self.reason = reason.clone();
        if from == to {
            return None;
        }
        self.reach = to;
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(connections: &[&str]) -> HostConfig {
        HostConfig {
            name: "rpi".into(),
            hostname: "rpi.local".into(),
            target: "rpi-accessible.target".into(),
            port: None,
            connections: connections.iter().map(|s| s.to_string()).collect(),
            nix: None,
            upload: None,
            builder: None,
        }
    }

    fn pi() -> HostAddress {
        HostAddress::v4("192.0.2.10".parse().unwrap())
    }

    /// A tracker on a connected network with the Pi's address known from mDNS.
    fn tracker_with_pi(now: Instant) -> HostTracker {
        let mut t = HostTracker::new(now);
        t.on_network(Ok(()), now);
        t.on_addresses_found([pi()], now);
        t
    }

    /// Runs the check the plan asks for, with `outcome`.
    fn check(t: &mut HostTracker, outcome: CheckOutcome, now: Instant) -> Option<Transition> {
        let plan = t.plan(now);
        assert!(plan.check.is_some(), "a check was due at {now:?}: {plan:?}");
        t.on_check(t.epoch(), outcome, &ProbeSettings::default(), now)
    }

    #[test]
    fn verdict_needs_connected_and_an_allowed_connection() {
        let mut net = NetworkView::default();
        assert!(net.verdict(&host(&[])).is_err());
        net.connected = true;
        assert!(net.verdict(&host(&[])).is_ok());
        assert!(net.verdict(&host(&["bbbb"])).is_err());
        net.active.insert("bbbb".into(), BTreeSet::new());
        assert!(net.verdict(&host(&["bbbb"])).is_ok());
    }

    #[test]
    fn checks_of_a_restricted_host_go_out_only_from_its_connections() {
        let home: IpAddr = "192.0.2.2".parse().unwrap();
        let cafe: IpAddr = "198.51.100.7".parse().unwrap();
        let net = NetworkView {
            connected: true,
            active: [
                ("home".to_string(), [home].into()),
                ("cafe".to_string(), [cafe].into()),
            ]
            .into(),
        };
        assert_eq!(net.local_addresses_for(&host(&[])), None);
        assert_eq!(
            net.local_addresses_for(&host(&["home"])),
            Some([home].into())
        );
        // Fail closed: no address for the host's connection means no check, not any network.
        assert_eq!(
            net.local_addresses_for(&host(&["gone"])),
            Some(BTreeSet::new())
        );
    }

    #[test]
    fn first_success_makes_reachable() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        let plan = t.plan(t0);
        assert_eq!(plan.check, Some(vec![pi()]));
        let tr = t
            .on_check(t.epoch(), Ok(pi().into()), &ProbeSettings::default(), t0)
            .unwrap();
        assert_eq!((tr.from, tr.to), (Reach::Unknown, Reach::Reachable));
        assert_eq!(t.wants_target(), Some(true));
        assert_eq!(t.address, Some(pi()));
        // Checked again after the present interval, not before.
        assert_eq!(
            t.plan(t0 + Duration::from_secs(1)).wake,
            Some(t0 + Duration::from_secs(3))
        );
    }

    #[test]
    fn disconnect_is_unreachable_at_once_without_a_check() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        let tr = t
            .on_network(Err("network disconnected".into()), t0)
            .unwrap();
        assert_eq!(tr.to, Reach::Unreachable);
        assert_eq!(t.plan(t0 + Duration::from_secs(100)), Plan::default());
        assert_eq!(t.wants_target(), Some(false));
    }

    #[test]
    fn a_check_started_before_a_network_change_is_ignored() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        assert!(t.plan(t0).check.is_some());
        let old = t.epoch();
        t.on_network(Err("network disconnected".into()), t0);
        assert_eq!(
            t.on_check(old, Ok(pi().into()), &ProbeSettings::default(), t0),
            None
        );
        assert_eq!(t.reach, Reach::Unreachable);
    }

    #[test]
    fn vanishing_host_is_lost_after_the_configured_failures_within_ten_seconds() {
        let settings = ProbeSettings::default();
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        // The host dies just after t0; run the schedule, each check taking the full timeout.
        let mut now = t0;
        let lost_at = loop {
            let wake = t.plan(now).wake.expect("a reachable host is re-checked");
            now = wake;
            assert!(t.plan(now).check.is_some());
            now += settings.timeout;
            if let Some(tr) = t.on_check(t.epoch(), Err("no answer".into()), &settings, now) {
                assert_eq!(tr.to, Reach::Unreachable);
                break now;
            }
        };
        assert!(
            lost_at - t0 <= Duration::from_secs(10),
            "lost after {:?}",
            lost_at - t0
        );
        assert!(
            lost_at - t0 >= settings.present_interval,
            "one failure is not enough"
        );
    }

    #[test]
    fn goodbye_confirmed_by_one_failed_check_is_final() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        t.on_addresses_removed(&[pi()], t0);
        let tr = check(&mut t, Err("no answer".into()), t0).unwrap();
        assert_eq!(tr.to, Reach::Unreachable);
        // The last address stays a candidate for the host's return.
        assert_eq!(t.candidates(), vec![pi()]);
    }

    #[test]
    fn goodbye_contradicted_by_a_check_changes_nothing() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        t.on_addresses_removed(&[pi()], t0);
        assert_eq!(check(&mut t, Ok(pi().into()), t0), None);
        assert_eq!(t.reach, Reach::Reachable);
    }

    #[test]
    fn absent_host_is_rechecked_fast_then_with_backoff() {
        let settings = ProbeSettings::default();
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Err("no answer".into()), t0);
        assert_eq!(t.reach, Reach::Unreachable);
        let mut now = t0;
        let mut intervals = vec![];
        for _ in 0..80 {
            let wake = t.plan(now).wake.unwrap();
            intervals.push(wake - now);
            now = wake;
            assert!(t.plan(now).check.is_some());
            assert_eq!(
                t.on_check(t.epoch(), Err("no answer".into()), &settings, now),
                None
            );
        }
        // Fast for the first two minutes: a returning host is seen within absent_interval.
        assert!(intervals[..50]
            .iter()
            .all(|i| *i == settings.absent_interval));
        // Then doubling up to the cap, so idle cost falls towards zero.
        assert_eq!(*intervals.last().unwrap(), settings.absent_max_interval);
        assert!(intervals.windows(2).all(|w| w[1] >= w[0]));
        // And it comes back at the first success.
        now += Duration::from_secs(1);
        t.on_refresh(now);
        assert_eq!(
            check(&mut t, Ok(pi().into()), now).unwrap().to,
            Reach::Reachable
        );
    }

    #[test]
    fn checks_are_timed_from_their_start_not_their_end() {
        let settings = ProbeSettings::default();
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        assert!(t.plan(t0).check.is_some());
        // The check waited out its timeout: the next one still starts absent_interval after it.
        let end = t0 + settings.timeout;
        t.on_check(t.epoch(), Err("no answer".into()), &settings, end);
        let start = t0 + settings.absent_interval;
        assert_eq!(t.plan(end).wake, Some(start));
        assert!(t.plan(start).check.is_some());
        let answered = start + Duration::from_millis(5);
        t.on_check(t.epoch(), Ok(pi().into()), &settings, answered);
        assert_eq!(
            t.plan(answered).wake,
            Some(start + settings.present_interval)
        );
    }

    #[test]
    fn unknown_host_without_address_waits_for_mdns_then_gives_up() {
        let t0 = Instant::now();
        let mut t = HostTracker::new(t0);
        t.on_network(Ok(()), t0);
        assert_eq!(t.plan(t0).wake, Some(t0 + RESOLVE_GRACE));
        // mDNS finds it within the grace: checked at once.
        t.on_addresses_found([pi()], t0 + Duration::from_millis(40));
        assert!(t.plan(t0 + Duration::from_millis(40)).check.is_some());

        let mut t = HostTracker::new(t0);
        t.on_network(Ok(()), t0);
        let plan = t.plan(t0 + RESOLVE_GRACE);
        assert_eq!(plan.check, Some(vec![]));
    }

    #[test]
    fn network_change_makes_a_reachable_host_suspect() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        assert_eq!(t.on_network(Ok(()), t0), None);
        let tr = check(&mut t, Err("no answer".into()), t0).unwrap();
        assert_eq!(tr.to, Reach::Unreachable);
    }

    #[test]
    fn the_address_that_answered_is_tried_first_then_ipv4() {
        let t0 = Instant::now();
        let v6 = HostAddress {
            ip: "fe80::1".parse().unwrap(),
            scope: Some((2, "eth0".into())),
        };
        let other = HostAddress::v4("192.0.2.9".parse().unwrap());
        let mut t = HostTracker::new(t0);
        t.on_network(Ok(()), t0);
        t.on_addresses_found([v6.clone(), pi(), other.clone()], t0);
        assert_eq!(t.candidates(), [other.clone(), pi(), v6.clone()]);
        check(&mut t, Ok(pi().into()), t0);
        assert_eq!(t.candidates(), [pi(), other, v6]);
    }

    #[test]
    fn another_device_answering_the_name_is_named_and_does_not_take_the_host() {
        let t0 = Instant::now();
        let impostor = HostAddress::v4("192.0.2.66".parse().unwrap());
        let pi_v6 = HostAddress {
            ip: "fe80::10".parse().unwrap(),
            scope: Some((2, "eth0".into())),
        };
        let mut t = tracker_with_pi(t0);
        t.on_addresses_found([impostor.clone(), pi_v6.clone()], t0);
        let answered = Answered {
            address: pi(),
            also: vec![impostor.clone(), pi_v6.clone()],
        };
        check(&mut t, Ok(answered), t0);
        assert_eq!(t.address, Some(pi()));
        assert_eq!(t.other_responders, std::slice::from_ref(&impostor));
        assert_eq!(
            t.reason,
            "answered at 192.0.2.10; also answered by 192.0.2.66"
        );
        // The Pi stays the first to ask: the impostor is taken only once the Pi fails.
        assert_eq!(t.candidates()[0], pi());
        // The host's own IPv6 address answering beside its IPv4 one is no second responder.
        let t3 = t0 + Duration::from_secs(3);
        let dual_stack = Answered {
            address: pi(),
            also: vec![pi_v6],
        };
        check(&mut t, Ok(dual_stack), t3);
        assert!(t.other_responders.is_empty());
        assert_eq!(t.reason, "answered at 192.0.2.10");
    }

    #[test]
    fn a_check_asks_a_bounded_number_and_every_reported_address_in_turn() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        let flood: Vec<HostAddress> = (0..=255u8)
            .map(|i| HostAddress::v4([198, 51, 100, i].into()))
            .collect();
        t.on_addresses_found(flood.clone(), t0);
        // The host's own new address, reported after the flood: it must be asked too.
        let moved = HostAddress::v4([192, 0, 2, 11].into());
        t.on_addresses_found([moved.clone()], t0);
        let mut asked = BTreeSet::new();
        let turns = (flood.len() + 1).div_ceil(MAX_ASKED - 1);
        for _ in 0..turns {
            t.on_refresh(t0);
            let candidates = t.plan(t0).check.expect("a check is due");
            assert_eq!(candidates.len(), MAX_ASKED);
            assert_eq!(candidates[0], pi(), "the address that answered comes first");
            asked.extend(candidates);
            t.on_check(t.epoch(), Ok(pi().into()), &ProbeSettings::default(), t0);
        }
        assert!(asked.contains(&moved));
        assert!(flood.iter().all(|a| asked.contains(a)));
    }

    #[test]
    fn sleep_makes_the_host_unreachable_and_resume_checks_it_at_once() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        check(&mut t, Ok(pi().into()), t0);
        assert!(t.plan(t0).check.is_none());
        let running = {
            let t1 = t0 + Duration::from_secs(3);
            assert!(t.plan(t1).check.is_some());
            t.epoch()
        };
        let tr = t.on_sleep().expect("a transition");
        assert_eq!(
            (tr.to, tr.reason.as_str()),
            (Reach::Unreachable, "the machine is going to sleep")
        );
        assert_eq!(t.wants_target(), Some(false));
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!(
            t.on_check(running, Ok(pi().into()), &ProbeSettings::default(), t2),
            None,
            "stale"
        );
        assert_eq!(t.plan(t2), Plan::default(), "no check while asleep");
        t.on_network(Ok(()), t2);
        assert_eq!(
            t.plan(t2),
            Plan::default(),
            "not even after a network change"
        );
        let t3 = t2 + Duration::from_secs(600);
        t.on_resume(t3);
        assert_eq!(
            check(&mut t, Ok(pi().into()), t3).expect("back").to,
            Reach::Reachable
        );
    }

    #[test]
    fn a_burst_of_events_costs_one_check() {
        let t0 = Instant::now();
        let mut t = tracker_with_pi(t0);
        for _ in 0..50 {
            t.on_network(Ok(()), t0);
            t.on_refresh(t0);
            t.on_addresses_found([pi()], t0);
        }
        assert!(t.plan(t0).check.is_some());
        assert_eq!(t.plan(t0), Plan::default(), "one check at a time");
    }
}
