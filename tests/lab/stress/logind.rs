//! logind on the lab's system bus, as python3-dbusmock's `logind` template plays it: the lab
//! has no logind (no systemd as PID 1), and suspending the machine is out of the question, so
//! the mock emits `PrepareForSleep` on demand and keeps the inhibitors it hands out in a list
//! (`ListInhibitors`), dropping one when its file descriptor is closed. It is started and
//! stopped by PID, in the lab's cgroup, so a run that dies leaves nothing behind.

use std::time::Duration;

use serde_json::Value;

use reachd_testkit::lab::{Lab, SYSTEM_BUS, T};
use reachd_testkit::process::{wait_until, Daemon, Spawn};

/// Debian's interpreter: python3-dbusmock installs into its dist-packages, which a python3
/// found earlier on PATH (a pyenv, a venv) does not see.
const PYTHON: &str = "/usr/bin/python3";
const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";

pub struct LogindMock {
    daemon: Daemon,
}

impl LogindMock {
    /// Starts the mock, owning `org.freedesktop.login1` on the lab's system bus, and waits until
    /// it answers. Fails naming the package when python3-dbusmock is missing.
    pub fn start(lab: &Lab) -> Result<LogindMock, String> {
        let present = Spawn::new(PYTHON)
            .args(["-c", "import dbusmock"])
            .run(T)
            .is_ok_and(|o| o.success());
        if !present {
            return Err(format!(
                "{PYTHON} cannot import dbusmock: install the Debian package python3-dbusmock"
            ));
        }
        let daemon = lab.daemon(
            "logind-mock",
            Spawn::new(PYTHON)
                .args(["-m", "dbusmock", "--system", "--template", "logind"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", format!("unix:path={SYSTEM_BUS}")),
        )?;
        let mock = LogindMock { daemon };
        wait_until(T, "the logind mock on the system bus", || {
            mock.inhibitors().map(|_| Some(()))
        })?;
        Ok(mock)
    }

    /// Emits `PrepareForSleep(start)` from logind's name, as logind does before sleeping
    /// (`true`) and after waking (`false`).
    pub fn prepare_for_sleep(&self, start: bool) -> Result<(), String> {
        self.call(
            "org.freedesktop.DBus.Mock",
            "EmitSignal",
            &[
                "sssav",
                "org.freedesktop.login1.Manager",
                "PrepareForSleep",
                "b",
                "1",
                "b",
                if start { "true" } else { "false" },
            ],
        )
        .map(drop)
    }

    /// How many "delay" sleep inhibitors reachd holds: the template drops one from its list as
    /// soon as the holder closes the file descriptor.
    pub fn held_by_reachd(&self) -> Result<usize, String> {
        Ok(self
            .inhibitors()?
            .iter()
            .filter(|i| i[0] == "sleep" && i[1] == "reachd" && i[3] == "delay")
            .count())
    }

    /// `ListInhibitors`: (what, who, why, mode, uid, pid) each.
    fn inhibitors(&self) -> Result<Vec<Value>, String> {
        let reply = self.call("org.freedesktop.login1.Manager", "ListInhibitors", &[])?;
        reply["data"][0]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("ListInhibitors replied {reply}"))
    }

    fn call(&self, interface: &str, method: &str, args: &[&str]) -> Result<Value, String> {
        let out = Spawn::new("busctl")
            .args(["--system", "--json=short", "call", LOGIN1, LOGIN1_PATH])
            .args([interface, method])
            .args(args)
            .ok(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        if out.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("busctl call {method} printed {:?}: {e}", out.stdout))
    }

    /// Stops the mock by its PID.
    pub fn stop(mut self) {
        self.daemon.stop();
    }
}
