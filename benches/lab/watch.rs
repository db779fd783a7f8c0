//! Timestamps of state changes, taken by signal rather than by polling. A watcher is this bench
//! binary run again with `watch-units` (as the test user: root cannot connect to the user's
//! session bus) or `watch-nm` (as root, on the lab's system bus). It subscribes on D-Bus and
//! prints one line per change, `<CLOCK_MONOTONIC ns> <key> <value>`, where key is a unit name
//! (value: its new ActiveState) or `nm-state` (value: NetworkManager's new State). The bench reads
//! the lines back from the watcher's log ([`Events`]); CLOCK_MONOTONIC is one clock for every
//! process, so they compare with [`mono_ns`] taken by the bench right before its command.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::zvariant::Value;
use zbus::{Connection, MatchRule, MessageStream};

use reachd_testkit::lab::{dir, io_err, Lab, LAB_CGROUP, SYSTEM_BUS, T};
use reachd_testkit::process::{wait_until, Daemon, Spawn};

const UNIT_PATHS: &str = "/org/freedesktop/systemd1/unit";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The watcher process's main: `watch-units` or `watch-nm`.
pub fn main(kind: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("watcher: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match kind {
            "watch-units" => units().await,
            _ => nm().await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watcher {kind}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Subscribes to PropertiesChanged under `paths` (before the caller reads the current state, so
/// that no change falls in between); [`print_changes`] then reports them.
async fn changes(bus: &Connection, paths: &'static str) -> zbus::Result<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace(paths)?
        .build();
    MessageStream::for_match_rule(rule, bus, Some(4096)).await
}

/// Prints `<ns> <key> <value>` for each change of `property` of `interface`, the key named after
/// the object's path by `key` (`None`: not watched), until the bus goes away.
async fn print_changes(
    mut changes: MessageStream,
    interface: &str,
    property: &str,
    key: impl Fn(&str) -> Option<String>,
) -> zbus::Result<()> {
    println!("{} ready -", mono_ns());
    while let Some(msg) = changes.next().await {
        let at = mono_ns();
        let msg = msg?;
        let Some(key) = msg.header().path().and_then(|p| key(p.as_str())) else {
            continue;
        };
        let body = msg.body();
        let Ok((changed_interface, changed, _)) =
            body.deserialize::<(&str, HashMap<&str, Value>, Vec<&str>)>()
        else {
            continue;
        };
        let value = match changed.get(property) {
            _ if changed_interface != interface => continue,
            Some(Value::Str(s)) => s.to_string(),
            Some(Value::U32(n)) => n.to_string(),
            _ => continue,
        };
        println!("{at} {key} {value}");
    }
    Err(zbus::Error::Failure("the bus went away".into()))
}

/// Every unit's ActiveState changes, from the user manager (on the session bus of
/// DBUS_SESSION_BUS_ADDRESS), keyed by the unit's name.
async fn units() -> zbus::Result<()> {
    let bus = Connection::session().await?;
    let stream = changes(&bus, UNIT_PATHS).await?;
    // systemd sends unit signals only while some client has subscribed (reachd may not run).
    bus.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "Subscribe",
        &(),
    )
    .await?;
    print_changes(
        stream,
        "org.freedesktop.systemd1.Unit",
        "ActiveState",
        unit_name,
    )
    .await
}

/// NetworkManager's State changes, on the lab's system bus, keyed `nm-state`.
async fn nm() -> zbus::Result<()> {
    let bus = zbus::connection::Builder::address(format!("unix:path={SYSTEM_BUS}").as_str())?
        .build()
        .await?;
    let stream = changes(&bus, NM_PATH).await?;
    let state: u32 = bus
        .call_method(
            Some("org.freedesktop.NetworkManager"),
            NM_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("org.freedesktop.NetworkManager", "State"),
        )
        .await?
        .body()
        .deserialize::<Value>()?
        .downcast()?;
    println!("{} nm-state {state}", mono_ns());
    let key = |path: &str| (path == NM_PATH).then(|| "nm-state".to_string());
    print_changes(stream, "org.freedesktop.NetworkManager", "State", key).await
}

/// `rpi_2daccessible_2etarget` (the last element of a unit's object path) -> the unit's name.
fn unit_name(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATHS)?.strip_prefix('/')?;
    let bytes = label.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One line of a watcher.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: u64,
    pub key: String,
    pub value: String,
}

/// A running watcher and what it printed so far.
pub struct Events {
    _watcher: Daemon,
    log: PathBuf,
    read: usize,
    seen: Vec<Event>,
}

impl Events {
    /// Starts the user-side watcher (every unit's ActiveState) as the test user.
    pub fn units(lab: &Lab) -> Result<Events, String> {
        let spawn = lab.user().cmd(&watcher_binary()?.to_string_lossy());
        Events::start(lab, spawn.arg("watch-units"), "watch-units")
    }

    /// Starts the NetworkManager watcher, as root.
    pub fn nm(lab: &Lab) -> Result<Events, String> {
        let spawn = Spawn::new(watcher_binary()?).arg("watch-nm");
        Events::start(lab, spawn, "watch-nm")
    }

    fn start(lab: &Lab, spawn: Spawn, name: &str) -> Result<Events, String> {
        let log = Lab::log(&format!("{name}.log"));
        let watcher = spawn
            .cgroup(LAB_CGROUP)
            .start(name, &log, Some(&lab.tracker))
            .map_err(|e| io_err(format!("starting {name}"), e))?;
        let mut events = Events {
            _watcher: watcher,
            log,
            read: 0,
            seen: Vec::new(),
        };
        wait_until(T, &format!("the {name} watcher"), || {
            events.refresh();
            if events.seen.iter().any(|e| e.key == "ready") {
                Ok(Some(()))
            } else {
                Err(fs::read_to_string(&events.log).unwrap_or_default())
            }
        })?;
        Ok(events)
    }

    /// Reads the lines the watcher added since the last call.
    fn refresh(&mut self) {
        let Ok(text) = fs::read(&self.log) else {
            return;
        };
        let Some(new) = text.get(self.read..) else {
            return;
        };
        let Some(end) = new.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        self.read += end + 1;
        for line in String::from_utf8_lossy(&new[..end]).lines() {
            let mut parts = line.split_whitespace();
            let (Some(at), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Ok(at) = at.parse() {
                self.seen.push(Event {
                    at,
                    key: key.into(),
                    value: value.into(),
                });
            }
        }
    }

    /// The time of the first change at or after `since` that `matches`, waiting for it until
    /// CLOCK_MONOTONIC `deadline`; `None` if none came by then.
    pub fn first(
        &mut self,
        since: u64,
        deadline: u64,
        matches: impl Fn(&Event) -> bool,
    ) -> Option<u64> {
        loop {
            self.refresh();
            let found = self
                .seen
                .iter()
                .find(|e| e.at >= since && matches(e))
                .map(|e| e.at);
            // A change stamped before the deadline may still be on its way: look once more.
            if found.is_some() || mono_ns() > deadline + 50_000_000 {
                return found.filter(|&at| at <= deadline);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// When every unit in `units` had reached `state` at least once since `since` (the last of
    /// them), waiting until `deadline`; `None` if some had not by then.
    pub fn all(&mut self, since: u64, deadline: u64, units: &[String], state: &str) -> Option<u64> {
        let mut last = since;
        for unit in units {
            let at = self.first(since, deadline, |e| &e.key == unit && e.value == state)?;
            last = last.max(at);
        }
        Some(last)
    }
}

/// The bench binary, copied where the test user can run it (the build tree may be private).
fn watcher_binary() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir().join("bin/reachd-bench");
    if !bin.exists() {
        let me = std::env::current_exe().map_err(|e| io_err("the bench binary", e))?;
        fs::create_dir_all(dir().join("bin")).map_err(|e| io_err("bin", e))?;
        fs::copy(&me, &bin).map_err(|e| io_err(format!("copying {}", me.display()), e))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err(bin.display(), e))?;
    }
    Ok(bin)
}
