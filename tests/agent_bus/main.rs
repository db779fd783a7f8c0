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
mod fake_notifications;
mod fake_probe;
mod fake_systemd;

// The tests, by topic; this file is what they share (the rig, its fakes and helpers).
mod jobs;
mod network;
mod nix;
mod notify;
mod reachable;
mod reload;
mod session;
mod sleep;

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
use fake_notifications::FakeNotifications;
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

/// Every test's preamble, said once: its body on a runtime with two worker threads (the fakes
/// answer while the test waits), under [`TEST_TIMEOUT`].
fn on_buses(body: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
            panic!("the test did not finish within {TEST_TIMEOUT:?}");
        }
    });
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
    /// The settings lines of the nix.conf fragment.
    fn fragment_settings(&self) -> Vec<String> {
        let path = self.runtime.path().join("reachd/nix.conf");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("the fragment {} is there: {err}", path.display()));
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

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
