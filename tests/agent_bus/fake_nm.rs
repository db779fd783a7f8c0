//! A small NetworkManager on the private "system" bus: the manager object with `State`,
//! `PrimaryConnection` and `ActiveConnections`, and one `Connection.Active` object per active
//! connection, all emitting PropertiesChanged the way NetworkManager does. The test changes the
//! network with [`FakeNm::set`] and restarts NetworkManager with [`FakeNm::stop`] and
//! [`FakeNm::start`] (a new connection, so the name changes owner).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use zbus::zvariant::OwnedObjectPath;
use zbus::{connection, interface, Connection};

pub const NM_NAME: &str = "org.freedesktop.NetworkManager";
pub const NM_PATH: &str = "/org/freedesktop/NetworkManager";

/// NetworkManager's `State` values used here.
pub const NM_STATE_DISCONNECTED: u32 = 20;
pub const NM_STATE_CONNECTED_SITE: u32 = 60;
pub const NM_STATE_CONNECTED_GLOBAL: u32 = 70;
/// NM_ACTIVE_CONNECTION_STATE_ACTIVATED.
const ACTIVATED: u32 = 2;

/// What the fake NetworkManager reports: its `State` and the active connections (UUID, id),
/// the first one being the primary connection.
#[derive(Debug, Clone)]
pub struct Network {
    pub state: u32,
    pub connections: Vec<(String, String)>,
}

impl Network {
    pub fn disconnected() -> Self {
        Network {
            state: NM_STATE_DISCONNECTED,
            connections: Vec::new(),
        }
    }

    /// Connected (`state`) on one Wi-Fi connection.
    pub fn connected(state: u32, uuid: &str) -> Self {
        Network {
            state,
            connections: vec![(uuid.to_string(), "Home Wi-Fi".to_string())],
        }
    }
}

struct Manager {
    state: u32,
    primary: OwnedObjectPath,
    active: Vec<OwnedObjectPath>,
    reads: Arc<AtomicU32>,
}

#[interface(name = "org.freedesktop.NetworkManager")]
impl Manager {
    #[zbus(property)]
    fn state(&self) -> u32 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.state
    }
    #[zbus(property)]
    fn primary_connection(&self) -> OwnedObjectPath {
        self.primary.clone()
    }
    #[zbus(property)]
    fn active_connections(&self) -> Vec<OwnedObjectPath> {
        self.active.clone()
    }
}

struct Active {
    uuid: String,
    id: String,
    state: u32,
}

#[interface(name = "org.freedesktop.NetworkManager.Connection.Active")]
impl Active {
    #[zbus(property)]
    fn uuid(&self) -> &str {
        &self.uuid
    }
    #[zbus(property)]
    fn id(&self) -> &str {
        &self.id
    }
    #[zbus(property)]
    fn state(&self) -> u32 {
        self.state
    }
}

/// The fake NetworkManager, serving while `connection` is open.
pub struct FakeNm {
    connection: Option<Connection>,
    active: Vec<OwnedObjectPath>,
    /// How many times the manager's `State` was read, over all incarnations.
    reads: Arc<AtomicU32>,
}

/// Active connection paths are never reused, as in NetworkManager.
static NEXT_ACTIVE: AtomicU32 = AtomicU32::new(1);

fn active_path() -> OwnedObjectPath {
    let n = NEXT_ACTIVE.fetch_add(1, Ordering::SeqCst);
    OwnedObjectPath::try_from(format!("{NM_PATH}/ActiveConnection/{n}")).expect("valid path")
}

fn root() -> OwnedObjectPath {
    OwnedObjectPath::try_from("/").expect("valid path")
}

impl FakeNm {
    /// Serves NetworkManager reporting `network` on the bus at `address`, objects first, then
    /// the name (as NetworkManager does).
    pub async fn start(address: &str, network: &Network) -> zbus::Result<FakeNm> {
        let mut fake = FakeNm {
            connection: None,
            active: Vec::new(),
            reads: Arc::new(AtomicU32::new(0)),
        };
        fake.serve(address, network).await?;
        Ok(fake)
    }

    /// Serves again after [`FakeNm::stop`]: a new connection, a new unique name.
    pub async fn restart(&mut self, address: &str, network: &Network) -> zbus::Result<()> {
        self.stop().await;
        self.serve(address, network).await
    }

    async fn serve(&mut self, address: &str, network: &Network) -> zbus::Result<()> {
        let mut builder = connection::Builder::address(address)?;
        let mut paths = Vec::new();
        for (uuid, id) in &network.connections {
            let path = active_path();
            builder = builder.serve_at(
                path.clone(),
                Active {
                    uuid: uuid.clone(),
                    id: id.clone(),
                    state: ACTIVATED,
                },
            )?;
            paths.push(path);
        }
        let manager = Manager {
            state: network.state,
            primary: paths.first().cloned().unwrap_or_else(root),
            active: paths.clone(),
            reads: self.reads.clone(),
        };
        let connection = builder
            .serve_at(NM_PATH, manager)?
            .name(NM_NAME)?
            .build()
            .await?;
        self.connection = Some(connection);
        self.active = paths;
        Ok(())
    }

    /// Leaves the bus, as a stopped or crashed NetworkManager does.
    pub async fn stop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.release_name(NM_NAME).await;
            let _ = connection.close().await;
        }
    }

    /// How many times `State` was read so far (the agent reads it on each look).
    pub fn reads(&self) -> u32 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Changes the network: new active connection objects, then the manager's properties, each
    /// change announced with PropertiesChanged.
    pub async fn set(&mut self, network: &Network) -> zbus::Result<()> {
        let connection = self
            .connection
            .as_ref()
            .expect("the fake NetworkManager is running");
        let server = connection.object_server();
        let mut paths = Vec::new();
        for (uuid, id) in &network.connections {
            let path = active_path();
            server
                .at(
                    path.clone(),
                    Active {
                        uuid: uuid.clone(),
                        id: id.clone(),
                        state: ACTIVATED,
                    },
                )
                .await?;
            paths.push(path);
        }
        let iface = server.interface::<_, Manager>(NM_PATH).await?;
        {
            let mut manager = iface.get_mut().await;
            manager.state = network.state;
            manager.primary = paths.first().cloned().unwrap_or_else(root);
            manager.active = paths.clone();
        }
        let emitter = iface.signal_emitter();
        let manager = iface.get().await;
        manager.active_connections_changed(emitter).await?;
        manager.primary_connection_changed(emitter).await?;
        // NetworkManager's State read above counts as one read; do not count the emitter's.
        manager.state_changed(emitter).await?;
        self.reads.fetch_sub(1, Ordering::SeqCst);
        drop(manager);
        for old in std::mem::replace(&mut self.active, paths) {
            server.remove::<Active, _>(old).await?;
        }
        Ok(())
    }
}
