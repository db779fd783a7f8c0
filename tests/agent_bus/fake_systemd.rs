//! A small systemd user manager on the private "session" bus: the Manager methods reachd calls
//! (`Subscribe`, `LoadUnit`, `StartUnit`, `StopUnit`, `SetEnvironment`), its `JobRemoved`
//! signal, and unit objects with `ActiveState`/`LoadState` emitting PropertiesChanged. Like
//! systemd, it sends signals only once a client called `Subscribe()`. Each unit is configured
//! by the test (missing, or with a job that fails), and every call that changes something is
//! recorded so that tests can assert which jobs were sent, with what environment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{connection, interface, Connection};

pub const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
pub const MANAGER_PATH: &str = "/org/freedesktop/systemd1";

/// A call the fake recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Start { unit: String, mode: String },
    Stop { unit: String, mode: String },
    Restart { unit: String, mode: String },
    SetEnvironment(Vec<String>),
}

/// When JobRemoved is sent, relative to the reply to StartUnit/StopUnit.
#[derive(Debug, Clone, Copy)]
pub enum JobTiming {
    /// After the reply, this much later (systemd's usual order).
    After(Duration),
    /// Before the reply even leaves: the fastest a job can possibly end.
    BeforeReply,
}

/// How a configured unit behaves.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub load_state: &'static str,
    pub active_state: &'static str,
    /// JobRemoved's result for start and stop jobs: "done", "failed", ...
    pub start_result: &'static str,
    pub stop_result: &'static str,
}

impl UnitSpec {
    /// A loaded target in `active_state` whose jobs succeed.
    pub fn loaded(active_state: &'static str) -> Self {
        UnitSpec {
            load_state: "loaded",
            active_state,
            start_result: "done",
            stop_result: "done",
        }
    }

    /// A unit with no file: LoadState "not-found", and StartUnit fails with NoSuchUnit.
    pub fn missing() -> Self {
        UnitSpec {
            load_state: "not-found",
            ..UnitSpec::loaded("inactive")
        }
    }
}

/// systemd's errors as they appear on the wire.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum SystemdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
}

/// The object path systemd gives a unit: each byte outside `[A-Za-z0-9]` as `_xx` in hex.
pub fn unit_path(unit: &str) -> OwnedObjectPath {
    let mut path = format!("{MANAGER_PATH}/unit/");
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            path.push(b as char);
        } else {
            path.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(path).expect("escaped unit names are valid object paths")
}

struct Shared {
    specs: Mutex<HashMap<String, UnitSpec>>,
    calls: watch::Sender<Vec<Call>>,
    subscribed: AtomicBool,
    next_job: AtomicU32,
    timing: Mutex<JobTiming>,
}

struct Manager(Arc<Shared>);

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    fn subscribe(&self) {
        self.0.subscribed.store(true, Ordering::SeqCst);
    }

    fn load_unit(&self, name: &str) -> Result<OwnedObjectPath, SystemdError> {
        if self.0.specs.lock().unwrap().contains_key(name) {
            Ok(unit_path(name))
        } else {
            Err(SystemdError::NoSuchUnit(format!(
                "Unit {name} not set up in this test."
            )))
        }
    }

    async fn start_unit(
        &self,
        name: &str,
        mode: &str,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.0.record(Call::Start {
            unit: name.into(),
            mode: mode.into(),
        });
        self.0.start_job(connection, name).await
    }

    async fn stop_unit(
        &self,
        name: &str,
        mode: &str,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.0.record(Call::Stop {
            unit: name.into(),
            mode: mode.into(),
        });
        let spec = self.0.spec(name)?;
        // A stop job that fails leaves the unit as it was.
        let after = if spec.stop_result == "done" {
            "inactive"
        } else {
            spec.active_state
        };
        Ok(self
            .0
            .job(connection, name, spec.stop_result, after)
            .await?)
    }

    async fn restart_unit(
        &self,
        name: &str,
        mode: &str,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.0.record(Call::Restart {
            unit: name.into(),
            mode: mode.into(),
        });
        self.0.start_job(connection, name).await
    }

    fn set_environment(&self, assignments: Vec<String>) {
        self.0.record(Call::SetEnvironment(assignments));
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

impl Shared {
    fn record(&self, call: Call) {
        self.calls.send_modify(|calls| calls.push(call));
    }

    fn spec(&self, name: &str) -> Result<UnitSpec, SystemdError> {
        self.specs
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| SystemdError::NoSuchUnit(format!("Unit {name} not found.")))
    }

    /// A start (or restart) job: a missing unit is refused, the unit ends active or failed as
    /// its spec says.
    async fn start_job(
        self: &Arc<Self>,
        connection: &Connection,
        name: &str,
    ) -> Result<OwnedObjectPath, SystemdError> {
        let spec = self.spec(name)?;
        if spec.load_state == "not-found" {
            return Err(SystemdError::NoSuchUnit(format!("Unit {name} not found.")));
        }
        let after = if spec.start_result == "done" {
            "active"
        } else {
            "failed"
        };
        Ok(self.job(connection, name, spec.start_result, after).await?)
    }

    /// Queues a job for `unit`: when it ends the unit is `after`, then JobRemoved says `result`.
    async fn job(
        self: &Arc<Self>,
        connection: &Connection,
        unit: &str,
        result: &'static str,
        after: &'static str,
    ) -> zbus::Result<OwnedObjectPath> {
        let id = self.next_job.fetch_add(1, Ordering::SeqCst);
        let job = OwnedObjectPath::try_from(format!("{MANAGER_PATH}/job/{id}"))?;
        let timing = *self.timing.lock().unwrap();
        let finish = {
            let shared = self.clone();
            let connection = connection.clone();
            let unit = unit.to_string();
            let job = job.clone();
            async move {
                set_active_state(&shared, &connection, &unit, after).await?;
                if shared.subscribed.load(Ordering::SeqCst) {
                    let emitter = SignalEmitter::new(&connection, MANAGER_PATH)?;
                    Manager::job_removed(&emitter, id, job.as_ref(), &unit, result).await?;
                }
                zbus::Result::Ok(())
            }
        };
        match timing {
            JobTiming::BeforeReply => finish.await?,
            JobTiming::After(delay) => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(err) = finish.await {
                        panic!("the fake systemd could not end a job: {err}");
                    }
                });
            }
        }
        Ok(job)
    }
}

async fn set_active_state(
    shared: &Shared,
    connection: &Connection,
    unit: &str,
    state: &'static str,
) -> zbus::Result<()> {
    if let Some(spec) = shared.specs.lock().unwrap().get_mut(unit) {
        spec.active_state = state;
    }
    let iface = connection
        .object_server()
        .interface::<_, Unit>(unit_path(unit))
        .await?;
    let changed = {
        let mut object = iface.get_mut().await;
        let changed = object.active_state != state;
        object.active_state = state.to_string();
        changed
    };
    if changed && shared.subscribed.load(Ordering::SeqCst) {
        iface
            .get()
            .await
            .active_state_changed(iface.signal_emitter())
            .await?;
    }
    Ok(())
}

struct Unit {
    id: String,
    load_state: String,
    active_state: String,
}

#[interface(name = "org.freedesktop.systemd1.Unit")]
impl Unit {
    #[zbus(property)]
    fn id(&self) -> &str {
        &self.id
    }
    #[zbus(property)]
    fn load_state(&self) -> &str {
        &self.load_state
    }
    #[zbus(property)]
    fn active_state(&self) -> &str {
        &self.active_state
    }
}

/// The fake user manager, serving while it lives.
pub struct FakeSystemd {
    connection: Connection,
    shared: Arc<Shared>,
}

impl FakeSystemd {
    /// Serves the manager and the `units` on the bus at `address`, then takes the name.
    pub async fn start(
        address: &str,
        units: &[(&str, UnitSpec)],
        timing: JobTiming,
    ) -> zbus::Result<FakeSystemd> {
        let shared = Arc::new(Shared {
            specs: Mutex::new(
                units
                    .iter()
                    .map(|(name, spec)| (name.to_string(), spec.clone()))
                    .collect(),
            ),
            calls: watch::channel(Vec::new()).0,
            subscribed: AtomicBool::new(false),
            next_job: AtomicU32::new(1),
            timing: Mutex::new(timing),
        });
        let mut builder = connection::Builder::address(address)?
            .serve_at(MANAGER_PATH, Manager(shared.clone()))?;
        for (name, spec) in units {
            let unit = Unit {
                id: name.to_string(),
                load_state: spec.load_state.to_string(),
                active_state: spec.active_state.to_string(),
            };
            builder = builder.serve_at(unit_path(name), unit)?;
        }
        let connection = builder.name(SYSTEMD_NAME)?.build().await?;
        Ok(FakeSystemd { connection, shared })
    }

    /// Every recorded call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.borrow().clone()
    }

    /// The start and stop jobs so far.
    pub fn jobs(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| !matches!(c, Call::SetEnvironment(_)))
            .collect()
    }

    /// Waits until `n` start or stop jobs were sent, and returns them.
    pub async fn wait_for_jobs(&self, n: usize) -> Vec<Call> {
        let mut calls = self.shared.calls.subscribe();
        calls
            .wait_for(|calls| {
                calls
                    .iter()
                    .filter(|c| !matches!(c, Call::SetEnvironment(_)))
                    .count()
                    >= n
            })
            .await
            .expect("the fake systemd lives as long as the test");
        self.jobs()
    }

    /// Whether a client called `Subscribe()`.
    pub fn subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::SeqCst)
    }

    /// Changes a unit's ActiveState as someone else (`systemctl --user start`) would.
    pub async fn set_active_state(&self, unit: &str, state: &'static str) -> zbus::Result<()> {
        set_active_state(&self.shared, &self.connection, unit, state).await
    }
}
