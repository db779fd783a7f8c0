//! reachd's off-switch for remote builds against the real nix-daemon (Debian's nix-bin, Nix
//! 2.8): the `builders =` line of reachd's nix.conf fragment is the one value of `builders` a
//! daemon takes from a user it does not trust, and with it the daemon builds locally at once
//! instead of waiting for a builder that is not there. Each test runs a nix-daemon on a chroot
//! store in a temp dir, with its own nix.conf (`trusted-users =`: even root's client is
//! untrusted, as a laptop user is) and `NIX_SSHOPTS` aimed at a port the test holds on
//! 127.0.0.1, which accepts connections, counts them and never answers: a builder whose sshd
//! froze. The client is `nix-build` through the daemon's socket, with only a user nix.conf that
//! includes the fragment, as the user's does.
//!
//! Needs root and nix-bin (`apt-get install nix-bin`): it fails, never skips, without them.
//! Every command runs under a time limit and every daemon is stopped by PID when its test ends.

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reachd::cache::fragment::Fragment;
use reachd_testkit::nix::{require_root_and_nix, wait_for_daemon};
use reachd_testkit::process::{Daemon, Output, Spawn};
use tempfile::TempDir;

/// The longest one Nix command may take.
const COMMAND: Duration = Duration::from_secs(60);
/// How long ssh waits for the builder (TCP connect and banner exchange) before it gives up.
const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Why these tests need root and Nix, for the message when either is missing.
const NEEDS: &str = "the Nix builders tests start a nix-daemon on chroot stores";

/// A port on 127.0.0.1 that accepts connections, counts them, holds them open and never sends a
/// byte: what ssh meets at a host whose sshd hangs. Stopped (and its connections closed) when
/// dropped.
struct FrozenSshd {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FrozenSshd {
    fn start() -> FrozenSshd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        // Polled, so that the thread notices `stop`.
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (connections, stop) = (connections.clone(), stop.clone());
            thread::spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            held.push(stream);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("accept on 127.0.0.1:{port}: {e}"),
                    }
                }
            })
        };
        FrozenSshd {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FrozenSshd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The builder line that names the frozen sshd (its port comes from `NIX_SSHOPTS`).
const FROZEN_BUILDER: &str = "ssh://root@127.0.0.1 - - 1 1 - - -";

/// A temp dir with a nix-daemon on a chroot store, the frozen sshd its builder would reach, and
/// the client's configuration: `run/` the user's runtime directory (reachd's fragment), `home/`
/// the user's nix.conf, `client-etc/` an empty system nix.conf directory.
struct Rig {
    dir: TempDir,
    sshd: FrozenSshd,
    /// Stopped by PID when the rig is dropped.
    _daemon: Daemon,
}

impl Rig {
    /// Starts a daemon whose own nix.conf has `builders = {daemon_builders}` and trusts no user.
    fn new(daemon_builders: &str) -> Rig {
        require_root_and_nix(NEEDS);
        let dir = tempfile::Builder::new()
            .prefix("reachd-nix-builders-")
            .tempdir()
            .expect("temp dir");
        let t = dir.path();
        for sub in ["daemon-etc", "client-etc", "home", "run", "state"] {
            fs::create_dir(t.join(sub)).expect("mkdir");
        }
        // A chroot store builds in a sandbox whatever `sandbox` says: /bin/sh and its
        // libraries must be in it. The client cannot set any of this: it is not trusted.
        let conf = format!(
            "sandbox = false\nbuild-users-group =\nsubstituters =\n\
             extra-sandbox-paths = /bin /usr /lib /lib64\ntrusted-users =\n\
             builders = {daemon_builders}\n"
        );
        fs::write(t.join("daemon-etc/nix.conf"), conf).expect("daemon nix.conf");

        let sshd = FrozenSshd::start();
        let socket = t.join("daemon.sock");
        // The build hook inherits the daemon's environment, so NIX_SSHOPTS reaches its ssh.
        // `-F /dev/null`: root's own ssh config plays no part.
        let ssh_options = format!(
            "-F /dev/null -p {} -o ConnectTimeout={} -o BatchMode=yes \
             -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            sshd.port,
            SSH_CONNECT_TIMEOUT.as_secs()
        );
        let log = t.join("daemon.log");
        let daemon = Spawn::new("nix-daemon")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("NIX_CONF_DIR", t.join("daemon-etc"))
            // Nothing under /nix/var is touched (the store's own state is inside its root).
            .env("NIX_STATE_DIR", t.join("state"))
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .env("NIX_SSHOPTS", ssh_options)
            .args(["--option", "store"])
            .arg(format!("local?root={}", t.join("store").display()))
            .start("nix-daemon (builders)", &log, None)
            .expect("start nix-daemon");
        wait_for_daemon(&socket, &log, Duration::from_secs(20));
        Rig {
            dir,
            sshd,
            _daemon: daemon,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// reachd's fragment in the user's runtime directory.
    fn fragment(&self) -> Fragment {
        Fragment::in_runtime_dir(&self.path("run"))
    }

    /// The user's nix.conf: it includes `fragment`, then has `extra` lines.
    fn write_user_conf(&self, fragment: &Fragment, extra: &str) {
        let conf = format!("!include {}\n{extra}", fragment.path().display());
        fs::write(self.path("home/nix.conf"), conf).expect("user nix.conf");
    }

    /// `nix-build` as the user runs it: through the daemon's socket, with the user's nix.conf
    /// and no system nix.conf, building a derivation nobody built before (`nonce` in its name
    /// and output).
    fn nix_build(&self, nonce: &str) -> Spawn {
        let expression = format!(
            "derivation {{ name = \"b-{nonce}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo {nonce} > $out\" ]; }}"
        );
        let file = self.path(&format!("{nonce}.nix"));
        fs::write(&file, expression).expect("write the derivation");
        Spawn::new("nix-build")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.path("home"))
            .env("NIX_CONF_DIR", self.path("client-etc"))
            .env("NIX_STATE_DIR", self.path("state"))
            .env("NIX_USER_CONF_FILES", self.path("home/nix.conf"))
            .env(
                "NIX_REMOTE",
                format!("unix://{}", self.path("daemon.sock").display()),
            )
            .arg("--no-out-link")
            .arg(file)
    }

    /// Runs `build` and requires that it built `nonce`'s derivation; returns its output and how
    /// long it took.
    fn built(&self, build: Spawn, nonce: &str) -> (Output, Duration) {
        let display = build.display().to_string();
        let start = Instant::now();
        let out = build.run(COMMAND).unwrap_or_else(|e| panic!("{e}"));
        let took = start.elapsed();
        assert!(
            out.success(),
            "`{display}` failed ({}): {}",
            out.status,
            out.stderr
        );
        let store_path = out.stdout.trim();
        let content = fs::read_to_string(self.path(&format!("store{store_path}")))
            .unwrap_or_else(|e| panic!("the output {store_path} in the chroot store: {e}"));
        assert_eq!(content.trim(), nonce, "{store_path}");
        (out, took)
    }
}

/// A name no earlier build used, so that Nix has to build it.
fn nonce(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{what}-{nanos}")
}

/// Away: with the fragment's `builders =`, the daemon never tries its builder and builds at
/// once, though its own nix.conf names one that would hang.
#[test]
fn the_fragment_switches_the_daemons_builders_off() {
    let rig = Rig::new(FROZEN_BUILDER);
    let mut fragment = rig.fragment();
    fragment.set(&[], true).expect("write the fragment");
    rig.write_user_conf(&fragment, "");
    let nonce = nonce("away");
    let (_, took) = rig.built(rig.nix_build(&nonce), &nonce);
    eprintln!("away (builders off): built locally in {took:.2?}");
    assert_eq!(
        rig.sshd.connections(),
        0,
        "the daemon's build hook tried its builder although the fragment says `builders =`"
    );
    assert!(
        took < SSH_CONNECT_TIMEOUT,
        "the build took {took:.2?}: no quicker than waiting for the builder ({SSH_CONNECT_TIMEOUT:?})"
    );
}

/// Home: without the switch the daemon's own list applies, so the hook tries the builder (the
/// test above would see it). Nix 2.8 gives up on it when ssh does (after ConnectTimeout: "timed
/// out during banner exchange"), declines, and builds locally: the build succeeds, late.
#[test]
fn without_the_switch_the_daemon_tries_its_builder() {
    let rig = Rig::new(FROZEN_BUILDER);
    let mut fragment = rig.fragment();
    fragment.set(&[], false).expect("write the fragment");
    rig.write_user_conf(&fragment, "");
    let nonce = nonce("home");
    let (out, took) = rig.built(rig.nix_build(&nonce), &nonce);
    eprintln!("home (daemon's builders): built locally after ssh gave up, in {took:.2?}");
    assert!(
        rig.sshd.connections() >= 1,
        "the daemon's build hook never tried its builder: {}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("cannot build on 'ssh://root@127.0.0.1'"),
        "no word of the builder it gave up on: {}",
        out.stderr
    );
    assert!(
        took >= SSH_CONNECT_TIMEOUT,
        "the build took {took:.2?}, less than ssh's ConnectTimeout ({SSH_CONNECT_TIMEOUT:?})"
    );
}

/// One way a user names a builder of their own.
struct Way {
    name: &'static str,
    /// Lines of the user's nix.conf.
    user_conf: String,
    nix_config: Option<String>,
    args: &'static [&'static str],
}

/// The daemon takes no builder from a user it does not trust, whichever way the user names
/// it, and no trust either: its own empty list stands, and it builds locally.
#[test]
fn a_user_cannot_add_a_builder_the_daemon_does_not_list() {
    let rig = Rig::new("");
    let mut fragment = rig.fragment();
    fragment.set(&[], false).expect("write the fragment");
    let ways = [
        Way {
            name: "user-conf",
            user_conf: format!("builders = {FROZEN_BUILDER}\n"),
            nix_config: None,
            args: &[],
        },
        Way {
            name: "nix-config",
            user_conf: String::new(),
            nix_config: Some(format!("builders = {FROZEN_BUILDER}")),
            args: &[],
        },
        Way {
            name: "command-line",
            user_conf: String::new(),
            nix_config: None,
            args: &[
                "--builders",
                FROZEN_BUILDER,
                "--option",
                "trusted-users",
                "root",
            ],
        },
    ];
    for way in ways {
        rig.write_user_conf(&fragment, &way.user_conf);
        let nonce = nonce(way.name);
        // Debug output: Nix 2.8 says at debug level which client settings it ignores.
        let mut build = rig.nix_build(&nonce).args(way.args).arg("-vvvvv");
        if let Some(config) = &way.nix_config {
            build = build.env("NIX_CONFIG", config);
        }
        let (out, took) = rig.built(build, &nonce);
        eprintln!(
            "{}: the user's builder ignored, built locally in {took:.2?}",
            way.name
        );
        let refusals: Vec<String> = out
            .stderr
            .lines()
            .map(str::to_lowercase)
            .filter(|line| line.contains("client-specified setting"))
            .collect();
        // "Ignoring" (a warning) from Nix 2.26 on.
        let refused = |setting: &str| {
            let said = format!(
                "ignoring the client-specified setting '{setting}', because it is a restricted \
                 setting and you are not a trusted user"
            );
            refusals.iter().any(|line| line.contains(&said))
        };
        assert!(
            refused("builders"),
            "{}: the daemon did not refuse the user's builders (does it trust root?); what it \
             said of client settings: {refusals:?}",
            way.name
        );
        if way.args.contains(&"trusted-users") {
            assert!(
                refused("trusted-users"),
                "the daemon did not refuse the user's trusted-users: {refusals:?}"
            );
        }
        assert_eq!(
            rig.sshd.connections(),
            0,
            "{}: the daemon tried a builder only the user named",
            way.name
        );
    }
}
