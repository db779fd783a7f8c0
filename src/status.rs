//! What reachd holds, published on the session bus as `org.reachd.Reachd1` (the contract is
//! dbus-interfaces/org.reachd.Reachd1.xml): a root object with `Refresh()` and the list of
//! hosts, and one object per host whose properties emit PropertiesChanged, all changed
//! properties of one decision in one signal.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::Header;
use zbus::names::{BusName, WellKnownName};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{self, OwnedObjectPath, OwnedValue, Value};
use zbus::{connection, fdo, interface, Connection};

use crate::event::{Event, Events};

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

/// Declares the host record once: the [`HostStatus`] struct (what `reachd status --json`
/// prints), the `org.reachd.Reachd1.Host` properties serving it, the PropertiesChanged
/// contents of an update, and the client's reading of it from one `GetAll`. A property is one
/// line here (and one in the contract XML, which a test compares with the live objects).
macro_rules! host_record {
    ($( $(#[doc = $doc:literal])* $field:ident: $ty:ty = $dbus:literal, )*) => {
        /// One host's published state.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct HostStatus {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        struct HostObject(HostStatus);

        #[interface(name = "org.reachd.Reachd1.Host")]
        impl HostObject {
            $(
                #[zbus(property, name = $dbus)]
                fn $field(&self) -> $ty {
                    self.0.$field.clone()
                }
            )*
        }

        impl HostStatus {
            /// The properties that differ between `self` and `new`, by their D-Bus names.
            fn changed_to(&self, new: &HostStatus) -> HashMap<&'static str, Value<'static>> {
                let mut changed = HashMap::new();
                $(
                    if self.$field != new.$field {
                        changed.insert($dbus, Value::from(new.$field.clone()));
                    }
                )*
                changed
            }

            /// A host's state from its properties, as `GetAll` returns them.
            pub fn from_properties(
                mut all: HashMap<String, OwnedValue>,
            ) -> Result<HostStatus, zvariant::Error> {
                Ok(HostStatus {
                    $( $field: take(&mut all, $dbus)?, )*
                })
            }
        }
    };
}

host_record! {
    name: String = "Name",
    hostname: String = "Hostname",
    target: String = "Target",
    reachable: bool = "Reachable",
    /// "unknown", "reachable" or "unreachable".
    state: String = "State",
    /// The address that answered last (empty until one did).
    address: String = "Address",
    /// Why the state is what it is, in words.
    reason: String = "Reason",
    /// When `state` last changed, in microseconds since the Unix epoch.
    since: u64 = "Since",
    /// The target's ActiveState as systemd reports it, or "not-found" / "unknown".
    target_state: String = "TargetState",
    /// The last job reachd sent for the target and its result, e.g. "start: done".
    last_job: String = "LastJob",
    /// How many jobs reachd has sent for the target since it started.
    jobs_sent: u32 = "JobsSent",
    /// Whether Nix is pointed at the host's cache now (see `nix_reason`).
    nix_in_use: bool = "NixInUse",
    /// Why Nix is or is not pointed at it; empty for a host without `[host.nix]`.
    nix_reason: String = "NixReason",
    /// Builds queued for upload to the host, at the last count.
    uploads_pending: u32 = "UploadsPending",
    /// The last upload that copied something, in words.
    last_upload: String = "LastUpload",
    /// The last upload's error; empty after one without.
    upload_error: String = "UploadError",
    /// Whether the host is a remote builder Nix may build on now (see `builder_reason`).
    builder_in_use: bool = "BuilderInUse",
    /// Why it is or is not; empty for a host without `[host.builder]`.
    builder_reason: String = "BuilderReason",
}

/// The time now as a host's `Since` counts it: microseconds since the Unix epoch.
pub fn wall_clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Takes the property `name` out of `all`, as a `T`.
fn take<T>(all: &mut HashMap<String, OwnedValue>, name: &str) -> Result<T, zvariant::Error>
where
    T: TryFrom<OwnedValue, Error = zvariant::Error>,
{
    all.remove(name)
        .ok_or_else(|| zvariant::Error::Message(format!("the host has no property {name}")))?
        .try_into()
}

struct RootObject {
    hosts: Vec<OwnedObjectPath>,
    events: Events,
}

#[interface(
    name = "org.reachd.Reachd1",
    proxy(
        async_name = "Reachd1Proxy",
        gen_blocking = false,
        default_service = "org.reachd.Reachd1",
        default_path = "/org/reachd/Reachd1"
    )
)]
impl RootObject {
    /// Checks every host now and has mDNS ask again: what the NetworkManager dispatcher hook calls.
    async fn refresh(&self, #[zbus(header)] header: Header<'_>) -> fdo::Result<()> {
        // zbus would ignore arguments given to a method that takes none: refuse them instead.
        if !header.signature().to_string().is_empty() {
            return Err(fdo::Error::InvalidArgs("Refresh takes no arguments".into()));
        }
        self.events
            .send(Event::Refresh)
            .await
            .map_err(|_| fdo::Error::Failed("reachd is stopping".into()))
    }

    #[zbus(property)]
    fn hosts(&self) -> Vec<OwnedObjectPath> {
        self.hosts.clone()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
}

/// The published objects, to be updated as decisions are made.
pub struct Publisher {
    connection: Connection,
}

/// Why the objects could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Exactly one agent may drive the targets of a session: the name is not taken over.
    #[error("reachd is already running on this session bus (pid {pid}, {owner}): one agent drives the targets; stop it first (`systemctl --user stop reachd`)")]
    AlreadyRunning { owner: String, pid: String },
    #[error(transparent)]
    Bus(#[from] zbus::Error),
}

/// Serves the objects for `hosts` on the bus `builder` connects to and then takes the name
/// (serving first, so that a client activated by the name finds the objects). The name is
/// neither taken from a running agent nor given up to a later one: a second agent refuses to
/// start, naming the first. `Refresh()` calls arrive on `events` as [`Event::Refresh`].
pub async fn serve(
    builder: connection::Builder<'static>,
    hosts: Vec<HostStatus>,
    events: Events,
) -> Result<Publisher, ServeError> {
    let root = RootObject {
        hosts: hosts.iter().map(|h| host_path(&h.name)).collect(),
        events,
    };
    let mut builder = builder.serve_at(ROOT_PATH, root)?;
    for host in hosts {
        builder = builder.serve_at(host_path(&host.name), HostObject(host))?;
    }
    let connection = builder.build().await?;
    let taken = connection
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await;
    match taken {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {
            Ok(Publisher { connection })
        }
        Ok(RequestNameReply::Exists | RequestNameReply::InQueue) | Err(zbus::Error::NameTaken) => {
            Err(running_agent(&connection).await)
        }
        Err(err) => Err(err.into()),
    }
}

/// The agent that owns the name, as an error.
async fn running_agent(connection: &Connection) -> ServeError {
    let dbus = match fdo::DBusProxy::new(connection).await {
        Ok(dbus) => dbus,
        Err(err) => return err.into(),
    };
    let name = BusName::WellKnown(WellKnownName::from_static_str_unchecked(BUS_NAME));
    let owner = match dbus.get_name_owner(name).await {
        Ok(owner) => owner,
        Err(err) => return zbus::Error::from(err).into(),
    };
    let pid = dbus
        .get_connection_unix_process_id(owner.clone().into())
        .await
        .map_or_else(|_| "unknown".to_string(), |pid| pid.to_string());
    ServeError::AlreadyRunning {
        owner: owner.to_string(),
        pid,
    }
}

impl Publisher {
    /// The bus connection the objects are served on (also used for the user manager).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Stops publishing, giving the connection back (to release the name and close it).
    pub fn into_connection(self) -> Connection {
        self.connection
    }

    /// Publishes the object of a host a reload added.
    pub async fn add_host(&self, host: HostStatus) -> zbus::Result<()> {
        let path = host_path(&host.name);
        self.connection
            .object_server()
            .at(path, HostObject(host))
            .await
            .map(|_| ())
    }

    /// Removes the object of a host a reload removed.
    pub async fn remove_host(&self, name: &str) -> zbus::Result<()> {
        self.connection
            .object_server()
            .remove::<HostObject, _>(host_path(name))
            .await
            .map(|_| ())
    }

    /// Sets the root object's `Hosts` to the objects of `names`, signalling the change.
    pub async fn set_hosts(&self, names: &[&str]) -> zbus::Result<()> {
        let root = self
            .connection
            .object_server()
            .interface::<_, RootObject>(ROOT_PATH)
            .await?;
        let paths: Vec<_> = names.iter().map(|name| host_path(name)).collect();
        let mut object = root.get_mut().await;
        if object.hosts == paths {
            return Ok(());
        }
        object.hosts = paths;
        object.hosts_changed(root.signal_emitter()).await
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
        let changed = old.changed_to(new);
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
impl HostStatus {
    /// Host `name` (`NAME.local`, `NAME-accessible.target`) as the agent first publishes it:
    /// nothing known, nothing sent. For tests, which set what they need on top.
    pub(crate) fn starting(name: &str) -> HostStatus {
        HostStatus {
            name: name.into(),
            hostname: format!("{name}.local"),
            target: format!("{name}-accessible.target"),
            reachable: false,
            state: "unknown".into(),
            address: String::new(),
            reason: "starting".into(),
            since: 1,
            target_state: "unknown".into(),
            last_job: String::new(),
            jobs_sent: 0,
            nix_in_use: false,
            nix_reason: String::new(),
            uploads_pending: 0,
            last_upload: String::new(),
            upload_error: String::new(),
            builder_in_use: false,
            builder_reason: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> HostStatus {
        HostStatus::starting("my-pi")
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
        assert!(old.changed_to(&new).is_empty());
        new.reachable = true;
        new.state = "reachable".into();
        new.jobs_sent = 1;
        let changed = old.changed_to(&new);
        let mut names: Vec<_> = changed.keys().copied().collect();
        names.sort();
        assert_eq!(names, ["JobsSent", "Reachable", "State"]);
        assert_eq!(changed["Reachable"], Value::from(true));
    }

    #[test]
    fn every_property_is_read_back_from_get_all() {
        let old = status();
        let new = HostStatus {
            name: "other".into(),
            hostname: "other.local".into(),
            target: "other.target".into(),
            reachable: true,
            state: "reachable".into(),
            address: "192.0.2.10".into(),
            reason: "answered".into(),
            since: 2,
            target_state: "active".into(),
            last_job: "start: done".into(),
            jobs_sent: 1,
            nix_in_use: true,
            nix_reason: "in use".into(),
            uploads_pending: 12,
            last_upload: "3 paths copied".into(),
            upload_error: "cannot connect".into(),
            builder_in_use: true,
            builder_reason: "in use".into(),
        };
        let all = old
            .changed_to(&new)
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.try_into().unwrap()))
            .collect();
        assert_eq!(HostStatus::from_properties(all).unwrap(), new);
    }
}
