//! The agent on private buses: each test starts two private `dbus-daemon`s (one plays the system
//! bus, one the session bus), a fake NetworkManager and a fake systemd user manager on them, and
//! `reachd::agent::run` in a task, then watches what the agent publishes on
//! `org.reachd.Reachd1` and which jobs it sends. Every test body runs under a timeout, so a
//! missed signal fails fast instead of hanging.
//!
//! By default the agent runs with its real mDNS probe and a hostname nobody answers for, so the
//! host is never reachable. Tests that need a reachable host (start jobs, the address in the
//! manager's environment, a start job that fails) give it a fake probe through
//! `reachd::agent::run_with`.

mod fake_cache;
mod fake_logind;
mod fake_nm;
mod fake_probe;
mod fake_systemd;
mod reload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zbus::fdo::{DBusProxy, IntrospectableProxy, PropertiesProxy};
use zbus::names::InterfaceName;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::Connection;

use fake_cache::FakeCache;
use fake_logind::FakeLogind;
use fake_nm::{FakeNm, Network, NM_STATE_CONNECTED_GLOBAL, NM_STATE_CONNECTED_SITE};
use fake_probe::FakeProbe;
use fake_systemd::{Call, FakeSystemd, JobTiming, UnitSpec};
use reachd_testkit::bus::PrivateBus;

/// The whole of one test, start to finish.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// One expected change.
const WAIT: Duration = Duration::from_secs(10);

const BUS_NAME: &str = "org.reachd.Reachd1";
const ROOT_PATH: &str = "/org/reachd/Reachd1";
const HOST_PATH: &str = "/org/reachd/Reachd1/host/rpi";
const HOST_INTERFACE: &str = "org.reachd.Reachd1.Host";
const TARGET: &str = "rpi-accessible.target";
/// The target of a second host, `nas`, that reload tests add.
const NAS_TARGET: &str = "nas-accessible.target";
const HOME_UUID: &str = "5f0f6c3e-8a3b-4f0e-9d6a-2b1c7e4d9a10";

/// Runs a test body under [`TEST_TIMEOUT`].
async fn within_timeout(body: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
        panic!("the test did not finish within {TEST_TIMEOUT:?}");
    }
}

/// Log the agent with `RUST_LOG=reachd=debug cargo test --test agent_bus -- --nocapture`.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A configuration with one host `rpi` whose mDNS name nobody on any network answers for,
/// `extra` TOML (e.g. a `[probe]` table) before it and `host_extra` (e.g. `[host.nix]`) after.
fn config_with(extra: &str, host_extra: &str) -> reachd::config::Config {
    reachd::config::parse(&config_text(extra, host_extra), "agent_bus.toml")
        .expect("the test configuration is valid")
}

/// The text of [`config_with`].
fn config_text(extra: &str, host_extra: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let hostname = format!(
        "reachd-test-{}-{}.local",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    format!("{extra}\n[[host]]\nname = \"rpi\"\nhostname = \"{hostname}\"\n{host_extra}")
}

/// The published properties of the host `rpi`, as the CLI reads them.
type Host = reachd::status::HostStatus;

/// What a test sets up: NetworkManager (absent when `None`), the target, the job timing.
struct Setup {
    network: Option<Network>,
    target: UnitSpec,
    timing: JobTiming,
    /// A fake probe instead of mDNS, and the configuration's extra TOML.
    probe: Option<Arc<FakeProbe>>,
    extra_config: String,
    /// TOML after the host's own keys (its `[host.nix]`).
    host_config: String,
}

impl Setup {
    fn new(network: Option<Network>, target: UnitSpec) -> Self {
        Setup {
            network,
            target,
            timing: JobTiming::After(Duration::from_millis(20)),
            probe: None,
            extra_config: String::new(),
            host_config: String::new(),
        }
    }
}

/// Two private buses, the fakes on them, the agent under test, and a client connection.
struct Rig {
    system: PrivateBus,
    session: PrivateBus,
    nm: Option<FakeNm>,
    systemd: FakeSystemd,
    client: Connection,
    agent: Option<JoinHandle<anyhow::Result<()>>>,
    stop: Option<oneshot::Sender<()>>,
    /// Each send is a SIGHUP: the agent reads `config_file` again.
    reloads: mpsc::UnboundedSender<()>,
    /// The configuration the agent started with, and the file it reads on a reload.
    config_text: String,
    config_file: std::path::PathBuf,
    /// The agent's `$XDG_RUNTIME_DIR` (its nix.conf fragment and its configuration file).
    runtime: tempfile::TempDir,
}

impl Rig {
    /// The most common start: no network, the target loaded and inactive.
    async fn offline() -> Rig {
        Rig::start(Setup::new(
            Some(Network::disconnected()),
            UnitSpec::loaded("inactive"),
        ))
        .await
    }

    async fn start(setup: Setup) -> Rig {
        Rig::start_on(
            setup,
            PrivateBus::start("system"),
            PrivateBus::start("session"),
        )
        .await
    }

    /// [`Rig::start`] on buses the test started (to put more on them first).
    async fn start_on(setup: Setup, system: PrivateBus, session: PrivateBus) -> Rig {
        init_logging();
        let nm = match &setup.network {
            Some(network) => Some(
                FakeNm::start(system.address(), network)
                    .await
                    .expect("the fake NetworkManager starts"),
            ),
            None => None,
        };
        let units = [
            (TARGET, setup.target),
            (NAS_TARGET, UnitSpec::loaded("inactive")),
        ];
        let systemd = FakeSystemd::start(session.address(), &units, setup.timing)
            .await
            .expect("the fake systemd starts");
        let client = zbus::connection::Builder::address(session.address())
            .expect("a valid bus address")
            .build()
            .await
            .expect("the test connects to its session bus");
        let runtime = tempfile::tempdir().expect("a runtime directory");
        let config_text = config_text(&setup.extra_config, &setup.host_config);
        let config_file = runtime.path().join("config.toml");
        std::fs::write(&config_file, &config_text).expect("the configuration is written");
        let (config, _) =
            reachd::config::load(Some(&config_file)).expect("the test configuration is valid");
        let environment = reachd::agent::Environment {
            system_bus: Some(system.path_address()),
            session_bus: Some(session.address().to_string()),
            runtime_dir: Some(runtime.path().to_path_buf()),
            config_file: Some(config_file.clone()),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (reloads, reload_requests) = mpsc::unbounded_channel();
        let control = reachd::agent::Control {
            shutdown: async move {
                let _ = stopped.await;
            },
            reloads: futures_util::stream::unfold(reload_requests, |mut requests| async move {
                requests.recv().await.map(|()| ((), requests))
            }),
        };
        let agent = match setup.probe {
            Some(probe) => {
                tokio::spawn(reachd::agent::run_with(config, environment, probe, control))
            }
            None => tokio::spawn(reachd::agent::run(config, environment, control)),
        };
        let mut rig = Rig {
            system,
            session,
            nm,
            systemd,
            client,
            agent: Some(agent),
            stop: Some(stop),
            reloads,
            config_text,
            config_file,
            runtime,
        };
        rig.wait_for_agent().await;
        rig
    }

    /// Waits until the agent owns its name, failing at once if it exits instead.
    async fn wait_for_agent(&mut self) {
        let dbus = DBusProxy::new(&self.client).await.expect("the bus answers");
        let mut owners = dbus
            .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
            .await
            .expect("NameOwnerChanged subscription");
        let owned = async {
            if !dbus
                .name_has_owner(BUS_NAME.try_into().unwrap())
                .await
                .expect("the bus answers")
            {
                owners.next().await.expect("the bus stays up");
            }
        };
        let agent = self.agent.as_mut().expect("the agent runs");
        tokio::select! {
            () = owned => {}
            ended = agent => panic!("the agent exited while starting: {ended:?}"),
            () = tokio::time::sleep(WAIT) => panic!("the agent did not take {BUS_NAME} within {WAIT:?}"),
        }
    }

    fn nm(&mut self) -> &mut FakeNm {
        self.nm.as_mut().expect("this test runs NetworkManager")
    }

    async fn host(&self) -> Host {
        self.host_at(HOST_PATH).await
    }

    /// The published properties of the host object at `path`.
    async fn host_at(&self, path: &str) -> Host {
        let properties = self.properties_at(path).await;
        let all = properties
            .get_all(InterfaceName::from_static_str_unchecked(HOST_INTERFACE))
            .await
            .expect("the host's properties can be read");
        Host::from_properties(all).expect("the host's properties are complete and well typed")
    }

    async fn host_properties(&self) -> PropertiesProxy<'static> {
        self.properties_at(HOST_PATH).await
    }

    /// The properties of the agent's object at `path` (the root or a host), never cached.
    async fn properties_at(&self, path: &str) -> PropertiesProxy<'static> {
        PropertiesProxy::builder(&self.client)
            .destination(BUS_NAME)
            .unwrap()
            .path(path.to_string())
            .unwrap()
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("a proxy for the agent's object")
    }

    /// Waits until the host's published properties satisfy `wanted`: subscribe, read, and read
    /// again on each PropertiesChanged (level-triggered, so no change can slip between).
    async fn wait_host(&self, what: &str, wanted: impl Fn(&Host) -> bool) -> Host {
        self.wait_host_at(HOST_PATH, what, wanted).await
    }

    /// [`Rig::wait_host`] for the host object at `path`.
    async fn wait_host_at(&self, path: &str, what: &str, wanted: impl Fn(&Host) -> bool) -> Host {
        let properties = self.properties_at(path).await;
        let mut changes = properties
            .receive_properties_changed()
            .await
            .expect("PropertiesChanged subscription");
        let mut last = None;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let host = self.host_at(path).await;
                if wanted(&host) {
                    return host;
                }
                last = Some(host);
                changes
                    .next()
                    .await
                    .expect("the agent's signals keep coming");
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("host never {what} within {WAIT:?}; last seen: {last:#?}"))
    }

    /// Waits until the calls the fake user manager received satisfy `wanted` (the fake has no
    /// signal for them: it is read every 10 ms).
    async fn wait_calls(&self, what: &str, wanted: impl Fn(&[Call]) -> bool) {
        let found = tokio::time::timeout(WAIT, async {
            while !wanted(&self.systemd.calls()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!(
                "never {what} within {WAIT:?}; calls: {:#?}",
                self.systemd.calls()
            );
        }
    }

    async fn refresh(&self) {
        self.client
            .call_method(
                Some(BUS_NAME),
                ROOT_PATH,
                Some("org.reachd.Reachd1"),
                "Refresh",
                &(),
            )
            .await
            .expect("Refresh() succeeds");
    }

    /// Waits until the agent read NetworkManager `n` times (coldplug and each change).
    async fn wait_nm_reads(&mut self, n: u32) {
        let nm = self.nm();
        tokio::time::timeout(WAIT, async {
            while nm.reads() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the agent did not read NetworkManager {n} times"));
    }

    /// The substituters the agent's nix.conf fragment names now (none: no setting).
    fn fragment_substituters(&self) -> Vec<String> {
        let path = self.runtime.path().join("reachd/nix.conf");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("the fragment {} is there: {err}", path.display()));
        let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        match settings[..] {
            [] => vec![],
            [line] => line
                .strip_prefix("extra-substituters = ")
                .unwrap_or_else(|| panic!("only extra-substituters in the fragment: {text}"))
                .split(' ')
                .map(String::from)
                .collect(),
            _ => panic!("one setting at most in the fragment: {text}"),
        }
    }

    fn assert_agent_running(&self) {
        let agent = self.agent.as_ref().expect("the agent runs");
        assert!(!agent.is_finished(), "the agent exited");
    }

    /// Stops the agent through its shutdown future and returns what `run` returned.
    async fn shutdown(&mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().expect("not stopped yet").send(());
        self.join().await
    }

    async fn join(&mut self) -> anyhow::Result<()> {
        let agent = self.agent.take().expect("the agent runs");
        tokio::time::timeout(WAIT, agent)
            .await
            .expect("the agent ends within the wait")
            .expect("the agent task does not panic")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coldplug_with_network_down_is_unreachable_and_sends_no_job() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_loss_is_signalled_at_once_and_return_is_followed() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networkmanager_restart_is_survived_and_followed() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_system_bus_is_found_again_and_followed() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networkmanager_appearing_after_the_agent_is_followed() {
    within_timeout(async {
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
    })
    .await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_target_is_stopped_when_the_network_is_down() {
    within_timeout(stop_job_on_network_down(JobTiming::After(
        Duration::from_millis(20),
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_result_sent_before_the_reply_is_not_missed() {
    // systemd may end a job before its reply to StopUnit is read: the agent must already be
    // listening for JobRemoved (else it would wait 120 s and fail this test's timeout).
    within_timeout(stop_job_on_network_down(JobTiming::BeforeReply)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_result_sent_right_after_the_reply_is_not_missed() {
    within_timeout(stop_job_on_network_down(JobTiming::After(Duration::ZERO))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_is_reported_not_repeated_and_retried_on_refresh() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_started_by_someone_else_is_seen_and_stopped() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_is_reported_and_the_agent_keeps_running() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_target_is_left_alone_until_the_host_is_decided() {
    // A restarted agent (upgrade, crash) finds its target active and the host not yet checked:
    // it must not stop the target (and the tunnels and mounts bound to it) before it knows.
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_session_bus_ends_run_with_an_error() {
    within_timeout(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        rig.session.kill();
        let ended = rig.join().await;
        assert!(
            ended.is_err(),
            "run must fail so that systemd restarts the agent: {ended:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_refuses_to_start_and_the_first_keeps_the_name() {
    within_timeout(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        let dbus = DBusProxy::new(&rig.client).await.expect("the bus answers");
        let name = zbus::names::BusName::try_from(BUS_NAME).unwrap();
        let first = dbus.get_name_owner(name.clone()).await.expect("owned");
        let environment = reachd::agent::Environment {
            system_bus: Some(rig.system.address().to_string()),
            session_bus: Some(rig.session.address().to_string()),
            runtime_dir: Some(rig.runtime.path().to_path_buf()),
            config_file: None,
        };
        let control = reachd::agent::Control {
            shutdown: std::future::pending(),
            reloads: futures_util::stream::pending(),
        };
        let second = reachd::agent::run(config_with("", ""), environment, control);
        let refused = tokio::time::timeout(WAIT, second)
            .await
            .expect("the second agent returns at once")
            .expect_err("the second agent refuses to run");
        let message = format!("{refused:#}");
        assert!(
            message.contains("reachd is already running on this session bus (pid "),
            "{message}"
        );
        assert!(
            message.contains(first.as_str()),
            "names the first: {message}"
        );
        assert_eq!(dbus.get_name_owner(name).await.expect("owned"), first);
        rig.assert_agent_running();
        rig.shutdown()
            .await
            .expect("the first agent stops normally");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_prints_each_change_and_ends_with_the_agent() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    within_timeout(async {
        let (mut rig, _probe) = started_with_fake_probe("").await;
        let mut watcher = tokio::process::Command::new(env!("CARGO_BIN_EXE_reachd"))
            .args(["status", "--watch", "--json"])
            .env("DBUS_SESSION_BUS_ADDRESS", rig.session.address())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("reachd status --watch starts");
        let mut lines = BufReader::new(watcher.stdout.take().expect("its stdout")).lines();
        let mut next = async || -> serde_json::Value {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a line within the wait")
                .expect("stdout reads")
                .expect("a line, not the end");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("JSON per line: {e}: {line}"))
        };
        let first = next().await;
        assert_eq!(
            (first["name"].as_str(), first["reachable"].as_bool()),
            (Some("rpi"), Some(true))
        );
        rig.nm().set(&Network::disconnected()).await.unwrap();
        loop {
            let host = next().await;
            if host["state"] == "unreachable" {
                assert_eq!(host["reason"], "network disconnected");
                break;
            }
        }
        rig.shutdown().await.expect("the agent stops");
        let status = tokio::time::timeout(WAIT, watcher.wait())
            .await
            .expect("the watch ends with the agent")
            .expect("it exits");
        assert_eq!(status.code(), Some(2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_with_wrong_arguments_get_errors_and_the_agent_goes_on() {
    within_timeout(async {
        let rig = Rig::offline().await;
        let client = &rig.client;
        let attempts: Vec<zbus::Result<zbus::Message>> = vec![
            client
                .call_method(
                    Some(BUS_NAME),
                    ROOT_PATH,
                    Some("org.reachd.Reachd1"),
                    "Refresh",
                    &("now",),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    ROOT_PATH,
                    Some("org.reachd.Reachd1"),
                    "Reboot",
                    &(),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "Get",
                    &(HOST_INTERFACE, "Password"),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "Set",
                    &(
                        HOST_INTERFACE,
                        "Reachable",
                        zbus::zvariant::Value::from(true),
                    ),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    "/org/reachd/Reachd1/host/nobody",
                    Some(HOST_INTERFACE),
                    "Get",
                    &(),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "GetAll",
                    &(42u32,),
                )
                .await,
        ];
        for (n, attempt) in attempts.into_iter().enumerate() {
            assert!(
                matches!(attempt, Err(zbus::Error::MethodError(..))),
                "call {n} gets a D-Bus error: {attempt:?}"
            );
        }
        rig.assert_agent_running();
        let host = rig.host().await;
        assert!(!host.reachable, "the host state is untouched: {host:#?}");
        rig.refresh().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_forged_networkmanager_signals_cost_a_bounded_number_of_reads() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_future_ends_run_with_ok() {
    within_timeout(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        assert_eq!(
            rig.systemd.jobs(),
            [],
            "stopping the agent leaves the target as it is"
        );
    })
    .await;
}

/// The members of one interface, comparable: methods with their argument types and
/// directions, properties with type and access, signals with their argument types.
#[derive(Debug, PartialEq, Eq)]
struct Members {
    methods: BTreeSet<String>,
    properties: BTreeSet<String>,
    signals: BTreeSet<String>,
}

/// The `org.reachd.*` interfaces of an introspection document.
fn reachd_interfaces(xml: &str) -> BTreeMap<String, Members> {
    let node = zbus_xml::Node::from_reader(xml.as_bytes()).expect("introspection XML parses");
    let args = |args: &[zbus_xml::Arg]| {
        args.iter()
            .map(|a| {
                format!(
                    "{}{}",
                    match a.direction() {
                        Some(zbus_xml::ArgDirection::Out) => "out:",
                        _ => "in:",
                    },
                    a.ty().inner()
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    node.interfaces()
        .iter()
        .filter(|i| i.name().starts_with("org.reachd."))
        .map(|i| {
            let members = Members {
                methods: i
                    .methods()
                    .iter()
                    .map(|m| format!("{}({})", m.name(), args(m.args())))
                    .collect(),
                properties: i
                    .properties()
                    .iter()
                    .map(|p| format!("{} {} {:?}", p.name(), p.ty().inner(), p.access()))
                    .collect(),
                signals: i
                    .signals()
                    .iter()
                    .map(|s| format!("{}({})", s.name(), args(s.args())))
                    .collect(),
            };
            (i.name().to_string(), members)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_matches_the_contract_xml() {
    within_timeout(async {
        let rig = Rig::offline().await;
        let contract_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dbus-interfaces/org.reachd.Reachd1.xml"
        );
        let contract_xml =
            std::fs::read_to_string(contract_path).expect("the contract XML is readable");
        let contract = reachd_interfaces(&contract_xml);
        assert_eq!(
            contract.keys().collect::<Vec<_>>(),
            ["org.reachd.Reachd1", "org.reachd.Reachd1.Host"],
            "the contract defines the root and host interfaces"
        );

        let mut live = BTreeMap::new();
        for (path, expected) in [
            (ROOT_PATH, "org.reachd.Reachd1"),
            (HOST_PATH, HOST_INTERFACE),
        ] {
            let introspectable = IntrospectableProxy::builder(&rig.client)
                .destination(BUS_NAME)
                .unwrap()
                .path(path)
                .unwrap()
                .build()
                .await
                .unwrap();
            let xml = introspectable
                .introspect()
                .await
                .expect("Introspect() answers");
            let found = reachd_interfaces(&xml);
            assert_eq!(
                found.keys().collect::<Vec<_>>(),
                [expected],
                "interfaces at {path}"
            );
            live.extend(found);
        }
        for (name, members) in &contract {
            let live = &live[name];
            assert_eq!(
                live.methods, members.methods,
                "methods of {name} (live, contract)"
            );
            assert_eq!(
                live.properties, members.properties,
                "properties of {name} (live, contract)"
            );
            assert_eq!(
                live.signals, members.signals,
                "signals of {name} (live, contract)"
            );
        }
        assert_eq!(live, contract);
    })
    .await;
}

/// The Pi answers at this address (TEST-NET-1) in the tests with a fake probe.
fn pi() -> reachd::address::HostAddress {
    reachd::address::HostAddress::v4("192.0.2.10".parse().unwrap())
}

/// A reachable host on a connected network, the target as `target`.
fn reachable(target: UnitSpec, timing: JobTiming) -> Setup {
    let network = Network::connected(NM_STATE_CONNECTED_GLOBAL, HOME_UUID);
    Setup {
        timing,
        probe: Some(FakeProbe::present(pi())),
        ..Setup::new(Some(network), target)
    }
}

/// A host present at the Pi's address through a fake probe, its target started, with `config`
/// as the configuration's extra TOML.
async fn started_with_fake_probe(config: &'static str) -> (Rig, Arc<FakeProbe>) {
    let probe = FakeProbe::present(pi());
    let setup = Setup {
        probe: Some(probe.clone()),
        extra_config: config.into(),
        ..reachable(
            UnitSpec::loaded("inactive"),
            JobTiming::After(Duration::from_millis(20)),
        )
    };
    let rig = Rig::start(setup).await;
    rig.wait_host("started", |h| h.last_job == "start: done")
        .await;
    (rig, probe)
}

fn restart_job() -> Call {
    Call::Restart {
        unit: TARGET.into(),
        mode: "replace".into(),
    }
}

fn start_job() -> Call {
    Call::Start {
        unit: TARGET.into(),
        mode: "replace".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachable_host_gets_its_address_set_then_its_target_started_then_stopped() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_the_agent_runs_after_run_returned() {
    within_timeout(async {
        let (mut rig, probe) = started_with_fake_probe("").await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        let dbus = DBusProxy::new(&rig.client).await.expect("the bus answers");
        assert!(
            !dbus
                .name_has_owner(BUS_NAME.try_into().unwrap())
                .await
                .expect("the bus answers"),
            "{BUS_NAME} is free as soon as run returned"
        );
        let (calls, reads) = (rig.systemd.calls(), rig.nm().reads());
        // Everything a running agent would act on: the network goes, the host vanishes, the
        // target is stopped by someone else.
        rig.nm().set(&Network::disconnected()).await.unwrap();
        probe.vanish();
        rig.systemd
            .set_active_state(TARGET, "inactive")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rig.systemd.calls(), calls, "no call after run returned");
        assert_eq!(rig.nm().reads(), reads, "NetworkManager not read again");
    })
    .await;
}

/// A reachable host with an HTTP cache (a fake) that Nix uses: its target started, the cache
/// in the fragment.
async fn using_a_fake_cache() -> (Rig, FakeCache, Arc<FakeProbe>) {
    let cache = FakeCache::start().await;
    let probe = FakeProbe::present(pi());
    let setup = Setup {
        probe: Some(probe.clone()),
        host_config: format!("[host.nix]\nsubstituter = \"{}\"\n", cache.url()),
        ..reachable(
            UnitSpec::loaded("inactive"),
            JobTiming::After(Duration::from_millis(20)),
        )
    };
    let rig = Rig::start(setup).await;
    let host = rig.wait_host("using its cache", |h| h.nix_in_use).await;
    assert_eq!(host.nix_reason, "in use");
    assert_eq!(host.target_state, "active");
    assert_eq!(rig.fragment_substituters(), [cache.url()]);
    (rig, cache, probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_uses_a_cache_only_while_it_answers_and_leaves_it_before_the_stop() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_recorded_while_away_are_counted_and_kept() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_job_result_sent_before_the_reply_is_not_missed() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_is_reported_in_last_job_and_not_retried_in_a_loop() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_start_job_is_reported_and_not_retried_in_a_loop() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_started_before_a_restart_gets_the_address_and_follows_a_move() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_sleep_targets_are_stopped_then_the_machine_may_sleep_and_on_wake_checked_again() {
    within_timeout(async {
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
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_moving_to_a_new_address_restarts_its_units_there() {
    within_timeout(async {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_that_stops_answering_has_its_target_stopped() {
    within_timeout(async {
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
    })
    .await;
}
