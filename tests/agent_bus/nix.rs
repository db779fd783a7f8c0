//! Nix on private buses: the nix.conf fragment names a cache only while it answers (a fake
//! cache) and not after the target stops, switches remote builds off while the builder host is
//! away, and builds recorded while the host is away are counted and kept.

use super::*;

#[test]
fn nix_uses_a_cache_only_while_it_answers_and_leaves_it_before_the_stop() {
    on_buses(async {
        let (mut rig, cache, _probe) = using_a_fake_cache().await;

        // The tunnel's far end stops answering: Nix is pointed away within a check's deadline.
        cache.hang(true);
        let host = rig
            .wait_host("dropping a cache that hangs", |h| !h.nix_in_use)
            .await;
        assert!(
            host.nix_reason.starts_with("cache not answering: "),
            "{}",
            host.nix_reason
        );
        assert_eq!(rig.fragment_substituters(), Vec::<String>::new());
        cache.hang(false);
        rig.wait_host("using its cache again", |h| h.nix_in_use)
            .await;

        // The network goes: the fragment loses the cache before the stop job is sent.
        rig.nm().set(&Network::disconnected()).await.unwrap();
        rig.wait_calls("a stop job", |calls| {
            calls.iter().any(|c| matches!(c, Call::Stop { .. }))
        })
        .await;
        assert_eq!(rig.fragment_substituters(), Vec::<String>::new());
        let host = rig
            .wait_host("reporting why", |h| h.nix_reason == "host unreachable")
            .await;
        assert!(!host.nix_in_use);

        // Back home, then the agent stops: it leaves Nix pointed at nothing.
        let home = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        rig.nm().set(&home).await.unwrap();
        rig.wait_host("using its cache at home", |h| h.nix_in_use)
            .await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        assert_eq!(rig.fragment_substituters(), Vec::<String>::new());
    });
}

#[test]
fn builds_recorded_while_away_are_counted_and_kept() {
    on_buses(async {
        let spool_dir = tempfile::tempdir().expect("a spool directory");
        let spool = reachd::upload::spool::Spool::open(spool_dir.path()).expect("the spool opens");
        let out = "/nix/store/0c0ixk0gr8kqxzfh6m4zvrhl6wa4b1nq-hello"
            .parse()
            .expect("a store path");
        let entry = reachd::upload::spool::Entry::new(None, [out]).expect("an entry");
        spool.record(&entry).expect("recorded as the hook does");
        let setup = Setup {
            extra_config: format!("[nix]\nspool = \"{}\"\n", spool_dir.path().display()),
            host_config: "[host.nix]\nupload = true\n".into(),
            ..Setup::new(Some(Network::disconnected()), UnitSpec::loaded("inactive"))
        };
        let rig = Rig::start(setup).await;
        let host = rig
            .wait_host("counting the build waiting", |h| h.uploads_pending == 1)
            .await;
        assert_eq!(host.state, "unreachable");
        assert_eq!(host.upload_error, "");
        assert_eq!(host.last_upload, "", "nothing uploaded while away");
        assert_eq!(spool.pending("rpi").expect("the queue reads").len(), 1);
    });
}

#[test]
fn remote_builds_are_off_exactly_while_the_builder_host_is_not_reachable() {
    on_buses(async {
        let probe = FakeProbe::present(pi());
        let setup = Setup {
            probe: Some(probe.clone()),
            host_config: "[host.builder]\nuri = \"ssh-ng://nix-builder@rpi.local\"\n".into(),
            ..Setup::new(Some(Network::disconnected()), UnitSpec::loaded("inactive"))
        };
        let mut rig = Rig::start(setup).await;
        let host = rig
            .wait_host("away", |h| h.builder_reason == "host unreachable")
            .await;
        assert!(!host.builder_in_use);
        assert_eq!(rig.fragment_settings(), ["builders ="], "off while away");

        let home = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        rig.nm().set(&home).await.unwrap();
        rig.wait_host("building on it", |h| h.builder_in_use).await;
        assert_eq!(
            rig.fragment_settings(),
            Vec::<String>::new(),
            "root's builders apply at home"
        );

        probe.vanish();
        let host = rig
            .wait_host("the builder vanished", |h| !h.builder_in_use)
            .await;
        assert_eq!(host.builder_reason, "host unreachable");
        assert_eq!(rig.fragment_settings(), ["builders ="]);

        probe.move_to(pi());
        rig.wait_host("back", |h| h.builder_in_use).await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        assert_eq!(
            rig.fragment_settings(),
            ["builders ="],
            "nothing watches the builder once the agent is gone"
        );
    });
}
