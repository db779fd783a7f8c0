//! The agent's loop: it gathers events from NetworkManager, mDNS, checks, the user manager and
//! `Refresh()` callers, asks [`reconcile`](crate::reconcile) what should be, carries that out
//! (checks, jobs) and publishes the result. Every event only wakes the loop; the loop drains
//! whatever else is queued before deciding, so a burst of events costs one decision per host.
//!
//! When the agent stops it leaves the targets as they are: a restart (an upgrade, a crash and
//! `Restart=on-failure`) then does not interrupt tunnels and mounts, and the next start
//! re-evaluates every host at once.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};
use zbus::connection;

use crate::address::HostAddress;
use crate::config::{Config, HostConfig};
use crate::network;
use crate::probe::{AddressEvent, Probe, Resolver};
use crate::reconcile::{
    target_action, CheckOutcome, HostTracker, JobKind, NetworkView, Reach, TargetView, Transition,
    UnitState,
};
use crate::status::{self, HostStatus};
use crate::units::{UnitEvent, Units};

/// After losing the system bus, try to connect again this often.
const SYSTEM_BUS_RETRY: Duration = Duration::from_secs(2);
/// How long to wait at start for NetworkManager's first view before assuming a network.
const FIRST_NETWORK_VIEW: Duration = Duration::from_secs(3);

/// Where the agent finds its buses: `None` is the default system or session bus.
#[derive(Debug, Clone, Default)]
pub struct Buses {
    pub system: Option<String>,
    pub session: Option<String>,
}

/// A finished check, tagged with the epoch it was started in.
struct CheckDone {
    index: usize,
    epoch: u64,
    outcome: CheckOutcome,
    took: Duration,
}

/// A finished job and the unit's state read right after it.
struct JobDone {
    index: usize,
    kind: JobKind,
    result: Result<(), String>,
    state: Option<UnitState>,
}

/// Everything the agent holds about one host.
struct Host {
    config: HostConfig,
    tracker: HostTracker,
    target: TargetView,
    /// Wall-clock time of the last transition, microseconds since the epoch.
    since: u64,
    last_job: String,
    jobs_sent: u32,
    /// When to look at the target again (a failed job waiting for its retry).
    target_wake: Option<Instant>,
    /// The address last put in the user manager's environment for this host's units.
    environment_address: Option<HostAddress>,
}

impl Host {
    fn status(&self) -> HostStatus {
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
            last_job: self.last_job.clone(),
            jobs_sent: self.jobs_sent,
        }
    }

    fn log(&mut self, transition: Option<Transition>, took: Option<Duration>) {
        let Some(t) = transition else { return };
        self.since = wall_clock_micros();
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
    }
}

fn wall_clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Runs the agent until `shutdown` completes (Ok) or the session bus is lost (Err).
pub async fn run(
    config: Config,
    buses: Buses,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let resolver = Resolver::new().context("cannot start the mDNS resolver")?;
    run_with(config, buses, Arc::new(resolver), shutdown).await
}

/// [`run`], finding and checking hosts with `probe`.
pub async fn run_with(
    config: Config,
    buses: Buses,
    probe: Arc<dyn Probe>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let mut hosts: Vec<Host> = config
        .hosts
        .iter()
        .map(|config| Host {
            config: config.clone(),
            tracker: HostTracker::new(now),
            target: TargetView::new(),
            since: wall_clock_micros(),
            last_job: String::new(),
            jobs_sent: 0,
            target_wake: None,
            environment_address: None,
        })
        .collect();

    let session = match &buses.session {
        Some(address) => connection::Builder::address(address.as_str())?,
        None => connection::Builder::session()?,
    };
    let (publisher, mut refreshes) =
        status::serve(session, hosts.iter().map(Host::status).collect())
            .await
            .context(
                "cannot serve org.reachd.Reachd1 on the session bus (is reachd already running?)",
            )?;
    let session = publisher.connection().clone();
    let units = Units::new(&session)
        .await
        .context("cannot reach the systemd user manager on the session bus")?;

    let (network_tx, mut network_rx) = watch::channel(network::assumed_view());
    let with_addresses = config.hosts.iter().any(|h| !h.connections.is_empty());
    tokio::spawn(follow_network(
        buses.system.clone(),
        network_tx,
        with_addresses,
    ));
    // Decide on NetworkManager's word, not on a guess: wait briefly for its first view.
    if tokio::time::timeout(FIRST_NETWORK_VIEW, network_rx.changed())
        .await
        .is_err()
    {
        warn!(
            "no word from NetworkManager within {} s: assuming a network until it answers",
            FIRST_NETWORK_VIEW.as_secs()
        );
    }
    network_rx.mark_changed(); // The loop handles the first view like any other.

    let (address_tx, mut address_rx) = mpsc::channel(256);
    let (unit_tx, mut unit_rx) = mpsc::channel(64);
    let (check_tx, mut check_rx) = mpsc::channel(64);
    let (job_tx, mut job_rx) = mpsc::channel(64);
    for (index, host) in hosts.iter().enumerate() {
        probe.follow(index, host.config.fqdn(), address_tx.clone());
        units.follow(index, host.config.target.clone(), unit_tx.clone());
    }
    let mut session_lost = Box::pin(session_lost(&session).await?);
    let mut shutdown = std::pin::pin!(shutdown);
    let settings = config.probe;
    info!(
        hosts = hosts.len(),
        "reachd {} running",
        env!("CARGO_PKG_VERSION")
    );

    let mut wake: Option<Instant> = None;
    let result = loop {
        let sleep = tokio::time::sleep_until(
            wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            err = &mut session_lost => break Err(err),
            Some(event) = address_rx.recv() => on_address(&mut hosts, event),
            Some(event) = unit_rx.recv() => on_unit(&mut hosts, event),
            Some(done) = check_rx.recv() => on_check(&mut hosts, done, &settings),
            Some(done) = job_rx.recv() => on_job(&mut hosts, done),
            Some(()) = refreshes.recv() => on_refresh(&mut hosts),
            Ok(()) = network_rx.changed() => on_network(&mut hosts, &network_rx.borrow_and_update(), &*probe),
            () = sleep => {}
        }
        // Take everything else already queued, so that a burst costs one decision.
        while let Ok(event) = address_rx.try_recv() {
            on_address(&mut hosts, event);
        }
        while let Ok(event) = unit_rx.try_recv() {
            on_unit(&mut hosts, event);
        }
        while let Ok(done) = check_rx.try_recv() {
            on_check(&mut hosts, done, &settings);
        }
        while let Ok(done) = job_rx.try_recv() {
            on_job(&mut hosts, done);
        }
        if network_rx.has_changed().unwrap_or(false) {
            on_network(&mut hosts, &network_rx.borrow_and_update(), &*probe);
        }
        // decide() does not await: the view is only borrowed, not copied, on every wake-up.
        wake = decide(
            &mut hosts,
            &network_rx.borrow(),
            &units,
            &*probe,
            &settings,
            &check_tx,
            &job_tx,
        );
        for host in &hosts {
            if let Err(err) = publisher.update(&host.status()).await {
                warn!(host = %host.config.name, "cannot publish status: {err}");
            }
        }
    };
    probe.shutdown();
    // Tasks that follow units still hold the connection: give the name up now, so that a
    // successor (or a test's next agent) can take it at once.
    let _ = session.release_name(status::BUS_NAME).await;
    result
}

/// Resolves when the session bus connection is gone, with the error to exit with.
async fn session_lost(
    session: &zbus::Connection,
) -> anyhow::Result<impl Future<Output = anyhow::Error>> {
    let dbus = zbus::fdo::DBusProxy::new(session).await?;
    let mut owner = dbus
        .receive_name_owner_changed_with_args(&[(0, status::BUS_NAME)])
        .await?;
    Ok(async move {
        while let Some(signal) = owner.next().await {
            if let Ok(args) = signal.args() {
                if args.new_owner.is_none() {
                    return anyhow::anyhow!(
                        "lost the name {} on the session bus",
                        status::BUS_NAME
                    );
                }
            }
        }
        anyhow::anyhow!("the session bus connection was lost")
    })
}

/// Follows NetworkManager for as long as the process runs, reconnecting to the system bus.
async fn follow_network(
    address: Option<String>,
    views: watch::Sender<NetworkView>,
    with_addresses: bool,
) {
    loop {
        let connected = match &address {
            Some(address) => match connection::Builder::address(address.as_str()) {
                Ok(builder) => builder.build().await,
                Err(err) => Err(err),
            },
            None => zbus::Connection::system().await,
        };
        let result = match connected {
            Ok(system) => network::follow(system, views.clone(), with_addresses).await,
            Err(err) => Err(err),
        };
        if views.is_closed() {
            return;
        }
        if let Err(err) = result {
            warn!("cannot follow NetworkManager on the system bus: {err}; trying again");
        }
        tokio::time::sleep(SYSTEM_BUS_RETRY).await;
    }
}

fn on_network(hosts: &mut [Host], view: &NetworkView, probe: &dyn Probe) {
    probe.interfaces_changed();
    let now = Instant::now();
    for host in hosts {
        let transition = host.tracker.on_network(view.verdict(&host.config), now);
        host.log(transition, None);
    }
}

fn on_address(hosts: &mut [Host], event: AddressEvent) {
    let now = Instant::now();
    match event {
        AddressEvent::Found(index, found) => hosts[index].tracker.on_addresses_found(found, now),
        AddressEvent::Removed(index, removed) => {
            hosts[index].tracker.on_addresses_removed(&removed, now)
        }
    }
}

fn on_unit(hosts: &mut [Host], event: UnitEvent) {
    hosts[event.index].target.state = event.state;
}

fn on_check(hosts: &mut [Host], done: CheckDone, settings: &crate::config::ProbeSettings) {
    let host = &mut hosts[done.index];
    let transition = host
        .tracker
        .on_check(done.epoch, done.outcome, settings, Instant::now());
    host.log(transition, Some(done.took));
}

fn on_job(hosts: &mut [Host], done: JobDone) {
    let host = &mut hosts[done.index];
    host.target.job_running = None;
    if let Some(state) = done.state {
        host.target.state = state;
    }
    let unit = &host.config.target;
    match done.result {
        Ok(()) => {
            host.target.last_failure = None;
            host.last_job = format!("{}: done", done.kind.as_str());
            info!(host = %host.config.name, unit, job = done.kind.as_str(), "{} {unit}: done", done.kind.as_str());
        }
        Err(why) => {
            host.target.last_failure = Some((done.kind, Instant::now()));
            host.last_job = format!("{}: {why}", done.kind.as_str());
            warn!(host = %host.config.name, unit, job = done.kind.as_str(), "{} {unit} failed: {why}", done.kind.as_str());
        }
    }
}

fn on_refresh(hosts: &mut [Host]) {
    info!("refresh requested");
    let now = Instant::now();
    for host in hosts {
        host.tracker.on_refresh(now);
        // A refresh also retries a failed job now rather than after its delay.
        host.target.last_failure = None;
    }
}

/// Asks reconcile what to do for every host, starts the checks and jobs it asks for, and
/// returns when to look again.
fn decide(
    hosts: &mut [Host],
    view: &NetworkView,
    units: &Units,
    probe: &dyn Probe,
    settings: &crate::config::ProbeSettings,
    checks: &mpsc::Sender<CheckDone>,
    jobs: &mpsc::Sender<JobDone>,
) -> Option<Instant> {
    let now = Instant::now();
    let mut wake: Option<Instant> = None;
    for (index, host) in hosts.iter_mut().enumerate() {
        let plan = host.tracker.plan(now);
        if let Some(candidates) = plan.check {
            let via = view.local_addresses_for(&host.config);
            spawn_check(
                index,
                host,
                probe,
                candidates,
                via,
                settings.timeout,
                checks.clone(),
            );
        }
        let (job, target_wake) = target_action(host.tracker.wants_target(), &host.target, now);
        host.target_wake = target_wake;
        if let Some(kind) = job {
            host.target.job_running = Some(kind);
            host.jobs_sent += 1;
            host.last_job = format!("{}: running", kind.as_str());
            let address = host.tracker.address.clone();
            if kind == JobKind::Start {
                host.environment_address.clone_from(&address);
            }
            spawn_job(index, host, kind, address, units.clone(), jobs.clone());
        } else if host.target.job_running.is_none()
            && host.tracker.wants_target() == Some(true)
            && host.environment_address.is_some()
            && host.tracker.address != host.environment_address
        {
            // The host answers at a new address (a DHCP lease changed) while its target runs:
            // units restarted from now on (an ssh tunnel's Restart=) must find the new one.
            host.environment_address.clone_from(&host.tracker.address);
            spawn_address_update(host, units.clone());
        }
        for at in [plan.wake, host.target_wake].into_iter().flatten() {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
    }
    wake
}

fn spawn_check(
    index: usize,
    host: &Host,
    probe: &dyn Probe,
    candidates: Vec<HostAddress>,
    via: Option<BTreeSet<IpAddr>>,
    limit: Duration,
    done: mpsc::Sender<CheckDone>,
) {
    let epoch = host.tracker.epoch();
    let check = probe.check(
        host.config.hostname.clone(),
        candidates,
        host.config.port,
        limit,
        via,
    );
    tokio::spawn(async move {
        let started = Instant::now();
        let outcome = check.await;
        let took = started.elapsed();
        let _ = done
            .send(CheckDone {
                index,
                epoch,
                outcome,
                took,
            })
            .await;
    });
}

fn spawn_job(
    index: usize,
    host: &Host,
    kind: JobKind,
    address: Option<HostAddress>,
    units: Units,
    done: mpsc::Sender<JobDone>,
) {
    let unit = host.config.target.clone();
    let variable = host.config.address_variable();
    tokio::spawn(async move {
        let mut result = Ok(());
        if let (JobKind::Start, Some(address)) = (kind, address) {
            // Units started by the target read the address from the manager's environment.
            result = set_address(&units, &variable, &address).await;
        }
        if result.is_ok() {
            result = units.run_job(kind, &unit).await;
        }
        let state = units.state(&unit).await.ok();
        let _ = done
            .send(JobDone {
                index,
                kind,
                result,
                state,
            })
            .await;
    });
}

/// Puts a host's new address in the user manager's environment, without touching its target.
fn spawn_address_update(host: &Host, units: Units) {
    let Some(address) = host.tracker.address.clone() else {
        return;
    };
    let variable = host.config.address_variable();
    let name = host.config.name.clone();
    tokio::spawn(async move {
        match set_address(&units, &variable, &address).await {
            Ok(()) => info!(host = %name, %address, "{variable}={address}: the host moved"),
            Err(err) => warn!(host = %name, "{err}"),
        }
    });
}

async fn set_address(units: &Units, variable: &str, address: &HostAddress) -> Result<(), String> {
    units
        .set_environment(&format!("{variable}={address}"))
        .await
        .map_err(|err| format!("cannot set {variable}: {err}"))
}
