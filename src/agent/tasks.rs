//! The agent's hands: everything it starts that runs on its own (followers of NetworkManager,
//! mDNS and the units; checks; jobs; address updates) is a task in a [`JoinSet`] that the
//! agent owns, and each reports back as an [`Event`]. A host's tasks are in a set of their own,
//! so that a reload that removes the host ends exactly them ([`Tasks::end_host`]).
//! [`Tasks::shutdown`] ends them all and waits, so that when the agent returns nothing of it is
//! left running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::warn;
use zbus::connection;

use crate::address::HostAddress;
use crate::cache::health;
use crate::cache::hearing::Hearing;
use crate::cache::server::{self as cache, CacheSettings};
use crate::config::{expand_runtime_dir, expand_store_uri, HostConfig, NixCache, ProbeSettings};
use crate::event::{Event, Events, HostId};
use crate::network;
use crate::notify::Notifier;
use crate::probe::{CheckRequest, Probe};
use crate::reconcile::{JobKind, NetworkView, Run, NIX_CHECK_DEADLINE};
use crate::sleep;
use crate::units::Units;
use crate::upload::drain::Drain;

use super::host_state::Host;

/// After losing the system bus, try to connect again this often.
const SYSTEM_BUS_RETRY: Duration = Duration::from_secs(2);

/// Starts the agent's work and owns it.
pub(super) struct Tasks {
    /// The agent's own tasks (NetworkManager, signals); a host's are in `hosts`.
    running: JoinSet<()>,
    hosts: HashMap<HostId, JoinSet<()>>,
    /// What the cache served for a host has heard from its daemon; the host's checks of the
    /// cache are heard by it too.
    hearings: HashMap<HostId, Arc<Hearing>>,
    /// The follower of NetworkManager, to start it again when what it reads changes.
    network: Option<AbortHandle>,
    events: Events,
    probe: Arc<dyn Probe>,
    units: Units,
    /// `$XDG_RUNTIME_DIR`, where tunnelled daemon sockets (`%t/`) are.
    runtime_dir: PathBuf,
    /// The upload spool, when a host uploads.
    drain: Option<Drain>,
}

impl Tasks {
    pub fn new(events: Events, probe: Arc<dyn Probe>, units: Units, runtime_dir: PathBuf) -> Self {
        Tasks {
            running: JoinSet::new(),
            hosts: HashMap::new(),
            hearings: HashMap::new(),
            network: None,
            events,
            probe,
            units,
            runtime_dir,
            drain: None,
        }
    }

    /// Uploads go through `drain` from now on (none: no host uploads).
    pub fn set_drain(&mut self, drain: Option<Drain>) {
        self.drain = drain;
    }

    /// The upload spool, if a host uploads.
    pub fn drain(&self) -> Option<&Drain> {
        self.drain.as_ref()
    }

    /// Shows desktop notifications through `session` ([`crate::notify`]) until the agent stops;
    /// the notifier queues them.
    pub fn show_notifications(&mut self, session: zbus::Connection) -> Notifier {
        let (notifier, shower) = Notifier::new(session);
        self.running.spawn(shower);
        notifier
    }

    /// Sends [`Event::Reload`] for each item of `requests` (SIGHUP).
    pub fn forward_reloads(&mut self, requests: impl Stream<Item = ()> + Send + 'static) {
        let events = self.events.clone();
        self.running.spawn(async move {
            let mut requests = std::pin::pin!(requests);
            while requests.next().await.is_some() {
                if events.send(Event::Reload).await.is_err() {
                    return;
                }
            }
        });
    }

    /// Follows NetworkManager and logind (sleep) on the system bus at `address` (the default
    /// system bus when `None`), reconnecting whenever the bus goes away; `with_addresses`: also
    /// the machine's addresses on each connection. Called again, it ends the previous follower.
    pub fn follow_network(&mut self, address: Option<String>, with_addresses: bool) {
        if let Some(previous) = self.network.take() {
            previous.abort();
        }
        let events = self.events.clone();
        self.network = Some(self.running.spawn(async move {
            loop {
                let connected = match &address {
                    Some(address) => match connection::Builder::address(address.as_str()) {
                        Ok(builder) => builder.build().await,
                        Err(err) => Err(err),
                    },
                    None => zbus::Connection::system().await,
                };
                let result = match connected {
                    // NetworkManager and logind share the connection; either ending ends both.
                    Ok(system) => tokio::select! {
                        result = network::follow(system.clone(), events.clone(), with_addresses) => result,
                        result = sleep::follow(&system, &events) => result,
                    },
                    Err(err) => Err(err),
                };
                if events.is_closed() {
                    return;
                }
                if let Err(err) = result {
                    warn!("cannot follow NetworkManager on the system bus: {err}; trying again");
                }
                tokio::time::sleep(SYSTEM_BUS_RETRY).await;
            }
        }));
    }

    /// The set of the host's own tasks.
    fn of_host(&mut self, id: HostId) -> &mut JoinSet<()> {
        self.hosts.entry(id).or_default()
    }

    /// Ends every task of the host (following, checks, a job or an upload under way, its
    /// cache) and waits until they are gone. Its target is left as it is.
    pub async fn end_host(&mut self, id: HostId) {
        if let Some(mut tasks) = self.hosts.remove(&id) {
            tasks.shutdown().await;
        }
        self.hearings.remove(&id);
    }

    /// Follows the host's addresses (mDNS) and its target's state (the user manager).
    pub fn follow_host(&mut self, id: HostId, host: &HostConfig) {
        let events = self.events.clone();
        let resolution = self.probe.follow(id, host.fqdn(), events.clone());
        let unit = self.units.clone().follow(id, host.target.clone(), events);
        let tasks = self.of_host(id);
        tasks.spawn(resolution);
        tasks.spawn(unit);
    }

    /// NetworkManager changed something: mDNS should look at the interfaces again.
    pub fn interfaces_changed(&self) {
        self.probe.interfaces_changed();
    }

    /// Starts a check of the host against `candidates`, from the machine's addresses the
    /// network allows for it, tagged with its tracker's epoch.
    pub fn check(
        &mut self,
        host: &Host,
        candidates: Vec<HostAddress>,
        network: &NetworkView,
        settings: &ProbeSettings,
    ) {
        let (id, config) = (host.id, &host.config);
        let via = network.local_addresses_for(config);
        let epoch = host.tracker.epoch();
        let check = self.probe.check(CheckRequest {
            hostname: config.hostname.clone(),
            candidates,
            port: config.port,
            limit: settings.timeout,
            via,
        });
        let events = self.events.clone();
        self.of_host(id).spawn(async move {
            let started = Instant::now();
            let outcome = check.await;
            let took = started.elapsed();
            let _ = events
                .send(Event::CheckDone {
                    host: id,
                    epoch,
                    outcome,
                    took,
                })
                .await;
        });
    }

    /// Sends a job for the host's target, after putting `address` in the user manager's
    /// environment for a start or a restart, and reports its result with the unit's state right
    /// after.
    pub fn job(
        &mut self,
        id: HostId,
        host: &HostConfig,
        kind: JobKind,
        address: Option<HostAddress>,
    ) {
        let unit = host.target.clone();
        let variable = host.address_variable();
        let units = self.units.clone();
        let events = self.events.clone();
        self.of_host(id).spawn(async move {
            let mut result = Ok(());
            if let (JobKind::Start | JobKind::Restart, Some(address)) = (kind, address) {
                // Units started by the target read the address from the manager's environment.
                result = set_address(&units, &variable, &address).await;
            }
            if result.is_ok() {
                result = units.run_job(kind, &unit).await;
            }
            let state = units.state(&unit).await.ok();
            let _ = events
                .send(Event::JobDone {
                    host: id,
                    kind,
                    result,
                    state,
                })
                .await;
        });
    }

    /// Puts the host's new address in the user manager's environment, without touching its
    /// target, and reports how that went.
    pub fn set_address(&mut self, id: HostId, host: &HostConfig, address: HostAddress) {
        let variable = host.address_variable();
        let units = self.units.clone();
        let events = self.events.clone();
        self.of_host(id).spawn(async move {
            let result = set_address(&units, &variable, &address).await;
            let _ = events
                .send(Event::AddressSet {
                    host: id,
                    address,
                    result,
                })
                .await;
        });
    }

    /// Serves a host's store as a binary cache on `listener`, from the daemon socket of `cache`.
    pub fn serve_cache(
        &mut self,
        id: HostId,
        listener: tokio::net::TcpListener,
        host: &HostConfig,
    ) {
        let Some(NixCache::Served { daemon_socket, .. }) = &host.nix else {
            return;
        };
        let upstream = expand_runtime_dir(daemon_socket, &self.runtime_dir);
        let name = host.name.clone();
        let hearing = Arc::new(Hearing::default());
        self.hearings.insert(id, hearing.clone());
        let mut doubts = hearing.doubts();
        let serving = cache::serve(
            listener,
            upstream,
            hearing,
            CacheSettings::default(),
            std::future::pending(),
        );
        self.of_host(id).spawn(async move {
            if let Err(err) = serving.await {
                warn!(host = %name, "the binary cache stopped: {err}");
            }
        });
        // The cache notices a silent host in under a second, its checks only within seconds.
        let events = self.events.clone();
        self.of_host(id).spawn(async move {
            while doubts.wait_for(|doubt| *doubt).await.is_ok() {
                if events.send(Event::CacheSilent(id)).await.is_err() {
                    return;
                }
                if doubts.wait_for(|doubt| !*doubt).await.is_err() {
                    return;
                }
            }
        });
    }

    /// Checks the host's Nix cache within [`NIX_CHECK_DEADLINE`], tagged with `epoch`; heard by
    /// the cache reachd serves for it, so that a daemon that answers ends the cache's doubt.
    pub fn nix_check(&mut self, id: HostId, host: &HostConfig, epoch: u64) {
        let Some(cache) = host.nix.clone() else {
            return;
        };
        let runtime_dir = self.runtime_dir.clone();
        let events = self.events.clone();
        let hearing = self.hearings.get(&id).cloned();
        self.of_host(id).spawn(async move {
            let result = health::check(&cache, &runtime_dir, NIX_CHECK_DEADLINE, hearing).await;
            let _ = events
                .send(Event::NixChecked {
                    host: id,
                    epoch,
                    result,
                })
                .await;
        });
    }

    /// Starts a run over the host's upload queue (a count, or a batch uploaded), tagged with
    /// `epoch`; the handle stops it.
    pub fn upload(
        &mut self,
        id: HostId,
        host: &HostConfig,
        epoch: u64,
        run: Run,
    ) -> Option<AbortHandle> {
        let (drain, store) = (self.drain.clone()?, host.upload.as_ref()?);
        let store = expand_store_uri(store, &self.runtime_dir);
        let name = host.name.clone();
        let events = self.events.clone();
        Some(self.of_host(id).spawn(async move {
            let outcome = drain.run(&name, &store, run).await;
            let _ = events
                .send(Event::UploadDone {
                    host: id,
                    epoch,
                    outcome,
                })
                .await;
        }))
    }

    /// Forgets tasks that ended, so that the set holds only running ones.
    pub fn reap(&mut self) {
        for tasks in std::iter::once(&mut self.running).chain(self.hosts.values_mut()) {
            while let Some(ended) = tasks.try_join_next() {
                if let Err(err) = ended {
                    if err.is_panic() {
                        warn!("an agent task panicked: {err}");
                    }
                }
            }
        }
    }

    /// Ends every task and waits for them; then stops the probe.
    pub async fn shutdown(mut self) {
        self.running.shutdown().await;
        for (_, mut tasks) in self.hosts.drain() {
            tasks.shutdown().await;
        }
        self.probe.shutdown();
    }
}

async fn set_address(units: &Units, variable: &str, address: &HostAddress) -> Result<(), String> {
    units
        .set_environment(&format!("{variable}={address}"))
        .await
        .map_err(|err| format!("cannot set {variable}: {err}"))
}
