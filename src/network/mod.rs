//! NetworkManager, seen from the system bus: the agent gets a fresh [`NetworkView`] whenever
//! NetworkManager's state, active connections or their addresses change.
//!
//! Level-triggered: every signal only says "read again", and a burst of signals costs one read.
//! Signals are subscribed to before the first read (coldplug), so no change falls between the
//! two. If NetworkManager leaves the bus, the last view stays (its links do not go down because
//! it restarted) and it is read again as soon as it comes back.

mod proxies;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use futures_util::StreamExt;
use tracing::{debug, info, warn};
use zbus::fdo::DBusProxy;
use zbus::message::Type as MessageType;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, MatchRule, MessageStream};

use self::proxies::{ActiveProxy, IP4ConfigProxy, IP6ConfigProxy, NetworkManagerProxy};
use crate::event::{Event, Events};
use crate::reconcile::NetworkView;

/// NetworkManager's name on the system bus.
pub const NM_NAME: &str = "org.freedesktop.NetworkManager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
/// NM_STATE_CONNECTED_LOCAL; 60 is SITE and 70 GLOBAL. A LAN without internet stays at 50/60.
const NM_STATE_CONNECTED_LOCAL: u32 = 50;
const NM_STATE_CONNECTED_GLOBAL: u32 = 70;
/// NM_ACTIVE_CONNECTION_STATE_ACTIVATED.
const NM_ACTIVE_CONNECTION_ACTIVATED: u32 = 2;

/// The view used when NetworkManager has never been seen: assume a network, let the checks
/// decide. Hosts restricted to connections are then never reachable, as none can be confirmed.
pub fn assumed_view() -> NetworkView {
    NetworkView {
        connected: true,
        active: BTreeMap::new(),
    }
}

/// Follows NetworkManager on `system` until the bus connection fails (an error) or the agent is
/// gone (Ok), sending each new view as [`Event::Network`]: the first one read on this
/// connection, then only changes. `with_addresses`: also read the machine's addresses on each
/// connection (only hosts with `connections` need them; they cost two more calls per active
/// connection and read).
pub async fn follow(system: Connection, events: Events, with_addresses: bool) -> zbus::Result<()> {
    // Subscribe first: NetworkManager's property changes, and its owner coming and going.
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace(NM_PATH)?
        .build();
    let properties = MessageStream::for_match_rule(rule, &system, Some(256)).await?;
    let dbus = DBusProxy::new(&system).await?;
    let owners = dbus
        .receive_name_owner_changed_with_args(&[(0, NM_NAME)])
        .await?;
    let mut triggers = std::pin::pin!(futures_util::stream::select(
        properties.filter_map(|msg| async move {
            let msg = msg.ok()?;
            let path = msg.header().path()?.to_string();
            // Device statistics and the like are noise; the manager, active connections and their
            // addresses count.
            let counts = path == NM_PATH
                || ["ActiveConnection", "IP4Config", "IP6Config"]
                    .iter()
                    .any(|kind| path.starts_with(&format!("{NM_PATH}/{kind}/")));
            counts.then_some(())
        }),
        owners.map(|_| ()),
    ));

    let manager = NetworkManagerProxy::builder(&system)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let mut present = None;
    let mut last = None;
    loop {
        match read(&system, &manager, with_addresses).await {
            Ok(view) => {
                if present != Some(true) {
                    info!("NetworkManager is on the system bus");
                }
                present = Some(true);
                if last.as_ref() != Some(&view) {
                    last = Some(view.clone());
                    if events.send(Event::Network(view)).await.is_err() {
                        return Ok(()); // The agent is gone.
                    }
                }
            }
            Err(err) => {
                if present != Some(false) {
                    warn!("NetworkManager cannot be read ({err}); keeping the last network state until it returns");
                }
                present = Some(false);
            }
        }
        // Wait for a change, then take every signal already queued: one read for the burst.
        if triggers.next().await.is_none() {
            return Err(zbus::Error::Failure(
                "system bus signal stream ended".into(),
            ));
        }
        while let Some(Some(())) = futures_util::FutureExt::now_or_never(triggers.next()) {}
    }
}

/// NetworkManager's `State` and the view reachd builds from it, with the machine's addresses on
/// each connection, read once (for `reachd doctor`).
pub async fn read_now(system: &Connection) -> zbus::Result<(u32, NetworkView)> {
    let manager = NetworkManagerProxy::builder(system)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let state = manager.state().await?;
    Ok((state, read(system, &manager, true).await?))
}

async fn read(
    system: &Connection,
    manager: &NetworkManagerProxy<'_>,
    with_addresses: bool,
) -> zbus::Result<NetworkView> {
    let state = manager.state().await?;
    let mut active = BTreeMap::new();
    for path in manager.active_connections().await? {
        // An active connection may vanish between the list and the read: skip it.
        match read_active(system, &path, with_addresses).await {
            Ok((uuid, activated, addresses)) => {
                if activated {
                    active.insert(uuid, addresses);
                }
            }
            Err(err) => debug!(%path, "active connection not read: {err}"),
        }
    }
    debug!(state, ?active, "NetworkManager read");
    Ok(NetworkView {
        connected: (NM_STATE_CONNECTED_LOCAL..=NM_STATE_CONNECTED_GLOBAL).contains(&state),
        active,
    })
}

/// An active connection's UUID, whether it is activated, and the machine's addresses on it.
async fn read_active(
    system: &Connection,
    path: &OwnedObjectPath,
    with_addresses: bool,
) -> zbus::Result<(String, bool, BTreeSet<IpAddr>)> {
    let active = ActiveProxy::builder(system)
        .destination(NM_NAME)?
        .path(path)?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let uuid = active.uuid().await?.to_ascii_lowercase();
    let activated = active.state().await? == NM_ACTIVE_CONNECTION_ACTIVATED;
    let addresses = if activated && with_addresses {
        // Without them the connection still counts; only the checks are not narrowed to it.
        local_addresses(system, &active)
            .await
            .unwrap_or_else(|err| {
                debug!(%path, "addresses of the active connection not read: {err}");
                BTreeSet::new()
            })
    } else {
        BTreeSet::new()
    };
    Ok((uuid, activated, addresses))
}

/// The machine's addresses on an active connection, from its IP4Config and IP6Config.
async fn local_addresses(
    system: &Connection,
    active: &ActiveProxy<'_>,
) -> zbus::Result<BTreeSet<IpAddr>> {
    let mut addresses = BTreeSet::new();
    // "/" when the connection has no configuration of that family.
    let ip4 = active.ip4_config().await?;
    if ip4.as_str() != "/" {
        let config = config_proxy::<IP4ConfigProxy>(system, &ip4).await?;
        addresses.extend(parse_addresses(config.address_data().await?));
    }
    let ip6 = active.ip6_config().await?;
    if ip6.as_str() != "/" {
        let config = config_proxy::<IP6ConfigProxy>(system, &ip6).await?;
        addresses.extend(parse_addresses(config.address_data().await?));
    }
    Ok(addresses)
}

async fn config_proxy<'a, P>(system: &Connection, path: &'a OwnedObjectPath) -> zbus::Result<P>
where
    P: From<zbus::Proxy<'a>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(system)
        .destination(NM_NAME)?
        .path(path.as_ref())?
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// The `address` entries of an IP4Config/IP6Config `AddressData`.
fn parse_addresses(data: Vec<HashMap<String, OwnedValue>>) -> impl Iterator<Item = IpAddr> {
    data.into_iter().filter_map(|entry| {
        let address: String = entry.get("address")?.try_clone().ok()?.try_into().ok()?;
        address.parse().ok()
    })
}
