//! A private `dbus-daemon` per test, listening on a socket in a temporary directory, so that the
//! agent and the fakes never touch the machine's real buses, tests run in parallel, and a test
//! can kill a bus to see how the agent takes it. The daemon is killed by its PID when the guard
//! is dropped, also when the test fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use tempfile::TempDir;

/// Anyone (the test runs as one user) may own any name and talk to anyone.
const CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=SOCKET</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#;

/// A running private bus; dropping it kills the daemon.
pub struct PrivateBus {
    child: Option<Child>,
    address: String,
    _dir: TempDir,
}

impl PrivateBus {
    /// Starts a daemon and returns once it listens. `role` only names the temp directory.
    pub fn start(role: &str) -> PrivateBus {
        let dir = tempfile::Builder::new()
            .prefix(&format!("reachd-test-{role}-bus-"))
            .tempdir()
            .expect("cannot create a temporary directory for a private bus");
        let socket = dir.path().join("socket");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            CONFIG.replace("SOCKET", &socket.display().to_string()),
        )
        .expect("cannot write the private bus configuration");
        let mut bus = PrivateBus {
            child: None,
            address: String::new(),
            _dir: dir,
        };
        bus.spawn();
        bus
    }

    /// Kills the daemon and starts a new one on the same socket, as when the machine's bus is
    /// restarted: every connection breaks, and clients that connect again find a new bus.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self._dir.path().join("socket"));
        self.spawn();
    }

    /// The address without the server's GUID, as a well-known bus's address is given (a client
    /// checks the GUID when there is one, and a restarted bus has another).
    pub fn path_address(&self) -> String {
        self.address
            .split(',')
            .filter(|part| !part.starts_with("guid="))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self) {
        let config = self._dir.path().join("bus.conf");
        let spawned = Command::new("dbus-daemon")
            .arg("--nofork")
            .arg("--nopidfile")
            .arg(format!("--config-file={}", config.display()))
            .arg("--print-address=1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                panic!("dbus-daemon is not installed: install the Debian package dbus ({err})")
            }
            Err(err) => panic!("cannot start dbus-daemon: {err}"),
        };
        // The daemon prints its address once it listens. Read it on a thread so that a daemon
        // that never prints fails the test instead of hanging it.
        // Its complaints (e.g. it cannot raise its fd limit) are kept for a failure's message.
        let stderr = child.stderr.take().expect("stderr is piped");
        let complaints = Arc::new(Mutex::new(String::new()));
        let sink = complaints.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(line)) if !line.trim().is_empty() => self.address = line.trim().to_string(),
            other => panic!(
                "dbus-daemon printed no address ({other:?}); it said: {}",
                complaints.lock().unwrap_or_else(PoisonError::into_inner)
            ),
        }
    }

    /// The D-Bus address to connect to (`unix:path=…,guid=…`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Kills the daemon now: every connection to it breaks.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.kill();
    }
}
