//! Applying an edited configuration without a restart (SIGHUP: `systemctl --user reload
//! reachd`), so that adding a host does not interrupt the tunnels and mounts of the others.
//!
//! The file is read and checked whole first, and everything that can fail (the runtime
//! directory Nix needs, the port of a new served cache) is done before anything changes: a bad
//! file is refused with its one-line error and the configuration in force stays, untouched.
//! Then hosts are compared by their whole `[[host]]` table:
//! - an unchanged host keeps its state, its tasks and its object; its target is not touched;
//! - a removed host's tasks end (checks, a job or an upload under way, its served cache) and its
//!   object goes; its target is left as it is, as when the agent stops, and its cache leaves the
//!   nix.conf fragment at the next decision;
//! - a changed host is removed and added again: it starts afresh, as after a restart of the
//!   agent (its target is not stopped, and is adopted as it is);
//! - a new host is followed as at start: found, checked, its object published and `Hosts`
//!   signalled.
//!
//! Top-level settings apply from the next decision: `[probe]` to every host's next check,
//! `[nix] spool` to the next run over the spool, `[nix] bin_dir` to the next upload, `[notify]`
//! to the next change of a host and the next upload's outcome.

use std::collections::HashMap;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cache::fragment::Fragment;
use crate::config::{self, Config, HostConfig, NixCache};
use crate::error::Chain;
use crate::event::HostId;

use super::{
    arriving, bind_caches, drain_for, runtime_dir_for, start_following, uses_nix, with_addresses,
    Agent, Environment,
};

/// Where the agent reads its configuration again, and what it needs to follow new hosts.
pub(super) struct Reloader {
    config_file: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    system_bus: Option<String>,
    /// The id the next new host gets.
    next_id: usize,
    requested: bool,
}

impl Reloader {
    /// For an agent started in `environment` with `hosts` hosts (ids `0..hosts`).
    pub fn new(environment: &Environment, hosts: usize) -> Self {
        Reloader {
            config_file: environment.config_file.clone(),
            runtime_dir: environment.runtime_dir.clone(),
            system_bus: environment.system_bus.clone(),
            next_id: hosts,
            requested: false,
        }
    }

    /// A reload was asked for: it happens once the events queued are taken in.
    pub fn request(&mut self) {
        self.requested = true;
    }

    /// Whether a reload was asked for since the last call.
    pub fn take_request(&mut self) -> bool {
        std::mem::take(&mut self.requested)
    }

    pub fn new_id(&mut self) -> HostId {
        self.next_id += 1;
        HostId(self.next_id - 1)
    }
}

/// What a new configuration changes in the hosts followed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct HostChanges<'a> {
    /// Hosts whose table is gone or changed.
    pub removed: Vec<HostId>,
    /// Tables that are new or changed, in the configuration's order.
    pub added: Vec<&'a HostConfig>,
}

/// Compares the hosts followed with those of the new configuration, table by table.
pub(super) fn host_changes<'a>(
    followed: &[(HostId, &HostConfig)],
    new: &'a [HostConfig],
) -> HostChanges<'a> {
    HostChanges {
        removed: followed
            .iter()
            .filter(|(_, config)| !new.contains(config))
            .map(|(id, _)| *id)
            .collect(),
        added: new
            .iter()
            .filter(|config| !followed.iter().any(|(_, kept)| kept == config))
            .collect(),
    }
}

/// The names of `hosts`, for the log.
fn names<'a>(hosts: impl Iterator<Item = &'a HostConfig>) -> Vec<&'a str> {
    hosts.map(|h| h.name.as_str()).collect()
}

impl Agent {
    /// Reads the configuration file again and applies it; one that cannot be read, is not
    /// valid or cannot be applied changes nothing.
    pub(super) async fn reload(&mut self) {
        let (config, source) = match config::load(self.reloader.config_file.as_deref()) {
            Ok(loaded) => loaded,
            Err(err) => {
                warn!(
                    "reload refused, the configuration in force is kept: {}",
                    Chain(&err)
                );
                return;
            }
        };
        if config == self.config {
            info!("reload: {source}: nothing changed");
            return;
        }
        let followed: Vec<_> = self.hosts.iter().map(|h| (h.id, &h.config)).collect();
        let changes = host_changes(&followed, &config.hosts);
        let gone: Vec<HostConfig> = changes
            .removed
            .iter()
            .filter_map(|id| self.hosts.iter().find(|h| h.id == *id))
            .map(|h| h.config.clone())
            .collect();
        let mut listeners = match self.prepare(&config, &changes.added, &gone).await {
            Ok(listeners) => listeners,
            Err(err) => {
                warn!(
                    "reload refused, the configuration in force is kept: {}",
                    Chain(err.as_ref())
                );
                return;
            }
        };
        for id in changes.removed {
            self.drop_host(id).await;
        }
        // The ports the removed hosts' caches held are free now.
        let freed = changes
            .added
            .iter()
            .copied()
            .filter(|h| !listeners.contains_key(&h.name));
        match bind_caches(freed).await {
            Ok(bound) => listeners.extend(bound),
            Err(err) => warn!("{}", Chain(err.as_ref())),
        }
        for host in &changes.added {
            self.follow_new_host(host, &mut listeners).await;
        }
        self.apply_settings(&config);
        self.hosts
            .sort_by_key(|h| config.hosts.iter().position(|c| c.name == h.config.name));
        let names_now: Vec<&str> = self.hosts.iter().map(|h| h.config.name.as_str()).collect();
        if let Err(err) = self.publisher.set_hosts(&names_now).await {
            warn!("cannot publish the hosts' list: {err}");
        }
        let changed = names(
            gone.iter()
                .filter(|g| config.hosts.iter().any(|h| h.name == g.name)),
        );
        info!(
            "configuration reloaded from {source}: added {:?}, removed {:?}, changed {changed:?}",
            names(
                changes
                    .added
                    .iter()
                    .copied()
                    .filter(|h| !changed.contains(&h.name.as_str()))
            ),
            names(gone.iter().filter(|g| !changed.contains(&g.name.as_str()))),
        );
        self.config = config;
    }

    /// What can fail before anything changes: the runtime directory the new configuration
    /// needs, and the ports of the new hosts' caches that no removed host holds.
    async fn prepare(
        &self,
        config: &Config,
        added: &[&HostConfig],
        gone: &[HostConfig],
    ) -> anyhow::Result<HashMap<String, TcpListener>> {
        runtime_dir_for(config, self.reloader.runtime_dir.as_deref())?;
        let held = |listen: &std::net::SocketAddr| {
            gone.iter().any(
                |g| matches!(&g.nix, Some(NixCache::Served { listen: held, .. }) if held == listen),
            )
        };
        let unheld = added.iter().copied().filter(|h| match &h.nix {
            Some(NixCache::Served { listen, .. }) => !held(listen),
            _ => false,
        });
        bind_caches(unheld).await
    }

    /// Stops following a host: its tasks end, its object goes, its target stays as it is.
    async fn drop_host(&mut self, id: HostId) {
        self.tasks.end_host(id).await;
        let Some(index) = self.hosts.iter().position(|h| h.id == id) else {
            return;
        };
        let host = self.hosts.remove(index);
        let (name, target) = (&host.config.name, &host.config.target);
        if let Err(err) = self.publisher.remove_host(name).await {
            warn!(host = %name, "cannot remove the host's object: {err}");
        }
        info!(host = %name, "{name}: no longer followed; {target} left as it is");
    }

    /// Follows a host the new configuration adds, as at start ([`arriving`], [`start_following`]). A host whose served cache has
    /// no port (see [`Agent::reload`]) is not followed: Nix would be pointed at nothing.
    async fn follow_new_host(
        &mut self,
        config: &HostConfig,
        listeners: &mut HashMap<String, TcpListener>,
    ) {
        let listener = listeners.remove(&config.name);
        if matches!(config.nix, Some(NixCache::Served { .. })) && listener.is_none() {
            warn!(host = %config.name, "{}: not followed: its Nix cache has no port", config.name);
            return;
        }
        let id = self.reloader.new_id();
        let host = arriving(id, config, self.network.as_ref(), Instant::now());
        if let Err(err) = self.publisher.add_host(host.status()).await {
            warn!(host = %config.name, "cannot publish the host's object: {err}");
        }
        start_following(&mut self.tasks, &host, listener);
        self.hosts.push(host);
    }

    /// The top-level settings of `config`, from the next decision on.
    fn apply_settings(&mut self, config: &Config) {
        self.tasks.set_drain(drain_for(config, self.tasks.drain()));
        if with_addresses(config) != with_addresses(&self.config) {
            let bus = self.reloader.system_bus.clone();
            self.tasks.follow_network(bus, with_addresses(config));
        }
        if uses_nix(config) && self.fragment.is_none() {
            let runtime_dir = self.reloader.runtime_dir.clone().unwrap_or_default();
            self.fragment = Some(Fragment::in_runtime_dir(&runtime_dir));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(text: &str) -> Vec<HostConfig> {
        config::parse(text, "reload.toml")
            .expect("a valid configuration")
            .hosts
    }

    #[test]
    fn hosts_are_compared_by_their_whole_table() {
        let old = hosts(
            "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n\
             [[host]]\nname = \"nas\"\nhostname = \"nas.local\"\n\
             [[host]]\nname = \"tv\"\nhostname = \"tv.local\"\n",
        );
        let new = hosts(
            "[[host]]\nname = \"nas\"\nhostname = \"nas.local\"\nport = 22\n\
             [[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n\
             [[host]]\nname = \"pc\"\nhostname = \"pc.local\"\n",
        );
        let followed: Vec<_> = old
            .iter()
            .enumerate()
            .map(|(i, h)| (HostId(i + 10), h))
            .collect();
        let changes = host_changes(&followed, &new);
        // rpi unchanged (moved in the file: still unchanged), nas changed, tv gone, pc new.
        assert_eq!(changes.removed, [HostId(11), HostId(12)]);
        assert_eq!(names(changes.added.into_iter()), ["nas", "pc"]);
    }

    #[test]
    fn the_same_hosts_change_nothing() {
        let old = hosts("[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n");
        let followed = [(HostId(0), &old[0])];
        let changes = host_changes(&followed, &old);
        assert_eq!(
            changes,
            HostChanges {
                removed: vec![],
                added: vec![]
            }
        );
    }

    #[test]
    fn new_ids_are_never_reused() {
        let mut reloader = Reloader::new(&Environment::default(), 2);
        assert_eq!(reloader.new_id(), HostId(2));
        assert_eq!(reloader.new_id(), HostId(3));
    }
}
