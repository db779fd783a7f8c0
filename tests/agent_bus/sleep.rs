//! Sleep: the targets of reachable hosts stopped before the machine sleeps, logind's inhibitor
//! held meanwhile and let go, and the hosts checked again on waking.

use super::*;

#[test]
fn before_sleep_targets_are_stopped_then_the_machine_may_sleep_and_on_wake_checked_again() {
    on_buses(async {
        let probe = FakeProbe::present(pi());
        let setup = Setup {
            probe: Some(probe.clone()),
            ..reachable(
                UnitSpec::loaded("inactive"),
                JobTiming::After(Duration::from_millis(300)),
            )
        };
        // logind is there before the agent, as on a real machine.
        let (system, session) = (PrivateBus::start("system"), PrivateBus::start("session"));
        let logind = FakeLogind::start(system.address())
            .await
            .expect("the fake logind starts");
        let rig = Rig::start_on(setup, system, session).await;
        rig.wait_host("started", |h| h.last_job == "start: done")
            .await;
        let held = || logind.inhibitors_held();
        wait_until("the agent holds a sleep inhibitor", || held() == 1).await;

        logind.prepare_for_sleep(true).await.unwrap();
        let host = rig
            .wait_host("unreachable before sleep", |h| h.state == "unreachable")
            .await;
        assert_eq!(host.reason, "the machine is going to sleep");
        // The inhibitor is held until the stop job (300 ms) is done, then let go.
        assert_eq!(held(), 1, "let go before the target stopped");
        rig.wait_host("stopped before sleep", |h| h.last_job == "stop: done")
            .await;
        wait_until("the inhibitor let go", || held() == 0).await;

        logind.prepare_for_sleep(false).await.unwrap();
        rig.wait_host("started again after the wake", |h| {
            h.reachable && h.last_job == "start: done" && h.jobs_sent == 3
        })
        .await;
        wait_until("a new inhibitor for the next sleep", || held() == 1).await;
    });
}

/// Waits until `done` holds (checked every 10 ms), failing after [`WAIT`].
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never {what} within {WAIT:?}");
}
