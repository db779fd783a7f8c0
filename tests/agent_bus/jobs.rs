//! The target's jobs: stops and starts sent once and their results never missed (whenever
//! systemd sends them), failed and missing targets reported and not retried in a loop, and a
//! target started by someone else seen.

use super::*;

/// The target is active (someone started it, or the last run did) and the network is gone: the
/// agent stops it and reports the job's result.
async fn stop_job_on_network_down(timing: JobTiming) {
    let setup = Setup {
        timing,
        ..Setup::new(Some(Network::disconnected()), UnitSpec::loaded("active"))
    };
    let rig = Rig::start(setup).await;
    let jobs = rig.systemd.wait_for_jobs(1).await;
    assert_eq!(
        jobs,
        [Call::Stop {
            unit: TARGET.into(),
            mode: "replace".into()
        }]
    );
    let host = rig
        .wait_host("stopped its target", |h| {
            h.last_job == "stop: done" && h.target_state == "inactive"
        })
        .await;
    assert_eq!(host.jobs_sent, 1);
    assert_eq!(host.state, "unreachable");
    assert_eq!(
        rig.systemd.calls(),
        jobs,
        "no environment is set for a stop job"
    );
    rig.assert_agent_running();
}

#[test]
fn active_target_is_stopped_when_the_network_is_down() {
    on_buses(stop_job_on_network_down(JobTiming::After(
        Duration::from_millis(20),
    )));
}

#[test]
fn job_result_sent_before_the_reply_is_not_missed() {
    // systemd may end a job before its reply to StopUnit is read: the agent must already be
    // listening for JobRemoved (else it would wait 120 s and fail this test's timeout).
    on_buses(stop_job_on_network_down(JobTiming::BeforeReply));
}

#[test]
fn job_result_sent_right_after_the_reply_is_not_missed() {
    on_buses(stop_job_on_network_down(JobTiming::After(Duration::ZERO)));
}

#[test]
fn failed_job_is_reported_not_repeated_and_retried_on_refresh() {
    on_buses(async {
        let target = UnitSpec {
            stop_result: "failed",
            ..UnitSpec::loaded("active")
        };
        let rig = Rig::start(Setup::new(Some(Network::disconnected()), target)).await;
        rig.systemd.wait_for_jobs(1).await;
        let host = rig
            .wait_host("reported the failed job", |h| h.last_job == "stop: failed")
            .await;
        assert_eq!(host.jobs_sent, 1);
        assert_eq!(host.target_state, "active");
        // A failed job is retried later (30 s), not in a loop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rig.systemd.jobs().len(), 1, "{:?}", rig.systemd.jobs());
        rig.assert_agent_running();
        // Refresh() retries it now.
        rig.refresh().await;
        let jobs = rig.systemd.wait_for_jobs(2).await;
        assert!(
            matches!(&jobs[1], Call::Stop { unit, .. } if unit == TARGET),
            "{jobs:?}"
        );
        rig.wait_host("counted the second job", |h| {
            h.jobs_sent == 2 && h.last_job == "stop: failed"
        })
        .await;
        rig.assert_agent_running();
    });
}

#[test]
fn target_started_by_someone_else_is_seen_and_stopped() {
    on_buses(async {
        let rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| {
            h.state == "unreachable" && h.target_state == "inactive"
        })
        .await;
        assert_eq!(rig.systemd.jobs(), []);
        rig.systemd
            .set_active_state(TARGET, "active")
            .await
            .unwrap();
        let jobs = rig.systemd.wait_for_jobs(1).await;
        assert!(
            matches!(&jobs[0], Call::Stop { unit, .. } if unit == TARGET),
            "{jobs:?}"
        );
        rig.wait_host("stopped it again", |h| {
            h.target_state == "inactive" && h.last_job == "stop: done"
        })
        .await;
    });
}

#[test]
fn missing_target_is_reported_and_the_agent_keeps_running() {
    on_buses(async {
        let rig = Rig::start(Setup::new(
            Some(Network::disconnected()),
            UnitSpec::missing(),
        ))
        .await;
        let host = rig
            .wait_host("showing the missing target", |h| {
                h.target_state == "not-found"
            })
            .await;
        assert_eq!(host.jobs_sent, 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rig.systemd.jobs(), []);
        rig.assert_agent_running();
    });
}

#[test]
fn active_target_is_left_alone_until_the_host_is_decided() {
    // A restarted agent (upgrade, crash) finds its target active and the host not yet checked:
    // it must not stop the target (and the tunnels and mounts bound to it) before it knows.
    on_buses(async {
        let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
        let rig = Rig::start(Setup::new(Some(network), UnitSpec::loaded("active"))).await;
        rig.wait_host("seeing the target active", |h| h.target_state == "active")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let host = rig.host().await;
        assert_eq!(
            host.state, "unknown",
            "still within mDNS's grace: {host:#?}"
        );
        assert_eq!(
            rig.systemd.jobs(),
            [],
            "a job was sent while the host was unknown"
        );
    });
}

#[test]
fn start_job_result_sent_before_the_reply_is_not_missed() {
    on_buses(async {
        let rig = Rig::start(reachable(
            UnitSpec::loaded("inactive"),
            JobTiming::BeforeReply,
        ))
        .await;
        let host = rig
            .wait_host("started", |h| h.last_job == "start: done")
            .await;
        assert_eq!(host.target_state, "active");
        assert_eq!(rig.systemd.jobs(), [start_job()]);
    });
}

#[test]
fn missing_target_is_reported_in_last_job_and_not_retried_in_a_loop() {
    on_buses(async {
        let rig = Rig::start(reachable(
            UnitSpec::missing(),
            JobTiming::After(Duration::from_millis(20)),
        ))
        .await;
        let host = rig
            .wait_host("reporting the missing unit", |h| {
                h.last_job.starts_with("start: ") && h.last_job != "start: running"
            })
            .await;
        assert_eq!(
            host.last_job,
            "start: Unit rpi-accessible.target not found."
        );
        assert_eq!(host.target_state, "not-found");
        assert!(
            host.reachable,
            "the host is reachable even if its target is missing"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rig.systemd.jobs(), [start_job()]);
        rig.assert_agent_running();
    });
}

#[test]
fn failing_start_job_is_reported_and_not_retried_in_a_loop() {
    on_buses(async {
        let target = UnitSpec {
            start_result: "failed",
            ..UnitSpec::loaded("inactive")
        };
        let rig = Rig::start(reachable(
            target,
            JobTiming::After(Duration::from_millis(20)),
        ))
        .await;
        let host = rig
            .wait_host("reporting the failed job", |h| {
                h.last_job == "start: failed"
            })
            .await;
        assert_eq!(host.target_state, "failed");
        assert_eq!(host.jobs_sent, 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rig.systemd.jobs(), [start_job()]);
        rig.assert_agent_running();
    });
}
