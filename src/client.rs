//! The CLI's side of the status interface: `reachd status`, `check` and `refresh` read the
//! running agent's objects on the session bus. They never start the agent (no D-Bus
//! activation) and never probe: they report what the agent holds.

use zbus::names::BusName;
use zbus::zvariant::OwnedObjectPath;
use zbus::{proxy, Connection};

use crate::status::{self, HostStatus};

#[proxy(
    interface = "org.reachd.Reachd1",
    default_service = "org.reachd.Reachd1",
    default_path = "/org/reachd/Reachd1"
)]
trait Reachd1 {
    fn refresh(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn hosts(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
}

#[proxy(
    interface = "org.reachd.Reachd1.Host",
    default_service = "org.reachd.Reachd1"
)]
trait Host {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn hostname(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn reachable(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn since(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn target_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_job(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn jobs_sent(&self) -> zbus::Result<u32>;
}

/// Why the CLI could not tell.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the session bus: {0}")]
    Bus(#[source] zbus::Error),
    #[error("reachd is not running on the session bus (no owner of {name}); start it with `systemctl --user start reachd` or `reachd run`", name = status::BUS_NAME)]
    NotRunning,
    #[error("no host named {name:?} in the running agent (hosts: {known})")]
    UnknownHost { name: String, known: String },
    #[error("cannot read the agent's state: {0}")]
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

    /// Asks the agent to re-evaluate every host now.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        self.root()
            .await?
            .refresh()
            .await
            .map_err(ClientError::Read)
    }

    async fn host(&self, path: OwnedObjectPath) -> zbus::Result<HostStatus> {
        let p = HostProxy::builder(&self.connection)
            .path(path)?
            .build()
            .await?;
        Ok(HostStatus {
            name: p.name().await?,
            hostname: p.hostname().await?,
            target: p.target().await?,
            reachable: p.reachable().await?,
            state: p.state().await?,
            address: p.address().await?,
            reason: p.reason().await?,
            since: p.since().await?,
            target_state: p.target_state().await?,
            last_job: p.last_job().await?,
            jobs_sent: p.jobs_sent().await?,
        })
    }
}
