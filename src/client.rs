//! The CLI's side of the status interface: `reachd status`, `check` and `refresh` read the
//! running agent's objects on the session bus, and `reload` finds its process there. They never
//! start the agent (no D-Bus activation) and never probe: they report what the agent holds.

use futures_util::StreamExt;
use zbus::fdo::PropertiesProxy;
use zbus::names::{BusName, InterfaceName};
use zbus::zvariant::OwnedObjectPath;
use zbus::{Connection, MatchRule, MessageStream};

use crate::status::{self, HostStatus, Reachd1Proxy};

/// Why the CLI could not tell.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the session bus")]
    Bus(#[source] zbus::Error),
    #[error("reachd is not running on the session bus (no owner of {name}); start it with `systemctl --user start reachd` or `reachd run`", name = status::BUS_NAME)]
    NotRunning,
    #[error("no host named {name:?} in the running agent (hosts: {known})")]
    UnknownHost { name: String, known: String },
    #[error("cannot read the agent's state")]
    Read(#[source] zbus::Error),
}

/// A session bus connection to the running agent.
pub struct Client {
    connection: Connection,
}

impl Client {
    /// Connects and checks that the agent runs, without activating it.
    pub async fn connect() -> Result<Self, ClientError> {
        let connection = Connection::session().await.map_err(ClientError::Bus)?;
        let dbus = zbus::fdo::DBusProxy::new(&connection)
            .await
            .map_err(ClientError::Bus)?;
        let name = BusName::try_from(status::BUS_NAME).map_err(|e| ClientError::Bus(e.into()))?;
        if !dbus
            .name_has_owner(name)
            .await
            .map_err(|e| ClientError::Bus(e.into()))?
        {
            return Err(ClientError::NotRunning);
        }
        Ok(Client { connection })
    }

    async fn root(&self) -> Result<Reachd1Proxy<'_>, ClientError> {
        Reachd1Proxy::new(&self.connection)
            .await
            .map_err(ClientError::Read)
    }

    /// Every host's state, in configuration order.
    pub async fn hosts(&self) -> Result<Vec<HostStatus>, ClientError> {
        let paths = self
            .root()
            .await?
            .hosts()
            .await
            .map_err(ClientError::Read)?;
        let mut hosts = Vec::with_capacity(paths.len());
        for path in paths {
            hosts.push(self.host(path).await.map_err(ClientError::Read)?);
        }
        Ok(hosts)
    }

    /// One host's state, by name.
    pub async fn host_named(&self, name: &str) -> Result<HostStatus, ClientError> {
        let hosts = self.hosts().await?;
        let known = hosts
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        hosts
            .iter()
            .find(|h| h.name == name)
            .cloned()
            .ok_or_else(|| ClientError::UnknownHost {
                name: name.into(),
                known,
            })
    }

    /// Calls `each` with every host's state now, then with a host's new state whenever the agent
    /// signals a change (PropertiesChanged: no polling). Returns when the agent leaves the bus
    /// (`Ok`), or with the error that ended the watch.
    pub async fn watch(&self, mut each: impl FnMut(&HostStatus)) -> Result<(), ClientError> {
        // Subscribe first, then read: no change falls between the two.
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(status::BUS_NAME)
            .and_then(|r| r.interface("org.freedesktop.DBus.Properties"))
            .and_then(|r| r.member("PropertiesChanged"))
            .and_then(|r| r.path_namespace(status::ROOT_PATH))
            .map_err(ClientError::Read)?
            .build();
        let mut changes = MessageStream::for_match_rule(rule, &self.connection, Some(64))
            .await
            .map_err(ClientError::Read)?;
        let dbus = zbus::fdo::DBusProxy::new(&self.connection)
            .await
            .map_err(ClientError::Read)?;
        let mut owner = dbus
            .receive_name_owner_changed_with_args(&[(0, status::BUS_NAME)])
            .await
            .map_err(ClientError::Read)?;
        for host in self.hosts().await? {
            each(&host);
        }
        loop {
            tokio::select! {
                change = changes.next() => {
                    let Some(Ok(message)) = change else { return Ok(()) };
                    let Some(path) = message.header().path().map(|p| p.to_owned()) else { continue };
                    if !path.as_str().starts_with(&format!("{}/host/", status::ROOT_PATH)) {
                        continue;
                    }
                    match self.host(path.into()).await {
                        Ok(host) => each(&host),
                        Err(_) => return Ok(()), // The agent went away between the two.
                    }
                }
                gone = owner.next() => {
                    let ended = gone.and_then(|signal| signal.args().ok().map(|a| a.new_owner.is_none()));
                    if ended != Some(false) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Asks the agent to re-evaluate every host now.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        self.root()
            .await?
            .refresh()
            .await
            .map_err(|err| ClientError::Read(err.into()))
    }

    /// The process that holds the agent's name on the bus: the one `reachd reload` signals.
    pub async fn agent_pid(&self) -> Result<u32, ClientError> {
        let dbus = zbus::fdo::DBusProxy::new(&self.connection)
            .await
            .map_err(ClientError::Read)?;
        let name = BusName::try_from(status::BUS_NAME).map_err(|e| ClientError::Read(e.into()))?;
        dbus.get_connection_unix_process_id(name)
            .await
            .map_err(|e| ClientError::Read(e.into()))
    }

    /// One host's state: all its properties in one `GetAll`.
    async fn host(&self, path: OwnedObjectPath) -> zbus::Result<HostStatus> {
        let properties = PropertiesProxy::builder(&self.connection)
            .destination(status::BUS_NAME)?
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let all = properties
            .get_all(InterfaceName::from_static_str_unchecked(
                status::HOST_INTERFACE,
            ))
            .await?;
        Ok(HostStatus::from_properties(all)?)
    }
}
