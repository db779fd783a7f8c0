//! NetworkManager followed: the state read at start (coldplug), a network lost and back,
//! NetworkManager or the system bus restarting or coming late, and a flood of forged signals.

use super::*;

#[test]
fn coldplug_with_network_down_is_unreachable_and_sends_no_job() {
    on_buses(async {
        let rig = Rig::offline().await;
        let host = rig
            .wait_host("unreachable with the target read", |h| {
                h.state == "unreachable" && h.target_state == "inactive"
            })
            .await;
        assert_eq!(host.reason, "network disconnected");
        assert!(!host.reachable);
        assert_eq!(host.address, "");
        assert_eq!(host.jobs_sent, 0);
        assert_eq!(host.last_job, "");
        assert!(
            rig.systemd.subscribed(),
            "the agent calls Subscribe() so that systemd sends signals"
        );
        // The decision that published this state would have sent the job: none may come.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rig.systemd.jobs(), []);
        assert_eq!(rig.host().await.jobs_sent, 0);
        rig.assert_agent_running();

        // The root object lists the host and the version.
        let root = rig.properties_at(ROOT_PATH).await;
        let interface = InterfaceName::from_static_str_unchecked("org.reachd.Reachd1");
        let hosts: Vec<OwnedObjectPath> = root
            .get(interface.clone(), "Hosts")
            .await
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(
            hosts.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            [HOST_PATH]
        );
        let version: String = root
            .get(interface, "Version")
            .await
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
    });
}

#[test]
fn network_loss_is_signalled_at_once_and_return_is_followed() {
    on_buses(async {
        let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        let mut rig = Rig::start(Setup::new(Some(network), UnitSpec::loaded("inactive"))).await;
        rig.wait_nm_reads(1).await;
        // Within mDNS's grace the host is still unknown: no check has failed yet.
        let before = rig.host().await;
        assert_eq!(before.state, "unknown", "{before:#?}");

        let properties = rig.host_properties().await;
        let mut changes = properties.receive_properties_changed().await.unwrap();
        rig.nm().set(&Network::disconnected()).await.unwrap();
        // One PropertiesChanged carries the new state, its reason and its time together.
        let changed = tokio::time::timeout(WAIT, async {
            loop {
                let signal = changes.next().await.expect("signals keep coming");
                let args = signal.args().expect("PropertiesChanged arguments");
                assert_eq!(args.interface_name.as_str(), HOST_INTERFACE);
                let changed: BTreeMap<String, OwnedValue> = args
                    .changed_properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
                    .collect();
                if changed.contains_key("State") {
                    return changed;
                }
            }
        })
        .await
        .expect("a PropertiesChanged with State after the network went down");
        assert_eq!(
            String::try_from(changed["State"].clone()).unwrap(),
            "unreachable"
        );
        assert_eq!(
            String::try_from(changed["Reason"].clone()).unwrap(),
            "network disconnected"
        );
        let since = u64::try_from(changed["Since"].clone()).expect("Since changes with State");
        assert!(
            since > before.since,
            "Since moves forward: {since} vs {}",
            before.since
        );

        // The network comes back: the agent looks for the host again, and (nobody answering
        // mDNS) gives up on it after the grace, with a new reason.
        rig.nm()
            .set(&Network::connected(NM_STATE_CONNECTED_SITE, HOME_UUID))
            .await
            .unwrap();
        let host = rig
            .wait_host("checked again on the new network", |h| {
                h.reason.contains("not found by mDNS")
            })
            .await;
        assert_eq!(host.state, "unreachable");
        assert_eq!(rig.systemd.jobs(), []);
        rig.assert_agent_running();
    });
}

#[test]
fn networkmanager_restart_is_survived_and_followed() {
    on_buses(async {
        let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        let mut rig = Rig::start(Setup::new(Some(network), UnitSpec::loaded("inactive"))).await;
        rig.wait_nm_reads(1).await;

        // NetworkManager leaves the bus: the agent keeps going with the last view.
        rig.nm().stop().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.assert_agent_running();
        rig.refresh().await;
        assert_eq!(
            rig.host().await.state,
            "unknown",
            "losing NetworkManager is not losing the network"
        );

        // It comes back, on a new connection, reporting no network: the agent follows.
        let system = rig.system.address().to_string();
        rig.nm()
            .restart(&system, &Network::disconnected())
            .await
            .unwrap();
        let host = rig
            .wait_host("unreachable after the restart", |h| {
                h.state == "unreachable"
            })
            .await;
        assert_eq!(host.reason, "network disconnected");
        rig.assert_agent_running();
    });
}

#[test]
fn a_restarted_system_bus_is_found_again_and_followed() {
    on_buses(async {
        let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        let mut rig = Rig::start(Setup::new(Some(network), UnitSpec::loaded("inactive"))).await;
        rig.wait_nm_reads(1).await;
        // The system bus goes (and NetworkManager with it), then comes back with a
        // NetworkManager that reports no network: the agent reconnects and follows.
        rig.system.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.assert_agent_running();
        let system = rig.system.address().to_string();
        rig.nm()
            .restart(&system, &Network::disconnected())
            .await
            .unwrap();
        let host = rig
            .wait_host("unreachable on the new bus", |h| h.state == "unreachable")
            .await;
        assert_eq!(host.reason, "network disconnected");
        rig.assert_agent_running();
    });
}

#[test]
fn networkmanager_appearing_after_the_agent_is_followed() {
    on_buses(async {
        let mut rig = Rig::start(Setup::new(None, UnitSpec::loaded("inactive"))).await;
        // Without NetworkManager the agent assumes a network and waits for mDNS.
        assert_eq!(rig.host().await.state, "unknown");
        let nm = FakeNm::start(rig.system.address(), &Network::disconnected())
            .await
            .unwrap();
        rig.nm = Some(nm);
        let host = rig
            .wait_host("unreachable once NetworkManager is seen", |h| {
                h.state == "unreachable"
            })
            .await;
        assert_eq!(host.reason, "network disconnected");
    });
}

#[test]
fn a_thousand_forged_networkmanager_signals_cost_a_bounded_number_of_reads() {
    on_buses(async {
        let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        let mut rig = Rig::start(Setup::new(Some(network), UnitSpec::loaded("inactive"))).await;
        rig.wait_nm_reads(1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rig.nm().reads();
        // Another process on the system bus pretends to be NetworkManager.
        let forger = zbus::connection::Builder::address(rig.system.address())
            .expect("a valid bus address")
            .build()
            .await
            .expect("the forger connects");
        let changed: HashMap<&str, zbus::zvariant::Value> =
            [("State", zbus::zvariant::Value::from(20u32))].into();
        for _ in 0..1000 {
            forger
                .emit_signal(
                    None::<()>,
                    "/org/freedesktop/NetworkManager",
                    "org.freedesktop.DBus.Properties",
                    "PropertiesChanged",
                    &(
                        "org.freedesktop.NetworkManager",
                        &changed,
                        Vec::<String>::new(),
                    ),
                )
                .await
                .expect("the signal is sent");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let reads = rig.nm().reads() - before;
        eprintln!("1000 forged signals: {reads} reads of NetworkManager");
        assert!(reads <= 20, "{reads} reads for 1000 forged signals");
        let host = rig.host().await;
        assert_ne!(
            host.reason, "network disconnected",
            "a forged State is not believed"
        );
        rig.assert_agent_running();
    });
}
