//! The systemd user manager, through systemd-zbus on the session bus: start and stop a target
//! and wait for the job's result, put an address in the manager's environment, and follow the
//! target's state so that a change made by someone else is seen (and corrected) too.

use std::time::Duration;

use futures_util::StreamExt;
use systemd_zbus::{ActiveState, ManagerProxy, Mode, UnitProxy};
use tracing::{debug, warn};
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus::Connection;

use crate::event::{Event, Events, HostId};
use crate::reconcile::{JobKind, UnitState};

/// How long to wait for a job's JobRemoved before reading the unit's state instead.
const JOB_RESULT_TIMEOUT: Duration = Duration::from_secs(120);
/// After losing the unit's property signals, wait this long before following it again.
const REWATCH_DELAY: Duration = Duration::from_secs(1);

/// The systemd user manager.
#[derive(Clone)]
pub struct Units {
    manager: ManagerProxy<'static>,
}

impl Units {
    /// Connects to the user manager and calls `Subscribe`: systemd sends JobRemoved and unit
    /// property signals only to clients that did.
    pub async fn new(session: &Connection) -> zbus::Result<Self> {
        let manager = ManagerProxy::new(session).await?;
        manager.subscribe().await?;
        Ok(Units { manager })
    }

    /// Reads `unit`'s state now (loading the unit if systemd had unloaded it).
    pub async fn state(&self, unit: &str) -> zbus::Result<UnitState> {
        let path = self.manager.load_unit(unit).await?;
        let proxy = UnitProxy::builder(self.manager.inner().connection())
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        if proxy.load_state().await? == "not-found" {
            return Ok(UnitState::NotFound);
        }
        Ok(match proxy.active_state().await {
            Ok(ActiveState::Active | ActiveState::Reloading) => UnitState::Active,
            Ok(ActiveState::Activating) => UnitState::Activating,
            Ok(ActiveState::Deactivating) => UnitState::Deactivating,
            Ok(ActiveState::Inactive) => UnitState::Inactive,
            Ok(ActiveState::Failed) => UnitState::Failed,
            // States newer than systemd-zbus (e.g. "refreshing"): neither started nor stopped.
            Ok(ActiveState::Maintenance) | Err(_) => UnitState::Unknown,
        })
    }

    /// Follows `unit`, the target of `host`, until `events` closes (or the future is dropped),
    /// sending its state at the start and at each change.
    pub async fn follow(self, host: HostId, unit: String, events: Events) {
        loop {
            if let Err(err) = self.follow_once(host, &unit, &events).await {
                warn!(unit, "cannot follow the unit's state: {err}");
            }
            if events.is_closed() {
                return;
            }
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }

    async fn follow_once(&self, host: HostId, unit: &str, events: &Events) -> zbus::Result<()> {
        let connection = self.manager.inner().connection();
        // The object path of a unit depends only on its name, so the subscription outlives the
        // unit being unloaded and loaded again.
        let path = self.manager.load_unit(unit).await?;
        let properties = PropertiesProxy::builder(connection)
            .destination("org.freedesktop.systemd1")?
            .path(path)?
            .build()
            .await?;
        let unit_interface =
            InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Unit");
        let mut changes = properties.receive_properties_changed().await?;
        loop {
            let state = self.state(unit).await?;
            if events.send(Event::UnitState(host, state)).await.is_err() {
                return Ok(());
            }
            // Read again on the next change of the Unit interface's properties.
            loop {
                let Some(signal) = changes.next().await else {
                    return Err(zbus::Error::Failure("unit property signals ended".into()));
                };
                if signal
                    .args()
                    .is_ok_and(|a| a.interface_name == unit_interface)
                {
                    break;
                }
            }
        }
    }

    /// Sets `NAME=value` in the user manager's environment, for the units started next.
    pub async fn set_environment(&self, assignment: &str) -> zbus::Result<()> {
        self.manager.set_environment(&[assignment]).await
    }

    /// Sends a start, stop or restart job for `unit` in "replace" mode and waits for its result:
    /// `Ok("done")` or `Err` with systemd's result ("failed", "dependency", ...) or error.
    pub async fn run_job(&self, kind: JobKind, unit: &str) -> Result<(), String> {
        // The JobRemoved subscription must exist before the job does, or a fast job's result
        // is missed.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(|err| format!("cannot subscribe to job results: {err}"))?;
        let sent = match kind {
            JobKind::Start => self.manager.start_unit(unit, Mode::Replace).await,
            JobKind::Stop => self.manager.stop_unit(unit, Mode::Replace).await,
            JobKind::Restart => self.manager.restart_unit(unit, Mode::Replace).await,
        };
        let job = sent.map_err(|err| match err {
            zbus::Error::MethodError(_, Some(message), _) => message,
            other => other.to_string(),
        })?;
        let result = tokio::time::timeout(JOB_RESULT_TIMEOUT, async {
            while let Some(signal) = removed.next().await {
                match signal.args() {
                    Ok(args) if args.job.as_str() == job.as_str() => {
                        return Some(args.result.to_string())
                    }
                    _ => continue,
                }
            }
            None
        })
        .await;
        match result {
            Ok(Some(result)) if result == "done" => Ok(()),
            Ok(Some(result)) => Err(result),
            Ok(None) => Err("the session bus closed before the job ended".into()),
            Err(_) => {
                debug!(unit, %job, "no JobRemoved in time");
                Err(format!(
                    "no result within {} s",
                    JOB_RESULT_TIMEOUT.as_secs()
                ))
            }
        }
    }
}
