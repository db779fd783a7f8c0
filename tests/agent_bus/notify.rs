//! Desktop notifications on private buses: with `host_changes`, a host that comes and goes is
//! told once each way, the second notification replacing the first; without `[notify]` nothing
//! is sent, and a reload that adds it applies from the next change; without a notification
//! server, or with one that never answers, the agent works as before. (Uploads failing for `uploads_failing_minutes`, at least a
//! minute, are tested in src/reconcile/notice.rs with the clock passed in.)

use super::*;

use self::reload::ReadWatch;

const HOST_CHANGES: &str = "[notify]\nhost_changes = true\n";

/// Which notification server the session bus has.
enum Server {
    Answering,
    Hung,
    Missing,
}

/// A host the fake probe finds, on no network yet, with `config` as the extra TOML; the
/// notification server on the session bus before the agent.
async fn away(config: &str, server: Server) -> (Rig, Option<FakeNotifications>) {
    let (system, session) = (PrivateBus::start("system"), PrivateBus::start("session"));
    let started = match server {
        Server::Answering => Some(FakeNotifications::start(session.address()).await),
        Server::Hung => Some(FakeNotifications::start_hung(session.address()).await),
        Server::Missing => None,
    };
    let notifications = started.map(|server| server.expect("the fake notification server starts"));
    let setup = Setup {
        probe: Some(FakeProbe::present(pi())),
        extra_config: config.into(),
        ..Setup::new(Some(Network::disconnected()), UnitSpec::loaded("inactive"))
    };
    let rig = Rig::start_on(setup, system, session).await;
    rig.wait_host("unreachable, away", |h| h.state == "unreachable")
        .await;
    (rig, notifications)
}

impl Rig {
    /// Home: the host found and its target started.
    async fn come_home(&mut self) {
        let home = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        self.nm().set(&home).await.unwrap();
        self.wait_host("reachable with its target started", |h| {
            h.reachable && h.last_job == "start: done"
        })
        .await;
    }

    /// Away: the host lost and its target stopped.
    async fn leave(&mut self) {
        self.nm().set(&Network::disconnected()).await.unwrap();
        self.wait_host("unreachable with its target stopped", |h| {
            !h.reachable && h.last_job == "stop: done"
        })
        .await;
    }
}

/// Waits until the server received `n` notifications (read every 10 ms) and returns them.
async fn wait_notified(server: &FakeNotifications, n: usize) -> Vec<fake_notifications::Notified> {
    let received = tokio::time::timeout(WAIT, async {
        while server.calls().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if received.is_err() {
        panic!(
            "never {n} notifications within {WAIT:?}: {:#?}",
            server.calls()
        );
    }
    server.calls()
}

#[test]
fn a_host_coming_and_going_is_told_once_each_way_the_second_replacing_the_first() {
    on_buses(async {
        let (mut rig, server) = away(HOST_CHANGES, Server::Answering).await;
        let server = server.expect("a server");
        rig.come_home().await;
        let calls = wait_notified(&server, 1).await;
        assert_eq!(calls[0].app_name, "reachd");
        assert_eq!(calls[0].summary, "rpi is reachable");
        assert_eq!(calls[0].body, "answered at 192.0.2.10");
        assert_eq!(calls[0].replaces_id, 0, "the first of its kind");

        rig.leave().await;
        let calls = wait_notified(&server, 2).await;
        assert_eq!(
            calls.len(),
            2,
            "one notification each way, none for the first state at start: {calls:#?}"
        );
        assert_eq!(calls[1].summary, "rpi is unreachable");
        assert_eq!(calls[1].body, "network disconnected");
        assert_eq!(
            calls[1].replaces_id, calls[0].id,
            "the host's notifications replace each other"
        );
    });
}

#[test]
fn without_notify_nothing_is_sent_until_a_reload_adds_it() {
    on_buses(async {
        let (mut rig, server) = away("", Server::Answering).await;
        let server = server.expect("a server");
        rig.come_home().await;
        rig.leave().await;

        let read = ReadWatch::on(&rig.config_file);
        rig.reload(&format!("{HOST_CHANGES}{}", rig.config_text));
        read.wait_read().await;
        rig.come_home().await;
        // Notifications go out in order: had the changes before the reload been told, they
        // would have come first.
        let calls = wait_notified(&server, 1).await;
        let summaries: Vec<&str> = calls.iter().map(|c| c.summary.as_str()).collect();
        assert_eq!(summaries, ["rpi is reachable"], "only after the reload");
    });
}

#[test]
fn without_a_notification_server_the_agent_works_as_before() {
    on_buses(async {
        let (mut rig, _none) = away(HOST_CHANGES, Server::Missing).await;
        rig.come_home().await;
        rig.leave().await;
        rig.come_home().await;
        let host = rig.host().await;
        assert_eq!(host.jobs_sent, 3, "{host:#?}");
        rig.assert_agent_running();
    });
}

#[test]
fn a_notification_server_that_never_answers_does_not_hold_the_agent_up() {
    on_buses(async {
        let (mut rig, _hung) = away(HOST_CHANGES, Server::Hung).await;
        let began = std::time::Instant::now();
        rig.come_home().await;
        rig.leave().await;
        rig.come_home().await;
        // Waiting for each of the three notifications' 2 s timeouts would take 6 s.
        let took = began.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "three changes took {took:?}: the agent waited for the server"
        );
        rig.assert_agent_running();
    });
}
