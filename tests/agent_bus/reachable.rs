//! A reachable host (through the fake probe): its address set in the user manager, its target
//! started, restarted when it moves and stopped when it stops answering, and adopted after a
//! restart of the agent; a refresh asking mDNS again.

use super::*;

#[test]
fn reachable_host_gets_its_address_set_then_its_target_started_then_stopped() {
    on_buses(async {
        let setup = reachable(
            UnitSpec::loaded("inactive"),
            JobTiming::After(Duration::from_millis(20)),
        );
        let mut rig = Rig::start(setup).await;
        let host = rig
            .wait_host("reachable with its target started", |h| {
                h.reachable && h.target_state == "active" && h.last_job == "start: done"
            })
            .await;
        assert_eq!(host.state, "reachable");
        assert_eq!(host.address, "192.0.2.10");
        assert_eq!(host.reason, "answered at 192.0.2.10");
        assert_eq!(host.jobs_sent, 1);
        // The address is in the manager's environment before the target (and its tunnel) start.
        assert_eq!(
            rig.systemd.calls(),
            [
                Call::SetEnvironment(vec!["REACHD_RPI_ADDRESS=192.0.2.10".into()]),
                start_job()
            ]
        );

        // The network goes: unreachable at once, and the target stopped.
        rig.nm().set(&Network::disconnected()).await.unwrap();
        let host = rig
            .wait_host("stopped on network loss", |h| {
                h.target_state == "inactive" && h.last_job == "stop: done"
            })
            .await;
        assert_eq!(host.state, "unreachable");
        assert_eq!(host.reason, "network disconnected");
        assert_eq!(host.jobs_sent, 2);
        assert_eq!(
            rig.systemd.jobs()[1],
            Call::Stop {
                unit: TARGET.into(),
                mode: "replace".into()
            }
        );
    });
}

#[test]
fn a_target_started_before_a_restart_gets_the_address_and_follows_a_move() {
    on_buses(async {
        // A restarted agent finds the target active: it does not know which address the units
        // were given, so it gives them the host's without a restart, then follows a move as
        // usual.
        let probe = FakeProbe::present(pi());
        let setup = Setup {
            probe: Some(probe.clone()),
            extra_config: "[probe]\npresent_interval_ms = 100\n".into(),
            ..reachable(
                UnitSpec::loaded("active"),
                JobTiming::After(Duration::from_millis(20)),
            )
        };
        let rig = Rig::start(setup).await;
        let set =
            |address: &str| Call::SetEnvironment(vec![format!("REACHD_RPI_ADDRESS={address}")]);
        rig.wait_calls("the address in the environment", |calls| {
            calls.contains(&set("192.0.2.10"))
        })
        .await;
        probe.move_to(reachd::address::HostAddress::v4(
            "192.0.2.11".parse().unwrap(),
        ));
        rig.wait_calls("the new address in the environment", |calls| {
            calls.contains(&set("192.0.2.11"))
        })
        .await;
        rig.wait_host("restarted on the new address", |h| {
            h.last_job == "restart: done"
        })
        .await;
        assert_eq!(
            rig.systemd.jobs(),
            [restart_job()],
            "no start: it ran already"
        );
    });
}

#[test]
fn host_moving_to_a_new_address_restarts_its_units_there() {
    on_buses(async {
        let (rig, probe) = started_with_fake_probe("[probe]\npresent_interval_ms = 100\n").await;
        // The old address stops answering, the host answers at a new one (a new lease).
        probe.move_to(reachd::address::HostAddress::v4(
            "192.0.2.11".parse().unwrap(),
        ));
        let host = rig
            .wait_host("restarted at the new address", |h| {
                h.address == "192.0.2.11" && h.last_job == "restart: done"
            })
            .await;
        assert!(host.reachable, "{host:#?}");
        // The new address reaches the environment before the units restart.
        let calls = rig.systemd.calls();
        let set = Call::SetEnvironment(vec!["REACHD_RPI_ADDRESS=192.0.2.11".into()]);
        let at = calls
            .iter()
            .position(|c| *c == set)
            .expect("the address was set");
        assert_eq!(calls[at + 1], restart_job(), "{calls:#?}");
        assert_eq!(rig.systemd.jobs(), [start_job(), restart_job()]);
    });
}

#[test]
fn host_that_stops_answering_has_its_target_stopped() {
    on_buses(async {
        let (rig, probe) =
            started_with_fake_probe("[probe]\npresent_interval_ms = 100\nfailures = 2\n").await;
        probe.vanish();
        let host = rig
            .wait_host("stopped once the host is lost", |h| {
                h.state == "unreachable" && h.last_job == "stop: done"
            })
            .await;
        assert!(host.reason.contains("no mDNS answer"), "{host:#?}");
        assert_eq!(host.target_state, "inactive");
        assert_eq!(
            host.address, "192.0.2.10",
            "the last address that answered stays published"
        );
    });
}

#[test]
fn a_refresh_has_mdns_ask_again() {
    on_buses(async {
        let (mut rig, probe) = started_with_fake_probe("").await;
        let before = probe.asked_again();
        rig.refresh().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while probe.asked_again() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "`reachd refresh` did not have mDNS ask again within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rig.shutdown().await.expect("the agent stops");
    });
}
