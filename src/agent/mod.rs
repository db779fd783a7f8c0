//! The agent's loop: every source (NetworkManager, mDNS, the user manager, finished checks and
//! jobs, `Refresh()` callers) sends an [`Event`] on one channel; the loop takes whatever is
//! queued, asks [`reconcile`](crate::reconcile) what should be, carries that out through its
//! [`tasks`] and publishes the result. A burst of events costs one decision per host.
//!
//! SIGHUP applies an edited configuration without a restart ([`reload`]).
//!
//! When the agent stops it ends every task it started and leaves the targets as they are: a
//! restart (an upgrade, a crash and `Restart=on-failure`) then does not interrupt tunnels and
//! mounts, and the next start re-evaluates every host at once. Nix is pointed away from every
//! cache first: nothing watches them once the agent is gone.

mod host_state;
mod reload;
mod tasks;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use zbus::connection;

use crate::cache::fragment::Fragment;
use crate::config::{Config, HostConfig, NixCache};
use crate::event::{Event, HostId, SleepLock};
use crate::network;
use crate::notify::Notifier;
use crate::probe::{Probe, Resolver};
use crate::reconcile::{nix_eligibility, JobKind, NetworkView, NixGate, TargetAction};
use crate::status::{self, Publisher};
use crate::units::Units;
use crate::upload::batch::Nix;
use crate::upload::drain::Drain;

use self::host_state::Host;
use self::reload::Reloader;
use self::tasks::Tasks;

/// How long to wait at start for NetworkManager's first view before assuming a network.
const FIRST_NETWORK_VIEW: Duration = Duration::from_secs(3);
/// Events queued for the loop before their senders wait.
const EVENT_QUEUE: usize = 256;
/// When nothing is scheduled, look again after this long anyway.
const IDLE_WAKE: Duration = Duration::from_secs(3600);
/// After a failed write of the nix.conf fragment, try again this soon.
const FRAGMENT_RETRY: Duration = Duration::from_secs(1);

/// Where the agent finds its buses (`None`: the default system or session bus), its runtime
/// directory (`$XDG_RUNTIME_DIR`: the Nix fragment, tunnelled sockets) and the configuration it
/// reads again on a reload (`None`: found as `reachd run` finds it without `--config`).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub system_bus: Option<String>,
    pub session_bus: Option<String>,
    pub runtime_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
}

impl Environment {
    /// The process's own: the default buses and `$XDG_RUNTIME_DIR`.
    pub fn from_process() -> Self {
        Environment {
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|dir| !dir.is_empty())
                .map(PathBuf::from),
            ..Environment::default()
        }
    }
}

/// What the agent is told from outside while it runs: stop when `shutdown` completes, read the
/// configuration again at each item of `reloads` (SIGHUP).
pub struct Control<S, R> {
    pub shutdown: S,
    pub reloads: R,
}

/// Runs the agent until `control.shutdown` completes (Ok) or the session bus is lost (Err).
pub async fn run<S, R>(
    config: Config,
    environment: Environment,
    control: Control<S, R>,
) -> anyhow::Result<()>
where
    S: Future<Output = ()>,
    R: Stream<Item = ()> + Send + 'static,
{
    let resolver = Resolver::new().context("cannot start the mDNS resolver")?;
    run_with(config, environment, Arc::new(resolver), control).await
}

/// [`run`], finding and checking hosts with `probe`. When it returns, every task the agent
/// started has ended and its session bus connection is closed.
pub async fn run_with<S, R>(
    config: Config,
    environment: Environment,
    probe: Arc<dyn Probe>,
    control: Control<S, R>,
) -> anyhow::Result<()>
where
    S: Future<Output = ()>,
    R: Stream<Item = ()> + Send + 'static,
{
    let runtime_dir = runtime_dir_for(&config, environment.runtime_dir.as_deref())?;
    let (events, mut inbox) = mpsc::channel(EVENT_QUEUE);
    // Start is a reload from no host at all: every host is added, the same way.
    let mut reloader = Reloader::new(&environment, 0);
    let now = Instant::now();
    let hosts: Vec<Host> = reload::host_changes(&[], &config.hosts)
        .added
        .into_iter()
        .map(|host| arriving(reloader.new_id(), host, None, now))
        .collect();
    let session = match &environment.session_bus {
        Some(address) => connection::Builder::address(address.as_str())?,
        None => connection::Builder::session()?,
    };
    let publisher = status::serve(
        session,
        hosts.iter().map(Host::status).collect(),
        events.clone(),
    )
    .await
    .context("cannot serve org.reachd.Reachd1 on the session bus")?;
    // Only the one agent that holds the name touches the fragment and the cache ports.
    let (fragment, mut listeners) = start_nix(&config, &runtime_dir).await?;
    let units = Units::new(publisher.connection())
        .await
        .context("cannot reach the systemd user manager on the session bus")?;

    let mut tasks = Tasks::new(events, probe, units, runtime_dir);
    let notifier = tasks.show_notifications(publisher.connection().clone());
    tasks.set_drain(drain_for(&config, None));
    tasks.follow_network(environment.system_bus.clone(), with_addresses(&config));
    tasks.forward_reloads(control.reloads);
    for host in &hosts {
        start_following(&mut tasks, host, listeners.remove(&host.config.name));
    }
    let mut agent = Agent {
        reloader,
        hosts,
        network: None,
        network_changed: false,
        started: Instant::now(),
        config,
        fragment,
        sleep_lock: None,
        tasks,
        notifier,
        publisher,
    };
    info!(
        hosts = agent.hosts.len(),
        "reachd {} running",
        env!("CARGO_PKG_VERSION")
    );
    let result = agent.run(&mut inbox, control.shutdown).await;
    agent.stop().await;
    result
}

/// A host the agent starts to follow, at start (every host) and on a reload (the hosts added):
/// its state, seen against the network known now (none yet at start).
fn arriving(id: HostId, config: &HostConfig, network: Option<&NetworkView>, now: Instant) -> Host {
    let mut host = Host::new(id, config.clone(), now);
    if let Some(network) = network {
        let transition = host.tracker.on_network(network.verdict(config), now);
        // From `unknown`: nothing to notify.
        host.transition(transition, None, None);
    }
    host
}

/// An arriving host's tasks, once its object is published: its served cache on `listener`, then
/// the followers of its name and its target.
fn start_following(tasks: &mut Tasks, host: &Host, listener: Option<TcpListener>) {
    if let Some(listener) = listener {
        tasks.serve_cache(host.id, listener, &host.config);
    }
    tasks.follow_host(host.id, &host.config);
}

/// The runtime directory the configuration needs: `$XDG_RUNTIME_DIR` as given, or none (an
/// empty path) when no host uses Nix.
fn runtime_dir_for(config: &Config, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let uses_nix = config.hosts.iter().any(|h| h.nix.is_some());
    match (given, uses_nix) {
        (Some(dir), _) => Ok(dir.to_path_buf()),
        (None, false) => Ok(PathBuf::new()),
        (None, true) => anyhow::bail!(
            "XDG_RUNTIME_DIR is not set: reachd keeps its nix.conf fragment there and finds tunnelled sockets by it"
        ),
    }
}

/// Whether NetworkManager must be read for the machine's addresses on each connection.
fn with_addresses(config: &Config) -> bool {
    config.hosts.iter().any(|h| !h.connections.is_empty())
}

/// The upload spool and Nix as the configuration names them, if a host uploads (`current`: the
/// drain in use before a reload, whose claims the new one takes turns with).
fn drain_for(config: &Config, current: Option<&Drain>) -> Option<Drain> {
    let uploading: Vec<String> = config
        .hosts
        .iter()
        .filter(|h| h.upload.is_some())
        .map(|h| h.name.clone())
        .collect();
    if uploading.is_empty() {
        return None;
    }
    let nix = Nix::in_dir(config.nix_bin_dir.clone());
    Some(match current {
        Some(drain) => drain.reconfigured(config.spool.clone(), uploading, nix),
        None => Drain::new(config.spool.clone(), uploading, nix),
    })
}

/// Whether reachd writes a nix.conf fragment: a host has a cache or is a remote builder.
fn uses_nix(config: &Config) -> bool {
    config
        .hosts
        .iter()
        .any(|h| h.nix.is_some() || h.builder.is_some())
}

/// Whether a host is a remote builder: remote builds are then off while none is usable.
fn has_builders(config: &Config) -> bool {
    config.hosts.iter().any(|h| h.builder.is_some())
}

/// Empties the nix.conf fragment (Nix is pointed at nothing until a cache answers, remote builds
/// off until a builder is usable; one left by a crash goes now) and binds each served cache's
/// port, by host name.
async fn start_nix(
    config: &Config,
    runtime_dir: &Path,
) -> anyhow::Result<(Option<Fragment>, HashMap<String, TcpListener>)> {
    let mut fragment = uses_nix(config).then(|| Fragment::in_runtime_dir(runtime_dir));
    if let Some(fragment) = &mut fragment {
        fragment
            .set(&[], has_builders(config))
            .with_context(|| format!("cannot write {}", fragment.path().display()))?;
    }
    let listeners = bind_caches(config.hosts.iter()).await?;
    Ok((fragment, listeners))
}

/// Binds the port of each of `hosts`' served caches, by host name.
async fn bind_caches(
    hosts: impl Iterator<Item = &HostConfig>,
) -> anyhow::Result<HashMap<String, TcpListener>> {
    let mut listeners = HashMap::new();
    for host in hosts {
        if let Some(NixCache::Served { listen, .. }) = &host.nix {
            let listener = TcpListener::bind(listen).await.with_context(|| {
                format!("cannot serve host {}'s Nix cache on {listen}", host.name)
            })?;
            listeners.insert(host.name.clone(), listener);
        }
    }
    Ok(listeners)
}

/// The loop's state: the hosts, what NetworkManager says, and the agent's hands.
struct Agent {
    /// In the configuration's order.
    hosts: Vec<Host>,
    /// NetworkManager's last view; `None` until its first one (or [`FIRST_NETWORK_VIEW`]).
    network: Option<NetworkView>,
    network_changed: bool,
    started: Instant,
    /// The configuration in force.
    config: Config,
    reloader: Reloader,
    /// The nix.conf fragment; `None` when no host has `[host.nix]`.
    fragment: Option<Fragment>,
    /// Held while the machine waits to sleep, until every target is stopped.
    sleep_lock: Option<SleepLock>,
    tasks: Tasks,
    /// Desktop notifications: what `[notify]` asks for is queued here.
    notifier: Notifier,
    publisher: Publisher,
}

impl Agent {
    /// The loop: wait for an event or a deadline, take everything queued, decide, publish.
    async fn run(
        &mut self,
        inbox: &mut mpsc::Receiver<Event>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut session_lost =
            std::pin::pin!(session_lost(self.publisher.connection().clone()).await?);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut wake = self.started + FIRST_NETWORK_VIEW;
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                err = &mut session_lost => return Err(err),
                Some(event) = inbox.recv() => self.handle(event),
                () = tokio::time::sleep_until(wake) => {}
            }
            while let Ok(event) = inbox.try_recv() {
                self.handle(event);
            }
            if self.reloader.take_request() {
                self.reload().await;
            }
            wake = self.decide();
            self.publish().await;
            if self.sleep_lock.is_some() && !self.hosts.iter().any(|h| h.target.busy()) {
                info!("targets stopped: the machine may sleep");
                self.sleep_lock = None;
            }
        }
    }

    /// Takes one event in: it only records what changed; [`Agent::decide`] acts on it.
    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        if event.host().is_some_and(|id| !self.follows(id)) {
            return; // from a task of a host a reload removed
        }
        match event {
            Event::Network(view) => {
                self.network = Some(view);
                self.network_changed = true;
            }
            Event::AddressesFound(id, found) => {
                self.host(id).tracker.on_addresses_found(found, now);
            }
            Event::AddressesRemoved(id, removed) => {
                self.host(id).tracker.on_addresses_removed(&removed, now);
            }
            Event::UnitState(id, state) => self.host(id).target.on_state(state),
            Event::CheckDone {
                host,
                epoch,
                outcome,
                took,
            } => {
                let (settings, notify) = (self.config.probe, self.config.notify);
                let host = self.host(host);
                let others_before = host.tracker.other_responders.clone();
                let transition = host.tracker.on_check(epoch, outcome, &settings, now);
                let notice = host.transition(transition, Some(took), notify.as_ref());
                host.log_other_responders(&others_before);
                self.notifier.send(notice);
            }
            Event::JobDone {
                host,
                kind,
                result,
                state,
            } => {
                let host = self.host(host);
                host.target.on_job_done(kind, &result, state, now);
                host.log_job(kind, &result);
            }
            Event::AddressSet {
                host,
                address,
                result,
            } => {
                let host = self.host(host);
                host.target.on_address_set(&result, now);
                host.log_address(&address, &result);
            }
            Event::NixChecked {
                host,
                epoch,
                result,
            } => {
                let interval = self.config.probe.cache_check_interval;
                if let Some(gate) = &mut self.host(host).nix {
                    gate.on_check(epoch, result, interval, now);
                }
            }
            Event::CacheSilent(host) => {
                if let Some(gate) = &mut self.host(host).nix {
                    gate.on_silence(now);
                }
            }
            Event::UploadDone {
                host,
                epoch,
                outcome,
            } => {
                let notify = self.config.notify;
                let notice = self
                    .host(host)
                    .on_upload(epoch, &outcome, notify.as_ref(), now);
                self.notifier.send(notice);
            }
            Event::Sleep(lock) => {
                for host in &mut self.hosts {
                    let transition = host.tracker.on_sleep();
                    let notice = host.transition(transition, None, self.config.notify.as_ref());
                    self.notifier.send(notice);
                }
                self.sleep_lock = Some(lock);
            }
            Event::Resume => {
                self.sleep_lock = None;
                for host in &mut self.hosts {
                    host.tracker.on_resume(now);
                }
            }
            Event::Refresh => {
                info!("refresh requested");
                // mDNS too: a host never found is otherwise asked for again only when
                // mdns-sd's doubling delay next runs out.
                self.tasks.interfaces_changed();
                for host in &mut self.hosts {
                    host.tracker.on_refresh(now);
                    host.target.on_refresh();
                }
            }
            Event::Reload => self.reloader.request(),
        }
    }

    fn follows(&self, id: HostId) -> bool {
        self.hosts.iter().any(|h| h.id == id)
    }

    fn host(&mut self, id: HostId) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.id == id)
            .expect("events of hosts no longer followed are dropped")
    }

    /// Asks reconcile what to do for every host, starts the checks and jobs it asks for, and
    /// returns when to look again.
    fn decide(&mut self) -> Instant {
        let now = Instant::now();
        self.tasks.reap();
        if self.network.is_none() {
            if now < self.started + FIRST_NETWORK_VIEW {
                return self.started + FIRST_NETWORK_VIEW;
            }
            warn!(
                "no word from NetworkManager within {} s: assuming a network until it answers",
                FIRST_NETWORK_VIEW.as_secs()
            );
            self.network = Some(network::assumed_view());
            self.network_changed = true;
        }
        let network = self.network.as_ref().expect("set above");
        if std::mem::take(&mut self.network_changed) {
            self.tasks.interfaces_changed();
            for host in &mut self.hosts {
                let transition = host.tracker.on_network(network.verdict(&host.config), now);
                let notice = host.transition(transition, None, self.config.notify.as_ref());
                self.notifier.send(notice);
            }
        }
        let mut wake = now + IDLE_WAKE;
        let mut actions = Vec::new();
        for (index, host) in self.hosts.iter_mut().enumerate() {
            let id = host.id;
            let plan = host.tracker.plan(now);
            if let Some(candidates) = plan.check {
                self.tasks
                    .check(host, candidates, network, &self.config.probe);
            }
            if let Some(at) = decide_nix(&mut self.tasks, id, host, now) {
                wake = wake.min(at);
            }
            let tracker = &host.tracker;
            let action =
                host.target
                    .next_action(tracker.wants_target(), tracker.address.as_ref(), now);
            if let TargetAction::Nothing(Some(at)) = action {
                wake = wake.min(at);
            }
            wake = wake.min(plan.wake.unwrap_or(wake));
            actions.push((index, action));
        }
        // Nix leaves a cache before its target (and the tunnel) is stopped.
        if let Some(retry) = self.point_nix() {
            wake = wake.min(retry);
        }
        for (index, action) in actions {
            let (id, host) = (self.hosts[index].id, &self.hosts[index].config);
            match action {
                TargetAction::Nothing(_) => {}
                TargetAction::Start(address) => self.tasks.job(id, host, JobKind::Start, address),
                TargetAction::Stop => self.tasks.job(id, host, JobKind::Stop, None),
                TargetAction::SetAddress(address) => self.tasks.set_address(id, host, address),
                TargetAction::Move(address) => {
                    self.tasks.job(id, host, JobKind::Restart, Some(address))
                }
            }
        }
        wake
    }

    /// Writes the nix.conf fragment with the caches in use now, and remote builds off while no
    /// builder is usable, if that changed. When the write fails, returns when to try again.
    fn point_nix(&mut self) -> Option<Instant> {
        let fragment = self.fragment.as_mut()?;
        let in_use: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.nix.as_ref().is_some_and(|g| g.in_use()))
            .filter_map(|h| h.config.nix.as_ref().map(NixCache::substituter))
            .collect();
        let builders_off =
            has_builders(&self.config) && !self.hosts.iter().any(|h| h.builder_in_use());
        match fragment.set(&in_use, builders_off) {
            Ok(true) => info!(
                caches = ?in_use,
                builders_off,
                "{}: Nix caches in use: {in_use:?}{}",
                fragment.path().display(),
                if builders_off { "; remote builds off" } else { "" }
            ),
            Ok(false) => {}
            Err(err) => {
                warn!(
                    "cannot write {}: {err}; trying again",
                    fragment.path().display()
                );
                return Some(Instant::now() + FRAGMENT_RETRY);
            }
        }
        None
    }

    /// Publishes every host's state; only what changed is signalled.
    async fn publish(&self) {
        for host in &self.hosts {
            if let Err(err) = self.publisher.update(&host.status()).await {
                warn!(host = %host.config.name, "cannot publish status: {err}");
            }
        }
    }

    /// Points Nix away from every cache (and its remote builds off), ends every task, gives the bus name up (with a reply, so that a successor started right
    /// after can take it) and closes the session bus connection.
    async fn stop(mut self) {
        let builders_off = has_builders(&self.config);
        if let Some(fragment) = &mut self.fragment {
            if let Err(err) = fragment.set(&[], builders_off) {
                warn!("cannot write {}: {err}", fragment.path().display());
            }
        }
        self.tasks.shutdown().await;
        let connection = self.publisher.into_connection();
        let _ = connection.release_name(status::BUS_NAME).await;
        let _ = connection.close().await;
    }
}

/// Whether Nix may use the host's cache and whether to upload to it (only while the cache
/// answers): starts the cache check or the run over the upload queue that is due, stops an
/// upload when the host goes, and returns when to look again.
fn decide_nix(tasks: &mut Tasks, id: HostId, host: &mut Host, now: Instant) -> Option<Instant> {
    let eligibility = nix_eligibility(&host.tracker, &host.target);
    let mut wake: Option<Instant> = None;
    if let Some(gate) = &mut host.nix {
        let plan = gate.plan(eligibility.clone(), now);
        if plan.check {
            tasks.nix_check(id, &host.config, gate.epoch());
        }
        wake = plan.wake;
    }
    // Uploads go through the same tunnel: only once the cache check saw the host's daemon (or
    // its HTTP cache) answer, not as soon as the target is active (its units may still start).
    let cache_answers = host.nix.as_ref().is_some_and(NixGate::in_use);
    if let Some(gate) = &mut host.upload {
        let plan = gate.plan(cache_answers, now);
        if plan.stop {
            if let Some(run) = host.upload_run.take() {
                run.abort();
            }
        }
        if let Some(run) = plan.start {
            host.upload_run = tasks.upload(id, &host.config, gate.epoch(), run);
        }
        wake = [wake, plan.wake].into_iter().flatten().min();
    }
    wake
}

/// Resolves when the session bus connection is gone, with the error to exit with.
async fn session_lost(
    session: zbus::Connection,
) -> anyhow::Result<impl Future<Output = anyhow::Error>> {
    let dbus = zbus::fdo::DBusProxy::new(&session).await?;
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
