//! The checks that read the buses: NetworkManager on the system bus, the systemd user manager
//! and the agent on the session bus, and each host's target as the user manager sees it.

use std::collections::BTreeMap;

use systemd_zbus::{ManagerProxy, ServiceProxy, UnitProxy};
use zbus::fdo::DBusProxy;
use zbus::names::BusName;
use zbus::Connection;

use super::Finding;
use crate::config::HostConfig;
use crate::network::{self, NM_NAME};
use crate::notify;
use crate::reconcile::NetworkView;
use crate::status;

const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
/// The agent's unit.
const AGENT_UNIT: &str = "reachd.service";

/// The two buses, or why each could not be reached.
pub struct Buses {
    pub(super) system: Result<Connection, String>,
    pub(super) session: Result<Connection, String>,
}

impl Buses {
    pub async fn connect() -> Self {
        Buses {
            system: Connection::system().await.map_err(|e| e.to_string()),
            session: Connection::session().await.map_err(|e| e.to_string()),
        }
    }
}

/// Whether `name` has an owner on `bus`.
async fn has_owner(bus: &Connection, name: &'static str) -> zbus::Result<bool> {
    let dbus = DBusProxy::new(bus).await?;
    Ok(dbus.name_has_owner(BusName::try_from(name)?).await?)
}

/// What NetworkManager's `State` means (NMState).
pub fn state_meaning(state: u32) -> &'static str {
    match state {
        10 => "asleep",
        20 => "disconnected",
        30 => "disconnecting",
        40 => "connecting",
        50 => "connected, local only",
        60 => "connected, site only",
        70 => "connected, global",
        _ => "unknown",
    }
}

/// NetworkManager and its State; returns its view of the network when it could be read.
pub async fn network(buses: &Buses, emit: &mut impl FnMut(Finding)) -> Option<NetworkView> {
    let system = match &buses.system {
        Ok(system) => system,
        Err(err) => {
            emit(Finding::fail(
                format!("NetworkManager: cannot connect to the system bus ({err})"),
                "start the system's D-Bus (`sudo systemctl start dbus`); reachd follows NetworkManager there",
            ));
            return None;
        }
    };
    match has_owner(system, NM_NAME).await {
        Ok(true) => {}
        Ok(false) => {
            emit(Finding::fail(
                format!("NetworkManager is not on the system bus (no owner of {NM_NAME})"),
                "start it: `sudo systemctl enable --now NetworkManager`; without it reachd cannot tell when a network goes away",
            ));
            return None;
        }
        Err(err) => {
            emit(Finding::fail(
                format!("NetworkManager: cannot ask the system bus ({err})"),
                "check the system's D-Bus: `busctl --system status`",
            ));
            return None;
        }
    }
    match network::read_now(system).await {
        Ok((state, view)) => {
            let meaning = state_meaning(state);
            emit(if view.connected {
                Finding::ok(format!("NetworkManager: State {state} ({meaning})"))
            } else {
                Finding::warn(
                    format!(
                        "NetworkManager: State {state} ({meaning}): no host can be reachable now"
                    ),
                    "connect to a network (`nmcli connection up ID`)",
                )
            });
            Some(view)
        }
        Err(err) => {
            emit(Finding::fail(
                format!("NetworkManager cannot be read ({err})"),
                "see `journalctl -u NetworkManager`; `nmcli general` must answer",
            ));
            None
        }
    }
}

/// The systemd user manager on the session bus.
pub async fn user_manager(buses: &Buses, emit: &mut impl FnMut(Finding)) {
    emit(match user_manager_state(buses).await {
        Ok(finding) => finding,
        Err(err) => Finding::fail(
            format!("the systemd user manager cannot be read ({err})"),
            "run reachd in a login session with `systemd --user` (pam_systemd); `systemctl --user status` must answer",
        ),
    });
}

async fn user_manager_state(buses: &Buses) -> Result<Finding, String> {
    let session = match &buses.session {
        Ok(session) => session,
        Err(err) => {
            return Ok(Finding::fail(
                format!("cannot connect to the session bus ({err})"),
                "run reachd in your login session (DBUS_SESSION_BUS_ADDRESS must name the session bus; dbus-user-session provides it)",
            ))
        }
    };
    if !has_owner(session, SYSTEMD_NAME)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(Finding::fail(
            format!("no systemd user manager on the session bus (no owner of {SYSTEMD_NAME})"),
            "log in through a session that starts `systemd --user` (pam_systemd, `loginctl enable-linger $USER`)",
        ));
    }
    let manager = ManagerProxy::new(session)
        .await
        .map_err(|e| e.to_string())?;
    let version = manager.version().await.map_err(|e| e.to_string())?;
    let state = manager.system_state().await.map_err(|e| e.to_string())?;
    Ok(Finding::ok(format!(
        "the systemd user manager (systemd {version}) is on the session bus: {state}"
    )))
}

/// The PATH the agent runs with, and whose it is: reachd.service's own `Environment=PATH=`
/// (the NixOS module sets one), else the user manager's; `None` if the manager cannot be read.
pub async fn agent_path(buses: &Buses) -> Option<(String, &'static str)> {
    let session = buses.session.as_ref().ok()?;
    let read = async {
        let manager = ManagerProxy::new(session).await?;
        let service: ServiceProxy = unit_object(session, &manager, AGENT_UNIT).await?;
        if let Some(path) = path_in(&service.environment().await?) {
            return Ok::<_, zbus::Error>(Some((path, "reachd.service's PATH")));
        }
        Ok(path_in(&manager.environment().await?).map(|path| (path, "the user manager's PATH")))
    };
    read.await.ok().flatten()
}

/// The firewall units doctor knows, by the system manager's names: NixOS's, firewalld, ufw,
/// Debian's nftables.
const FIREWALLS: &[&str] = &[
    "firewall.service",
    "firewalld.service",
    "ufw.service",
    "nftables.service",
];

/// The first of [`FIREWALLS`] active in the system manager, if any (`None` also when the system
/// manager cannot be asked).
pub async fn active_firewall(buses: &Buses) -> Option<String> {
    let system = buses.system.as_ref().ok()?;
    let manager = ManagerProxy::new(system).await.ok()?;
    for name in FIREWALLS {
        // GetUnit: only a loaded unit, and nothing is loaded for asking.
        let Ok(path) = manager.get_unit(name).await else {
            continue;
        };
        let unit: UnitProxy = unit_at(system, path).await.ok()?;
        if unit
            .active_state()
            .await
            .is_ok_and(|s| <&str>::from(s) == "active")
        {
            return Some((*name).to_string());
        }
    }
    None
}

/// The groups of the running agent (reachd.service's main process: its gid, then its
/// supplementary groups); `None` when it does not run or cannot be read.
pub async fn agent_groups(buses: &Buses) -> Option<Vec<u32>> {
    let session = buses.session.as_ref().ok()?;
    let read = async {
        let manager = ManagerProxy::new(session).await?;
        let service: ServiceProxy = unit_object(session, &manager, AGENT_UNIT).await?;
        service.main_pid().await
    };
    let pid = read.await.ok().filter(|pid| *pid != 0)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(groups_in(&status))
}

/// The gids of a `/proc/PID/status`: the real gid, then the supplementary groups.
fn groups_in(status: &str) -> Vec<u32> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or("")
    };
    let gid = field("Gid:").split_whitespace().next();
    gid.into_iter()
        .chain(field("Groups:").split_whitespace())
        .filter_map(|g| g.parse().ok())
        .collect()
}

/// The last `PATH=` of an environment block (the one in force).
fn path_in(environment: &[String]) -> Option<String> {
    last_value(environment, "PATH").map(String::from)
}

/// The value of the last `NAME=` of an environment block (the one in force).
pub(super) fn last_value<'e>(environment: &'e [String], name: &str) -> Option<&'e str> {
    environment
        .iter()
        .rev()
        .find_map(|v| v.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
}

/// Whether the agent holds its name on the session bus. Not running is a warning: the set-up
/// the doctor checks is the same whether or not the agent runs right now.
pub async fn agent(buses: &Buses, emit: &mut impl FnMut(Finding)) {
    let Ok(session) = &buses.session else { return };
    let name = status::BUS_NAME;
    let running = async {
        let dbus = DBusProxy::new(session).await?;
        let bus_name = BusName::try_from(name)?;
        if !dbus.name_has_owner(bus_name.clone()).await? {
            return Ok::<_, zbus::Error>(None);
        }
        Ok(Some(dbus.get_connection_unix_process_id(bus_name).await?))
    };
    emit(match running.await {
        Ok(Some(pid)) => Finding::ok(format!("reachd is running on the session bus (pid {pid})")),
        Ok(None) => Finding::warn(
            format!("reachd is not running (no owner of {name}): nothing follows your hosts now"),
            "`systemctl --user enable --now reachd.service`",
        ),
        Err(err) => Finding::warn(
            format!("cannot tell whether reachd is running ({err})"),
            "`systemctl --user status reachd.service`",
        ),
    });
}

/// Who would show reachd's notifications (`[notify]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotificationServer {
    /// A server owns the name: its process (`dunst (pid 1234)`), when it can be told.
    Running(Option<String>),
    /// None runs, but the bus starts one when asked (a D-Bus service file).
    OnDemand,
    Missing,
}

/// Whether a notification server takes reachd's notifications on the session bus.
pub async fn notification_server(buses: &Buses, emit: &mut impl FnMut(Finding)) {
    let Ok(session) = &buses.session else { return };
    let found = async {
        let dbus = DBusProxy::new(session).await?;
        let name = BusName::try_from(notify::SERVER_NAME)?;
        if dbus.name_has_owner(name.clone()).await? {
            let pid = dbus.get_connection_unix_process_id(name).await.ok();
            return Ok(NotificationServer::Running(pid.map(process_name)));
        }
        let activatable = dbus.list_activatable_names().await?;
        Ok::<_, zbus::Error>(
            if activatable
                .iter()
                .any(|n| n.as_str() == notify::SERVER_NAME)
            {
                NotificationServer::OnDemand
            } else {
                NotificationServer::Missing
            },
        )
    };
    emit(notification_finding(found.await.map_err(|e| e.to_string())));
}

/// `dunst (pid 1234)`, or `pid 1234` when its name cannot be read.
fn process_name(pid: u32) -> String {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("{} (pid {pid})", comm.trim()),
        Err(_) => format!("pid {pid}"),
    }
}

/// What the doctor says about the notification server.
pub fn notification_finding(server: Result<NotificationServer, String>) -> Finding {
    let name = notify::SERVER_NAME;
    match server {
        Ok(NotificationServer::Running(Some(process))) => Finding::ok(format!(
            "notifications: {process} owns {name} on the session bus"
        )),
        Ok(NotificationServer::Running(None)) => Finding::ok(format!(
            "notifications: a notification server owns {name} on the session bus"
        )),
        Ok(NotificationServer::OnDemand) => Finding::ok(format!(
            "notifications: the session bus starts a notification server when one is sent ({name} is activatable)"
        )),
        Ok(NotificationServer::Missing) => Finding::warn(
            format!("no notification server (no owner of {name} on the session bus): reachd's notifications will not show"),
            "install one (e.g. dunst, mako) or remove [notify]",
        ),
        Err(err) => Finding::warn(
            format!("notifications: cannot tell whether a notification server runs ({err})"),
            format!("`busctl --user status {name}`"),
        ),
    }
}

/// The host's target: loaded, and which units it starts or stops with it; returned when it
/// could be read.
pub async fn target(
    buses: &Buses,
    host: &HostConfig,
    emit: &mut impl FnMut(Finding),
) -> Option<TargetView> {
    let session = buses.session.as_ref().ok()?;
    match read_target(session, &host.target).await {
        Ok(target) => {
            emit(target_finding(&host.name, &host.target, &target));
            Some(target)
        }
        Err(err) => {
            emit(Finding::fail(
                format!(
                    "{}: {} cannot be read from the user manager ({err})",
                    host.name, host.target
                ),
                format!("`systemctl --user status {}`", host.target),
            ));
            None
        }
    }
}

/// A target as the user manager reports it.
#[derive(Debug, Default)]
pub struct TargetView {
    pub load_state: String,
    pub load_error: String,
    pub need_daemon_reload: bool,
    /// Each unit related to the target, with the properties that name it.
    pub related: BTreeMap<String, Vec<&'static str>>,
}

/// The user manager's object of unit `name`, through proxy `P` (`UnitProxy`, `ServiceProxy`),
/// its properties read afresh each time.
pub(super) async fn unit_object<'c, P>(
    session: &'c Connection,
    manager: &ManagerProxy<'_>,
    name: &str,
) -> zbus::Result<P>
where
    P: zbus::proxy::Defaults + From<zbus::Proxy<'c>>,
{
    unit_at(session, manager.load_unit(name).await?).await
}

/// The unit object at `path` (from `LoadUnit` or `GetUnit`), through proxy `P`, its properties
/// read afresh each time.
pub(super) async fn unit_at<'c, P>(
    bus: &'c Connection,
    path: zbus::zvariant::OwnedObjectPath,
) -> zbus::Result<P>
where
    P: zbus::proxy::Defaults + From<zbus::Proxy<'c>>,
{
    zbus::proxy::Builder::new(bus)
        .path(path)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

async fn read_target(session: &Connection, target: &str) -> zbus::Result<TargetView> {
    let manager = ManagerProxy::new(session).await?;
    let unit: UnitProxy = unit_object(session, &manager, target).await?;
    let mut view = TargetView {
        load_state: unit.load_state().await?,
        load_error: unit.load_error().await?.1,
        need_daemon_reload: unit.need_daemon_reload().await?,
        ..TargetView::default()
    };
    for (property, units) in [
        ("Wants", unit.wants().await?),
        ("Requires", unit.requires().await?),
        ("BoundBy", unit.bound_by().await?),
        ("ConsistsOf", unit.consists_of().await?),
    ] {
        for name in units {
            view.related.entry(name).or_default().push(property);
        }
    }
    Ok(view)
}

/// What the doctor says about a host's target.
pub fn target_finding(host: &str, target: &str, view: &TargetView) -> Finding {
    let reload = "`systemctl --user daemon-reload`".to_string();
    match view.load_state.as_str() {
        "loaded" => {}
        "not-found" => {
            return Finding::fail(
                format!("{host}: {target} not found by the user manager"),
                format!("create ~/.config/systemd/user/{target} (reachd's systemd/rpi-accessible.target is an example), then {reload}"),
            )
        }
        "masked" => {
            return Finding::fail(
                format!("{host}: {target} is masked: it cannot be started"),
                format!("`systemctl --user unmask {target}`"),
            )
        }
        other => {
            return Finding::fail(
                format!("{host}: {target} did not load ({other}: {})", view.load_error),
                format!("correct the unit file (`systemctl --user status {target}` names the error), then {reload}"),
            )
        }
    }
    if view.need_daemon_reload {
        return Finding::fail(
            format!("{host}: {target} changed on disk since the user manager read it"),
            reload,
        );
    }
    if view.related.is_empty() {
        return Finding::warn(
            format!("{host}: {target} is loaded, but no unit is bound to it: starting it starts nothing"),
            format!("bind your units to it: `PartOf={target}` in [Unit] and `WantedBy={target}` in [Install], then `systemctl --user enable UNIT`"),
        );
    }
    let related: Vec<String> = view
        .related
        .iter()
        .map(|(unit, how)| format!("{unit} ({})", how.join(", ")))
        .collect();
    Finding::ok(format!(
        "{host}: {target} is loaded; units bound to it: {}",
        related.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    const TARGET: &str = "rpi-accessible.target";

    fn view(load_state: &str) -> TargetView {
        TargetView {
            load_state: load_state.into(),
            ..TargetView::default()
        }
    }

    #[test]
    fn a_missing_target_is_named_with_where_to_put_it() {
        let finding = target_finding("rpi", TARGET, &view("not-found"));
        assert_eq!(
            finding.to_string(),
            "FAIL rpi: rpi-accessible.target not found by the user manager; fix: create \
             ~/.config/systemd/user/rpi-accessible.target (reachd's systemd/rpi-accessible.target \
             is an example), then `systemctl --user daemon-reload`"
        );
    }

    #[test]
    fn a_masked_or_broken_target_is_named() {
        let masked = target_finding("rpi", TARGET, &view("masked"));
        assert_eq!(
            masked.fix.as_deref(),
            Some("`systemctl --user unmask rpi-accessible.target`")
        );
        let mut broken = view("bad-setting");
        broken.load_error = "Unit configuration has fatal error".into();
        let finding = target_finding("rpi", TARGET, &broken);
        assert_eq!(finding.level, Level::Fail);
        assert!(
            finding
                .what
                .contains("(bad-setting: Unit configuration has fatal error)"),
            "{finding}"
        );
    }

    #[test]
    fn a_target_changed_on_disk_asks_for_a_reload() {
        let mut changed = view("loaded");
        changed.need_daemon_reload = true;
        let finding = target_finding("rpi", TARGET, &changed);
        assert_eq!(finding.level, Level::Fail);
        assert_eq!(
            finding.fix.as_deref(),
            Some("`systemctl --user daemon-reload`")
        );
    }

    #[test]
    fn the_units_bound_to_a_target_are_listed_or_their_absence_warned() {
        let empty = target_finding("rpi", TARGET, &view("loaded"));
        assert_eq!(empty.level, Level::Warn);
        assert!(empty.what.contains("no unit is bound to it"), "{empty}");
        let mut bound = view("loaded");
        bound
            .related
            .insert("rpi-mount.service".into(), vec!["Wants", "ConsistsOf"]);
        bound
            .related
            .insert("rpi-nix-tunnel.service".into(), vec!["Wants", "BoundBy"]);
        assert_eq!(
            target_finding("rpi", TARGET, &bound).to_string(),
            "ok   rpi: rpi-accessible.target is loaded; units bound to it: rpi-mount.service \
             (Wants, ConsistsOf), rpi-nix-tunnel.service (Wants, BoundBy)"
        );
    }

    #[test]
    fn a_process_groups_are_its_gid_then_its_supplementary_groups() {
        let status = "Name:\treachd\nUid:\t1000\t1000\t1000\t1000\n\
                      Gid:\t1000\t1000\t1000\t1000\nGroups:\t24 27 998 \nNSpid:\t1\n";
        assert_eq!(groups_in(status), vec![1000, 24, 27, 998]);
        assert_eq!(groups_in("Gid:\t5\t5\t5\t5\nGroups:\t\n"), vec![5]);
    }

    #[test]
    fn the_notification_server_is_named_or_its_absence_warned() {
        let running = notification_finding(Ok(NotificationServer::Running(Some(
            "dunst (pid 1234)".into(),
        ))));
        assert_eq!(
            running.to_string(),
            "ok   notifications: dunst (pid 1234) owns org.freedesktop.Notifications on the session bus"
        );
        let on_demand = notification_finding(Ok(NotificationServer::OnDemand));
        assert_eq!(on_demand.level, Level::Ok);
        let missing = notification_finding(Ok(NotificationServer::Missing));
        assert_eq!(
            missing.level,
            Level::Warn,
            "not a misconfiguration of reachd"
        );
        assert_eq!(
            missing.to_string(),
            "warn no notification server (no owner of org.freedesktop.Notifications on the \
             session bus): reachd's notifications will not show; fix: install one (e.g. dunst, \
             mako) or remove [notify]"
        );
        let unknown = notification_finding(Err("the bus said no".into()));
        assert_eq!(unknown.level, Level::Warn);
        assert!(unknown.what.contains("the bus said no"), "{unknown}");
    }

    #[test]
    fn network_manager_states_are_named() {
        assert_eq!(state_meaning(50), "connected, local only");
        assert_eq!(state_meaning(20), "disconnected");
        assert_eq!(state_meaning(3), "unknown");
    }
}
