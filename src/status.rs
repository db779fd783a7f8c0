//! What reachd holds, published on the session bus as `org.reachd.Reachd1` (the contract is
//! dbus-interfaces/org.reachd.Reachd1.xml): a root object with `Refresh()` and the list of
//! hosts, and one object per host whose properties emit PropertiesChanged, all changed
//! properties of one decision in one signal.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::{connection, fdo, interface, Connection};

pub const BUS_NAME: &str = "org.reachd.Reachd1";
pub const ROOT_PATH: &str = "/org/reachd/Reachd1";
pub const ROOT_INTERFACE: &str = "org.reachd.Reachd1";
pub const HOST_INTERFACE: &str = "org.reachd.Reachd1.Host";

/// The object path of a host: `/org/reachd/Reachd1/host/<name>`, with `-` as `_` (object paths
/// allow only `[A-Za-z0-9_]`; host names have no `_`, so the mapping is one to one).
pub fn host_path(name: &str) -> OwnedObjectPath {
    let path = format!("{ROOT_PATH}/host/{}", name.replace('-', "_"));
    OwnedObjectPath::try_from(path).expect("validated host names make valid object paths")
}

/// One host's published state. Also what `reachd status --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub hostname: String,
    pub target: String,
    pub reachable: bool,
    /// "unknown", "reachable" or "unreachable".
    pub state: String,
    /// The address that answered last (empty until one did).
    pub address: String,
    /// Why the state is what it is, in words.
    pub reason: String,
    /// When `state` last changed, in microseconds since the Unix epoch.
    pub since: u64,
    /// The target's ActiveState as systemd reports it, or "not-found" / "unknown".
    pub target_state: String,
    /// The last job reachd sent for the target and its result, e.g. "start: done".
    pub last_job: String,
    /// How many jobs reachd has sent for the target since it started.
    pub jobs_sent: u32,
}

struct HostObject(HostStatus);

#[interface(name = "org.reachd.Reachd1.Host")]
impl HostObject {
    #[zbus(property)]
    fn name(&self) -> &str {
        &self.0.name
    }
    #[zbus(property)]
    fn hostname(&self) -> &str {
        &self.0.hostname
    }
    #[zbus(property)]
    fn target(&self) -> &str {
        &self.0.target
    }
    #[zbus(property)]
    fn reachable(&self) -> bool {
        self.0.reachable
    }
    #[zbus(property)]
    fn state(&self) -> &str {
        &self.0.state
    }
    #[zbus(property)]
    fn address(&self) -> &str {
        &self.0.address
    }
    #[zbus(property)]
    fn reason(&self) -> &str {
        &self.0.reason
    }
    #[zbus(property)]
    fn since(&self) -> u64 {
        self.0.since
    }
    #[zbus(property)]
    fn target_state(&self) -> &str {
        &self.0.target_state
    }
    #[zbus(property)]
    fn last_job(&self) -> &str {
        &self.0.last_job
    }
    #[zbus(property)]
    fn jobs_sent(&self) -> u32 {
        self.0.jobs_sent
    }
}

/// The properties that differ between `old` and `new`, by their D-Bus names.
fn changed_properties<'a>(
    old: &HostStatus,
    new: &'a HostStatus,
) -> HashMap<&'static str, Value<'a>> {
    let mut changed = HashMap::new();
    let mut text = |name, old: &String, new: &'a String| {
        if old != new {
            changed.insert(name, Value::from(new.as_str()));
        }
    };
    text("Name", &old.name, &new.name);
    text("Hostname", &old.hostname, &new.hostname);
    text("Target", &old.target, &new.target);
    text("State", &old.state, &new.state);
    text("Address", &old.address, &new.address);
    text("Reason", &old.reason, &new.reason);
    text("TargetState", &old.target_state, &new.target_state);
    text("LastJob", &old.last_job, &new.last_job);
    if old.reachable != new.reachable {
        changed.insert("Reachable", Value::from(new.reachable));
    }
    if old.since != new.since {
        changed.insert("Since", Value::from(new.since));
    }
    if old.jobs_sent != new.jobs_sent {
        changed.insert("JobsSent", Value::from(new.jobs_sent));
    }
    changed
}

struct RootObject {
    hosts: Vec<OwnedObjectPath>,
    refresh: mpsc::Sender<()>,
}

#[interface(name = "org.reachd.Reachd1")]
impl RootObject {
    /// Re-evaluates every host now: what the NetworkManager dispatcher hook calls.
    async fn refresh(&self) -> fdo::Result<()> {
        // A full queue already holds a refresh that has not run yet: this one adds nothing.
        match self.refresh.try_send(()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(())) => {
                Err(fdo::Error::Failed("reachd is stopping".into()))
            }
        }
    }

    #[zbus(property)]
    fn hosts(&self) -> Vec<OwnedObjectPath> {
        self.hosts.clone()
    }

    #[zbus(property)]
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
}

/// The published objects, to be updated as decisions are made.
pub struct Publisher {
    connection: Connection,
}

/// Serves the objects for `hosts` on the bus `builder` connects to and then takes the name
/// (serving first, so that a client activated by the name finds the objects). `Refresh()` calls
/// arrive on the returned receiver.
pub async fn serve(
    builder: connection::Builder<'static>,
    hosts: Vec<HostStatus>,
) -> zbus::Result<(Publisher, mpsc::Receiver<()>)> {
    let (refresh, refreshes) = mpsc::channel(1);
    let root = RootObject {
        hosts: hosts.iter().map(|h| host_path(&h.name)).collect(),
        refresh,
    };
    let mut builder = builder.serve_at(ROOT_PATH, root)?;
    for host in hosts {
        builder = builder.serve_at(host_path(&host.name), HostObject(host))?;
    }
    let connection = builder.name(BUS_NAME)?.build().await?;
    Ok((Publisher { connection }, refreshes))
}

impl Publisher {
    /// The bus connection the objects are served on (also used for the user manager).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Replaces a host's published state, emitting one PropertiesChanged with what changed.
    pub async fn update(&self, new: &HostStatus) -> zbus::Result<()> {
        let path = host_path(&new.name);
        let iface = self
            .connection
            .object_server()
            .interface::<_, HostObject>(&path)
            .await?;
        // Store first, then signal: a client that reads on the signal sees the new values.
        let old = std::mem::replace(&mut iface.get_mut().await.0, new.clone());
        let changed = changed_properties(&old, new);
        if changed.is_empty() {
            return Ok(());
        }
        emit(iface.signal_emitter(), changed).await
    }
}

async fn emit(emitter: &SignalEmitter<'_>, changed: HashMap<&str, Value<'_>>) -> zbus::Result<()> {
    fdo::Properties::properties_changed(
        emitter,
        HOST_INTERFACE.try_into()?,
        changed,
        Cow::Borrowed(&[]),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> HostStatus {
        HostStatus {
            name: "my-pi".into(),
            hostname: "rpi.local".into(),
            target: "rpi-accessible.target".into(),
            reachable: false,
            state: "unknown".into(),
            address: String::new(),
            reason: "starting".into(),
            since: 1,
            target_state: "unknown".into(),
            last_job: String::new(),
            jobs_sent: 0,
        }
    }

    #[test]
    fn host_paths_map_dashes() {
        assert_eq!(
            host_path("my-pi").as_str(),
            "/org/reachd/Reachd1/host/my_pi"
        );
    }

    #[test]
    fn only_changed_properties_are_sent() {
        let old = status();
        let mut new = old.clone();
        assert!(changed_properties(&old, &new).is_empty());
        new.reachable = true;
        new.state = "reachable".into();
        new.jobs_sent = 1;
        let changed = changed_properties(&old, &new);
        let mut names: Vec<_> = changed.keys().copied().collect();
        names.sort();
        assert_eq!(names, ["JobsSent", "Reachable", "State"]);
        assert_eq!(changed["Reachable"], Value::from(true));
    }
}
