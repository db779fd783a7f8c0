//! reachd's Nix binary cache against real Nix (Debian's nix-bin, Nix 2.8): a "pi" store with
//! signed paths, served by a real `nix-daemon` on a socket; the cache server in-process on
//! 127.0.0.1, reaching the pi store only through that socket; and a separate "laptop" store
//! that substitutes from the cache with signatures checked, as the laptop's Nix would.
//!
//! Needs root and nix-bin (`apt-get install nix-bin`): it fails, never skips, without them.
//! Every test runs under a time limit and every command under its own, so nothing hangs; every
//! daemon is stopped by PID when its test ends. The chroot-store trick (`local?root=`) is used
//! only to set up the two stores themselves.
//!
//! The throughput measurement in docs/nix-cache.md is the ignored test `throughput` here:
//! `cargo test --release --test nix_cache -- --ignored --nocapture throughput`.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reachd::cache::daemon::{self as nix_daemon, DaemonError};
use reachd::cache::hearing::Hearing;
use reachd::cache::pool::connect_heard;
use reachd::cache::server::{self as cache, CacheSettings};
use reachd_testkit::nix::{require_root_and_nix, wait_for_daemon};
use reachd_testkit::process::{Daemon, Output, Spawn};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The longest one test may take.
const LIMIT: Duration = Duration::from_secs(180);
/// The longest one command may take.
const COMMAND: Duration = Duration::from_secs(120);
/// What the tests give the cache for each request's dealings with the daemon.
const DEADLINE: Duration = Duration::from_secs(1);
/// How much later than the deadline a 503 may come.
const MARGIN: Duration = Duration::from_millis(500);

/// Runs `body` on a multi-threaded runtime (the cache serves while commands run) within LIMIT.
fn run_test(body: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(LIMIT, body)
            .await
            .unwrap_or_else(|_| panic!("the test took over {LIMIT:?}"));
    });
}

/// The store paths the pi store holds. Built paths are input-addressed: Nix accepts them from a
/// substituter only with a trusted signature. Added ones are content-addressed: Nix checks
/// their content address instead, and needs no signature.
struct Paths {
    /// Added (content-addressed), signed.
    small: String,
    /// Built: a file, an executable, a symlink, an empty file, nested directories; signed.
    tree: String,
    /// Built: 10 MiB of random bytes; signed.
    big: String,
    /// Built, refers to `dep`; signed.
    with_ref: String,
    /// `builtins.toFile` (content-addressed), signed.
    dep: String,
    /// Built, not signed.
    unsigned: String,
    /// Added (content-addressed), not signed.
    unsigned_ca: String,
}

impl Paths {
    fn signed(&self) -> [&str; 5] {
        [
            &self.small,
            &self.tree,
            &self.big,
            &self.with_ref,
            &self.dep,
        ]
    }
}

/// Derivations that need no nixpkgs: the builder is the machine's /bin/sh (no sandbox).
const DERIVATIONS: &str = r#"
let
  sh = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script) ];
  };
  dep = builtins.toFile "dep" "the dependency
";
in {
  tree = sh "tree" ''
    mkdir -p $out/a/b
    echo nested > $out/a/b/file
    printf '#!/bin/sh
echo hi
' > $out/run.sh
    chmod +x $out/run.sh
    ln -s a/b/file $out/link
    : > $out/empty
  '';
  big = sh "big" "head -c 10485760 /dev/urandom > $out";
  withref = sh "withref" "echo ${dep} > $out";
  unsigned = sh "unsigned" "echo nobody signed this > $out";
}
"#;

/// A temp dir with Nix's config kept inside it, the pi store and its daemon.
struct Lab {
    dir: TempDir,
    pi_key: String,
    paths: Paths,
    /// Stopped by PID when the lab is dropped.
    _daemon: Daemon,
}

impl Lab {
    /// Builds the pi store and starts its daemon (blocking: call it through `spawn_blocking`).
    fn new() -> Lab {
        require_root_and_nix("the Nix cache tests start a nix-daemon on chroot stores");
        let dir = tempfile::Builder::new()
            .prefix("reachd-nix-cache-")
            .tempdir()
            .expect("temp dir");
        let t = dir.path();
        for d in ["etc", "home", "src"] {
            fs::create_dir_all(t.join(d)).expect("mkdir");
        }
        let nix = |program: &str| nix_command(t, program);
        ok_sync(nix("nix-store").args([
            "--generate-binary-cache-key",
            "pi-1",
            &path_str(&t.join("pi.sec")),
            &path_str(&t.join("pi.pub")),
        ]));
        let pi_key = fs::read_to_string(t.join("pi.pub")).expect("pi.pub");

        let src = t.join("src");
        fs::write(src.join("small.txt"), "a small file\n").expect("write");
        fs::write(src.join("unsigned.txt"), "added, not signed\n").expect("write");
        fs::write(src.join("paths.nix"), DERIVATIONS).expect("write");
        let pi = path_str(&t.join("pi"));
        let add = |file: &str| -> String {
            let out = ok_sync(
                nix("nix-store")
                    .args(["--store", &pi, "--add"])
                    .arg(src.join(file)),
            );
            out.stdout.trim().to_string()
        };
        let build = |attr: &str| -> String {
            let out = ok_sync(
                nix("nix-build")
                    .args(["--store", &pi, "--no-out-link", "-A", attr])
                    .arg(src.join("paths.nix")),
            );
            out.stdout.trim().to_string()
        };
        let with_ref = build("withref");
        let refs =
            ok_sync(nix("nix-store").args(["--store", &pi, "-q", "--references", &with_ref]));
        let paths = Paths {
            small: add("small.txt"),
            tree: build("tree"),
            big: build("big"),
            dep: refs.stdout.trim().to_string(),
            with_ref,
            unsigned: build("unsigned"),
            unsigned_ca: add("unsigned.txt"),
        };
        assert!(paths.dep.ends_with("-dep"), "{}", paths.dep);
        ok_sync(
            nix("nix")
                .args(["store", "sign", "--store", &pi, "--key-file"])
                .arg(t.join("pi.sec"))
                .args(paths.signed()),
        );

        let socket = t.join("pi.sock");
        let daemon = nix("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .args(["--option", "store", &format!("local?root={pi}")])
            .start("nix-daemon (pi)", &t.join("pi-daemon.log"), None)
            .expect("start nix-daemon");
        wait_for_daemon(&socket, &t.join("pi-daemon.log"), Duration::from_secs(20));
        Lab {
            dir,
            pi_key: pi_key.trim().to_string(),
            paths,
            _daemon: daemon,
        }
    }

    fn t(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.t().join("pi.sock")
    }

    fn store(&self, name: &str) -> String {
        path_str(&self.t().join(name))
    }

    fn nix(&self, program: &str) -> Spawn {
        nix_command(self.t(), program)
    }
}

/// `program` with only the environment Nix needs here: its config inside the lab, no other
/// substituters, no sandbox, no build users.
fn nix_command(t: &Path, program: &str) -> Spawn {
    Spawn::new(program)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", t.join("home"))
        .env("NIX_CONF_DIR", t.join("etc"))
        .env(
            "NIX_CONFIG",
            "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\n\
             substituters =\nextra-sandbox-paths = /bin /usr /lib /lib64\n",
        )
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_string()
}

/// `size` bytes of a xorshift stream: incompressible, and different for each `seed`.
fn write_random(path: &Path, size: usize, seed: u64) {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut file = std::io::BufWriter::new(fs::File::create(path).expect("create"));
    let mut left = size;
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        let n = left.min(8);
        file.write_all(&bytes[..n]).expect("write");
        left -= n;
    }
    file.flush().expect("flush");
}

fn ok_sync(spawn: Spawn) -> Output {
    spawn.ok(COMMAND).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command to completion off the runtime's threads.
async fn run(spawn: Spawn) -> Output {
    tokio::task::spawn_blocking(move || spawn.run(COMMAND))
        .await
        .expect("command thread")
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn ok(spawn: Spawn) -> Output {
    tokio::task::spawn_blocking(move || ok_sync(spawn))
        .await
        .expect("command thread")
}

async fn lab() -> Lab {
    tokio::task::spawn_blocking(Lab::new)
        .await
        .expect("lab setup")
}

/// The cache server, running in this runtime until stopped.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// The agent's check of a served cache: a handshake with the daemon at `socket` within
/// `deadline`, heard as the cache hears it.
async fn check_daemon(socket: &Path, deadline: Duration) -> Result<(), DaemonError> {
    connect_heard(socket, deadline, Arc::new(Hearing::default()))
        .await
        .map(drop)
}

async fn serve(upstream: PathBuf, deadline: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = CacheSettings {
        deadline,
        ..CacheSettings::default()
    };
    let stopped = async {
        let _ = stopped.await;
    };
    let task = tokio::spawn(cache::serve(
        listener,
        upstream,
        Arc::default(),
        settings,
        stopped,
    ));
    Server { addr, stop, task }
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it; returns how long `serve` took to return.
    async fn stop(self) -> Duration {
        let start = Instant::now();
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve did not return within 10 s of shutdown")
            .expect("serve task")
            .expect("serve");
        start.elapsed()
    }
}

/// A response as read off the wire.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request on a fresh connection (`Connection: close`), read to its end.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no full reply within 30 s"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no header end in {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
    Reply {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// The NAR of `path` in `store` as Nix makes it (`nix store dump-path`; `nix-store --dump`
/// would read `/nix/store` itself, not the chroot store), through a file: it is binary.
async fn dump(lab: &Lab, store: &str, path: &str, name: &str) -> Vec<u8> {
    let file = lab.t().join(name);
    let script = "nix store dump-path --store \"$1\" \"$2\" > \"$3\"";
    ok(lab
        .nix("sh")
        .args(["-c", script, "sh", store, path])
        .arg(&file))
    .await;
    fs::read(&file).expect("read dump")
}

/// `nix-store -r path` into the laptop store `lap`, from the substituter `url` alone, trusting
/// only `key`'s signatures (and requiring them, as Nix does by default).
fn substitute(lab: &Lab, lap: &str, path: &str, url: &str, key: &str) -> Spawn {
    lab.nix("nix-store").args([
        "--store",
        lap,
        "-r",
        path,
        "--option",
        "substituters",
        url,
        "--option",
        "trusted-public-keys",
        key,
        "--option",
        "require-sigs",
        "true",
    ])
}

fn path_info_json(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// (a) Each signed path substitutes into the laptop store through the cache, with the pi's
/// signature checked, and arrives identical.
#[test]
fn signed_paths_substitute_through_the_cache() {
    run_test(async {
        let lab = lab().await;
        let server = serve(lab.socket(), DEADLINE).await;
        let lap = lab.store("lap");
        let pi = lab.store("pi");

        let info = http(server.addr, "GET", "/nix-cache-info").await;
        assert_eq!(info.status, 200);
        let text = String::from_utf8_lossy(&info.body);
        assert_eq!(
            text,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        );

        for path in [
            &lab.paths.small,
            &lab.paths.tree,
            &lab.paths.big,
            &lab.paths.with_ref,
        ] {
            ok(substitute(&lab, &lap, path, &server.url(), &lab.pi_key)).await;
            let name = hash_part(path);
            let here = dump(&lab, &lap, path, &format!("{name}.lap.nar")).await;
            let there = dump(&lab, &pi, path, &format!("{name}.pi.nar")).await;
            assert!(
                here == there,
                "{path}: the laptop's copy differs from the pi's"
            );
        }
        // with_ref brought its reference along, and every path keeps the pi's signature.
        let refs = ok(lab.nix("nix-store").args([
            "--store",
            &lap,
            "-q",
            "--references",
            &lab.paths.with_ref,
        ]))
        .await;
        assert_eq!(refs.stdout.trim(), lab.paths.dep);
        let json = ok(lab
            .nix("nix")
            .args(["path-info", "--json", "--store", &lap])
            .args(lab.paths.signed()))
        .await;
        for entry in path_info_json(&json) {
            let sigs = entry["signatures"].to_string();
            assert!(sigs.contains("pi-1:"), "{entry}");
        }
        // The 10 MiB path came through in one piece; HEAD gives the same headers, no body.
        let narinfo = http(
            server.addr,
            "GET",
            &format!("/{}.narinfo", hash_part(&lab.paths.big)),
        )
        .await;
        assert_eq!(narinfo.status, 200);
        assert_eq!(narinfo.header("content-type"), Some("text/x-nix-narinfo"));
        let text = String::from_utf8_lossy(&narinfo.body).into_owned();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("URL line");
        let size: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("NarSize: "))
            .and_then(|s| s.parse().ok())
            .expect("NarSize line");
        let head = http(server.addr, "HEAD", &format!("/{url}")).await;
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(size.to_string().as_str())
        );
        assert!(head.body.is_empty());
        let head = http(
            server.addr,
            "HEAD",
            &format!("/{}.narinfo", hash_part(&lab.paths.big)),
        )
        .await;
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(narinfo.body.len().to_string().as_str())
        );
        assert!(head.body.is_empty());
        let nar = http(server.addr, "GET", &format!("/{url}")).await;
        assert_eq!(nar.status, 200);
        assert_eq!(nar.body.len() as u64, size);

        assert!(server.stop().await < Duration::from_secs(2));
    });
}

/// (b) The cache passes signatures through and signs nothing: Nix refuses an unsigned built
/// path, and a signed one when it trusts another key; an unsigned content-addressed path is
/// accepted, because Nix checks its content address (passed through too) instead.
#[test]
fn unsigned_or_untrusted_paths_are_refused_by_nix() {
    run_test(async {
        let lab = lab().await;
        let server = serve(lab.socket(), DEADLINE).await;
        let lap = lab.store("lap");
        ok(lab
            .nix("nix-store")
            .args(["--generate-binary-cache-key", "other-1"])
            .args([lab.t().join("other.sec"), lab.t().join("other.pub")]))
        .await;
        let other_key = fs::read_to_string(lab.t().join("other.pub")).expect("other.pub");
        for (path, key) in [
            (&lab.paths.unsigned, lab.pi_key.as_str()),
            (&lab.paths.tree, other_key.trim()),
        ] {
            let out = run(substitute(&lab, &lap, path, &server.url(), key)).await;
            assert!(!out.success(), "{path} was substituted: {}", out.stderr);
            assert!(
                out.stderr.contains("is not signed by any of the keys"),
                "{path}: refused, but not for its signature: {}",
                out.stderr
            );
            let valid = run(lab
                .nix("nix-store")
                .args(["--store", &lap, "--check-validity", path]))
            .await;
            assert!(!valid.success(), "{path} is in the laptop store");
        }
        let ca = &lab.paths.unsigned_ca;
        ok(substitute(&lab, &lap, ca, &server.url(), &lab.pi_key)).await;

        // The unsigned paths' narinfo simply have no Sig line; the added one has its CA.
        for path in [&lab.paths.unsigned, ca] {
            let narinfo = http(server.addr, "GET", &format!("/{}.narinfo", hash_part(path))).await;
            assert_eq!(narinfo.status, 200);
            let text = String::from_utf8_lossy(&narinfo.body);
            assert!(!text.contains("Sig:"), "{text}");
            assert_eq!(text.contains("CA: fixed:"), path == ca, "{text}");
        }
        server.stop().await;
    });
}

/// (c) A path the pi lacks is a quick 404, and Nix takes it as "not there".
#[test]
fn missing_paths_are_404_and_nix_says_not_valid() {
    run_test(async {
        let lab = lab().await;
        let server = serve(lab.socket(), DEADLINE).await;
        let missing = "/nix/store/00000000000000000000000000000000-missing";
        let start = Instant::now();
        let reply = http(
            server.addr,
            "GET",
            "/00000000000000000000000000000000.narinfo",
        )
        .await;
        assert_eq!(reply.status, 404);
        assert!(start.elapsed() < DEADLINE, "404 took {:?}", start.elapsed());

        let out = run(lab
            .nix("nix")
            .args(["path-info", "--store", &server.url(), missing]))
        .await;
        assert!(!out.success());
        assert!(out.stderr.contains("is not valid"), "{}", out.stderr);

        // A NAR URL for a path the pi lacks, or with a NAR hash the path no longer has.
        let small = hash_part(&lab.paths.small);
        let zeros = "0".repeat(52);
        for url in [
            format!("/nar/00000000000000000000000000000000-{zeros}.nar"),
            format!("/nar/{small}-{zeros}.nar"),
        ] {
            assert_eq!(http(server.addr, "GET", &url).await.status, 404, "{url}");
        }
        server.stop().await;
    });
}

/// (d) No daemon behind the socket, or one that accepts and never answers (a half-dead
/// tunnel, a Pi that lost power): 404 ("not here"), at once or after the cache's silence
/// rule, never an error status (Nix retries those, then fails the build) and never a hang.
#[test]
fn an_unreachable_daemon_is_not_here() {
    run_test(async {
        let dir = TempDir::new().expect("temp dir");
        let hash = "d6xhxnk87bzm95j6nka4wmvynsm61imz";
        let zeros = "0".repeat(52);
        let paths = [
            format!("/{hash}.narinfo"),
            format!("/nar/{hash}-{zeros}.nar"),
        ];

        let absent = serve(dir.path().join("absent.sock"), DEADLINE).await;
        for path in &paths {
            let reply = http(absent.addr, "GET", path).await;
            assert_eq!(reply.status, 404, "{path}");
            let text = String::from_utf8_lossy(&reply.body);
            assert!(text.contains("cannot connect"), "{path}: {text}");
        }
        let err = check_daemon(&dir.path().join("absent.sock"), DEADLINE)
            .await
            .unwrap_err();
        assert!(matches!(err, DaemonError::Connect { .. }), "{err:?}");
        absent.stop().await;

        // Accepts every connection and holds it without a word. The deadline is far away:
        // the silence must end the wait, well before it.
        let silent_path = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&silent_path).expect("bind");
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let far = Duration::from_secs(60);
        let silent = serve(silent_path.clone(), far).await;
        let requests = paths.iter().map(|path| async move {
            let start = Instant::now();
            let reply = http(silent.addr, "GET", path).await;
            (path, reply, start.elapsed())
        });
        for (path, reply, took) in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, 404, "{path}");
            let text = String::from_utf8_lossy(&reply.body);
            assert!(
                took < far / 4 && text.contains("nix-daemon"),
                "{path}: 404 after {took:?}: {text}"
            );
        }
        let start = Instant::now();
        let err = check_daemon(&silent_path, DEADLINE).await.unwrap_err();
        assert!(matches!(err, DaemonError::Timeout(_)), "{err:?}");
        assert!(start.elapsed() < DEADLINE + MARGIN);
        silent.stop().await;

        // Shutdown does not wait for a request stuck on the daemon.
        let slow = serve(silent_path, far).await;
        let addr = slow.addr;
        let stuck = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let request = format!("GET /{hash}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("send");
            let mut raw = Vec::new();
            let _ = stream.read_to_end(&mut raw).await;
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let took = slow.stop().await;
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        tokio::time::timeout(Duration::from_secs(2), stuck)
            .await
            .expect("the stuck connection was not closed")
            .expect("client task");
        holder.abort();
    });
}

/// The price of "not here": Nix remembers a 404 (`narinfo-cache-negative-ttl`, an hour), so a
/// path asked for while the tunnel was down, or added to the Pi after Nix asked, stays missing
/// for that Nix user for a while, even once the cache has it. The build goes on (built, or
/// from another cache) instead of failing, as it would on an error status.
#[test]
fn nix_remembers_a_404() {
    run_test(async {
        let lab = lab().await;
        let tunnel = lab.t().join("tunnel.sock");
        let server = serve(tunnel.clone(), DEADLINE).await;
        let path_info = |path: &str| {
            lab.nix("nix")
                .args(["path-info", "--store", &server.url(), path])
        };
        let path = &lab.paths.small;
        let start = Instant::now();
        let out = run(path_info(path)).await;
        assert!(out.stderr.contains("is not valid"), "{}", out.stderr);
        println!(
            "no tunnel: nix path-info said not valid after {:?}",
            start.elapsed()
        );
        // The tunnel comes up: the cache has the path, this Nix user still does not ask.
        std::os::unix::fs::symlink(lab.socket(), &tunnel).expect("symlink");
        let narinfo = format!("/{}.narinfo", hash_part(path));
        assert_eq!(http(server.addr, "GET", &narinfo).await.status, 200);
        let out = run(path_info(path)).await;
        assert!(
            out.stderr.contains("is not valid"),
            "Nix did not remember the 404: {}",
            out.stderr
        );

        // A path that is missing (404) and then added stays missing for this Nix user.
        fs::write(lab.t().join("src/late.txt"), "added late\n").expect("write");
        let scratch = lab.store("scratch");
        let add = |store: &str| {
            lab.nix("nix-store")
                .args(["--store", store, "--add"])
                .arg(lab.t().join("src/late.txt"))
        };
        let late = ok(add(&scratch)).await.stdout.trim().to_string();
        let out = run(path_info(&late)).await;
        assert!(out.stderr.contains("is not valid"), "{}", out.stderr);
        assert_eq!(ok(add(&lab.store("pi"))).await.stdout.trim(), late);
        let narinfo = http(
            server.addr,
            "GET",
            &format!("/{}.narinfo", hash_part(&late)),
        )
        .await;
        assert_eq!(narinfo.status, 200, "the cache has it now");
        let out = run(path_info(&late)).await;
        assert!(
            out.stderr.contains("is not valid"),
            "Nix did not remember the 404: {}",
            out.stderr
        );
        server.stop().await;
    });
}

/// A unix-socket relay in front of the pi's daemon, like the ssh tunnel: once it has passed
/// `freeze_after` bytes from the daemon, it passes nothing more either way on any connection,
/// old or new, and still accepts (a Pi that lost power, an sshd stopped).
struct Relay {
    passed: AtomicU64,
    freeze_after: u64,
}

impl Relay {
    fn start(from: PathBuf, to: PathBuf, freeze_after: u64) -> (Arc<Relay>, JoinHandle<()>) {
        let relay = Arc::new(Relay {
            passed: AtomicU64::new(0),
            freeze_after,
        });
        let listener = UnixListener::bind(&from).expect("bind the relay");
        let task = tokio::spawn({
            let relay = relay.clone();
            async move {
                let mut held = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    held.spawn(relay.clone().carry(client, to.clone()));
                }
            }
        });
        (relay, task)
    }

    fn frozen(&self) -> bool {
        self.passed.load(Ordering::SeqCst) >= self.freeze_after
    }

    /// Copies `from` to `to` until either ends or the relay is frozen; counts what it passes
    /// if `counted` (the daemon's side).
    async fn pump(
        &self,
        mut from: impl AsyncReadExt + Unpin,
        mut to: impl AsyncWriteExt + Unpin,
        counted: bool,
    ) {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            if n == 0 || self.frozen() {
                break;
            }
            if counted {
                self.passed.fetch_add(n as u64, Ordering::SeqCst);
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }

    async fn carry(self: Arc<Self>, client: UnixStream, to: PathBuf) {
        let Ok(daemon) = UnixStream::connect(&to).await else {
            return;
        };
        let (client_in, client_out) = client.into_split();
        let (daemon_in, daemon_out) = daemon.into_split();
        let up = self.pump(client_in, daemon_out, false);
        let down = self.pump(daemon_in, client_out, true);
        tokio::join!(up, down);
        // Frozen: hold the client's end open and silent, as a tunnel to a dead Pi does.
        std::future::pending::<()>().await;
    }
}

/// A NAR download cut off because the Pi went silent: the cache cuts the body after its
/// silence rule, Nix resumes (the cache sent `Accept-Ranges`), the resume is answered "not
/// here", and Nix builds the derivation itself, without `--fallback`. Then a new derivation
/// builds at once: the cache is in doubt and answers "not here" without asking.
#[test]
fn a_download_cut_off_by_silence_is_built_instead() {
    run_test(async {
        let lab = lab().await;
        let relay_path = lab.t().join("relay.sock");
        let (relay, relay_task) = Relay::start(relay_path.clone(), lab.socket(), 1 << 20);
        let server = serve(relay_path, Duration::from_secs(60)).await;
        let lap = lab.store("lap");
        let build = |attr: &str, file: &Path| {
            lab.nix("nix-build")
                .args(["--store", &lap, "--no-out-link", "-A", attr])
                .arg(file)
                .args(["--option", "substituters", &server.url()])
                .args(["--option", "trusted-public-keys", &lab.pi_key])
        };
        let start = Instant::now();
        let out = run(build("big", &lab.t().join("src/paths.nix"))).await;
        let took = start.elapsed();
        assert!(out.success(), "nix-build: {}", out.stderr);
        assert!(relay.frozen(), "the download never started: {}", out.stderr);
        assert_eq!(out.stdout.trim(), lab.paths.big);
        let sigs =
            ok(lab
                .nix("nix")
                .args(["path-info", "--sigs", "--store", &lap, &lab.paths.big]))
            .await;
        assert!(
            !sigs.stdout.contains("pi-1:"),
            "not built here: {}",
            sigs.stdout
        );
        println!(
            "download cut off after 1 MiB: built locally in {took:?}: {}",
            out.stderr
        );

        let fresh = lab.t().join("src/fresh.nix");
        fs::write(
            &fresh,
            "{ x = derivation { name = \"fresh\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo fresh > $out\" ]; }; }\n",
        )
        .expect("write");
        let start = Instant::now();
        let out = run(build("x", &fresh)).await;
        assert!(out.success(), "nix-build: {}", out.stderr);
        println!(
            "then a new derivation, the Pi still silent: built in {:?}",
            start.elapsed()
        );
        server.stop().await;
        relay_task.abort();
    });
}

/// (e) Anything but the cache's own files is 4xx, decided before the daemon is asked (here
/// there is none).
#[test]
fn malformed_requests_are_4xx() {
    run_test(async {
        let dir = TempDir::new().expect("temp dir");
        let server = serve(dir.path().join("absent.sock"), DEADLINE).await;
        let hash = "d6xhxnk87bzm95j6nka4wmvynsm61imz";
        let long = format!("/{}", "a".repeat(20_000));
        let cases = [
            ("GET", "/".to_string()),
            ("GET", "/nix-cache-info/".to_string()),
            ("GET", format!("/{}.narinfo", &hash[1..])),
            ("GET", format!("/{}.narinfo", hash.replace('d', "e"))),
            ("GET", format!("/{}.narinfo", hash.to_uppercase())),
            ("GET", format!("/{hash}.narinfo/")),
            ("GET", format!("/{hash}.narinfo?x=1#y")),
            ("GET", format!("/nar/{hash}.nar")),
            ("GET", format!("/nar/{hash}-xyz.nar")),
            ("GET", format!("/nar/../{hash}.narinfo")),
            ("GET", "/nar/%2e%2e/etc/passwd".to_string()),
            ("GET", "/../../etc/passwd".to_string()),
            ("GET", long),
            ("POST", "/nix-cache-info".to_string()),
            ("PUT", format!("/{hash}.narinfo")),
            ("DELETE", format!("/{hash}.narinfo")),
        ];
        for (method, path) in cases {
            let reply = http(server.addr, method, &path).await;
            // The query string is not part of the path: that one is a real lookup, which finds
            // no daemon.
            if path.contains('?') {
                assert_eq!(reply.status, 404, "{method} {path}");
                continue;
            }
            assert!(
                (400..500).contains(&reply.status),
                "{method} {}: {}",
                &path[..path.len().min(80)],
                reply.status
            );
        }
        let reply = http(server.addr, "POST", "/nix-cache-info").await;
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        // Garbage instead of HTTP: hyper answers 400 and closes.
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(b"\x00\x01\x02 nonsense\r\n\r\n")
            .await
            .expect("send");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("no answer to garbage")
            .expect("read");
        assert!(
            raw.is_empty() || raw.starts_with(b"HTTP/1.1 400"),
            "{raw:?}"
        );
        server.stop().await;
    });
}

/// (f) The daemon client against the real Nix 2.8 daemon: the handshake settles on 1.34, path
/// info equals `nix path-info --json`, and NARs equal `nix-store --dump`.
#[test]
fn the_daemon_client_agrees_with_nix() {
    run_test(async {
        let lab = lab().await;
        let pi = lab.store("pi");
        let mut daemon = nix_daemon::Daemon::connect(&lab.socket(), DEADLINE)
            .await
            .expect("connect");
        assert_eq!(daemon.protocol().to_string(), "1.34");
        assert_eq!(daemon.nix_version(), Some("2.8.0"));

        let all: Vec<&str> = lab
            .paths
            .signed()
            .into_iter()
            .chain([lab.paths.unsigned.as_str()])
            .collect();
        let json = ok(lab
            .nix("nix")
            .args(["path-info", "--json", "--store"])
            .arg(format!("unix://{}", lab.socket().display()))
            .args(&all))
        .await;
        for expected in path_info_json(&json) {
            let path = expected["path"].as_str().expect("path");
            let found = daemon
                .query_path_from_hash_part(hash_part(path), DEADLINE)
                .await
                .expect("query_path_from_hash_part");
            assert_eq!(found.as_deref(), Some(path));
            let info = daemon
                .query_path_info(path, DEADLINE)
                .await
                .expect("query_path_info")
                .expect("valid");
            let sri = expected["narHash"].as_str().expect("narHash");
            let nix32 = ok(lab.nix("nix").args(["hash", "to-base32", sri])).await;
            assert_eq!(info.nar_hash.to_nix32(), nix32.stdout.trim(), "{path}");
            assert_eq!(Some(info.nar_size), expected["narSize"].as_u64(), "{path}");
            let references: Vec<&str> = expected["references"]
                .as_array()
                .expect("references")
                .iter()
                .filter_map(|r| r.as_str())
                .collect();
            assert_eq!(info.references, references, "{path}");
            assert_eq!(
                info.deriver.as_deref(),
                expected["deriver"].as_str(),
                "{path}"
            );
            assert_eq!(
                Some(info.registration_time),
                expected["registrationTime"].as_u64(),
                "{path}"
            );
            assert_eq!(
                info.ultimate,
                expected["ultimate"].as_bool().unwrap_or(false),
                "{path}"
            );
            let sigs: Vec<&str> = expected["signatures"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            assert_eq!(info.sigs, sigs, "{path}");
            assert_eq!(info.ca.as_deref(), expected["ca"].as_str(), "{path}");
        }
        let missing = daemon
            .query_path_from_hash_part("00000000000000000000000000000000", DEADLINE)
            .await
            .expect("query");
        assert_eq!(missing, None);
        let invalid = daemon
            .query_path_info(
                "/nix/store/00000000000000000000000000000000-missing",
                DEADLINE,
            )
            .await
            .expect("query");
        assert_eq!(invalid, None);

        for path in [&lab.paths.tree, &lab.paths.big, &lab.paths.with_ref] {
            let connection = nix_daemon::Daemon::connect(&lab.socket(), DEADLINE)
                .await
                .expect("connect");
            let mut nar = connection.nar_from_path(path, DEADLINE).await.expect("nar");
            let mut got = Vec::new();
            while let Some(chunk) = nar.next_chunk().await.expect("chunk") {
                got.extend_from_slice(&chunk);
            }
            let name = hash_part(path);
            let expected = dump(&lab, &pi, path, &format!("{name}.nar")).await;
            assert!(got == expected, "{path}: NAR differs from nix-store --dump");
        }
        check_daemon(&lab.socket(), DEADLINE)
            .await
            .expect("the check's handshake");
    });
}

/// How the throughput test reads the 100 MiB path.
enum Way {
    /// `nix-store -r` into a fresh laptop store from this substituter.
    Substitute(String),
    /// `nix store dump-path` straight from the pi store to /dev/null.
    DumpPath,
    /// `curl` GETs the NAR from the cache to /dev/null.
    Curl(String),
    /// reachd's daemon client alone, the chunks discarded.
    DaemonClient,
}

/// Not a test: the figures in docs/nix-cache.md. Reads one 100 MiB path three times in each
/// way and prints the median MiB/s of each, then the cost of a `.narinfo` request and of the
/// daemon handshake each request pays for.
#[test]
#[ignore = "a measurement, run by hand: see docs/nix-cache.md"]
fn throughput() {
    run_test(async {
        let lab = lab().await;
        let server = serve(lab.socket(), Duration::from_secs(10)).await;
        let pi = lab.store("pi");
        let big = lab.t().join("src/big100.bin");
        write_random(&big, 100 * 1024 * 1024, 100);
        let add = lab
            .nix("nix-store")
            .args(["--store", &pi, "--add"])
            .arg(&big);
        let path = ok(add).await.stdout.trim().to_string();
        let sign = lab
            .nix("nix")
            .args(["store", "sign", "--store", &pi, "--key-file"]);
        ok(sign.arg(lab.t().join("pi.sec")).arg(&path)).await;
        let bc = format!("file://{}?compression=none", lab.store("bc"));
        ok(lab
            .nix("nix")
            .args(["copy", "--store", &pi, "--to", &bc, &path]))
        .await;
        // The same binary cache over HTTP from an ordinary static file server, for reference.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let _static_server = Spawn::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(lab.store("bc"))
            .start("python3 -m http.server", &lab.t().join("http.log"), None)
            .expect("python3 -m http.server");
        let static_url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "http.server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hash = hash_part(&path);
        let narinfo = http(server.addr, "GET", &format!("/{hash}.narinfo")).await;
        let narinfo = String::from_utf8_lossy(&narinfo.body).into_owned();
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("URL");
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let size = mib(fs::metadata(&big).expect("size").len());

        let ways = [
            ("reachd cache, nix-store -r", Way::Substitute(server.url())),
            ("nix store dump-path > /dev/null", Way::DumpPath),
            ("file:// cache, nix-store -r", Way::Substitute(bc.clone())),
            (
                "file:// cache over python3 http.server, nix-store -r",
                Way::Substitute(static_url),
            ),
            (
                "reachd cache, curl of the NAR",
                Way::Curl(format!("{}/{url}", server.url())),
            ),
            ("daemon client alone", Way::DaemonClient),
        ];
        for (i, (what, way)) in ways.iter().enumerate() {
            let mut rates = Vec::new();
            for round in 0..3 {
                let lap = lab.store(&format!("lap-{i}-{round}"));
                let start = Instant::now();
                match way {
                    Way::Substitute(url) => {
                        ok(substitute(&lab, &lap, &path, url, &lab.pi_key)).await;
                    }
                    Way::DumpPath => {
                        let script = "nix store dump-path --store \"$1\" \"$2\" > /dev/null";
                        ok(lab.nix("sh").args(["-c", script, "sh", &pi, &path])).await;
                    }
                    Way::Curl(url) => {
                        ok(Spawn::new("curl").args(["-sSf", "-o", "/dev/null", url])).await;
                    }
                    Way::DaemonClient => {
                        let daemon = nix_daemon::Daemon::connect(&lab.socket(), DEADLINE)
                            .await
                            .expect("connect");
                        let mut nar = daemon.nar_from_path(&path, DEADLINE).await.expect("nar");
                        while nar.next_chunk().await.expect("chunk").is_some() {}
                    }
                }
                rates.push(size / start.elapsed().as_secs_f64());
                let _ = fs::remove_dir_all(&lap);
            }
            rates.sort_by(f64::total_cmp);
            let runs: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "{what}: median {:.0} MiB/s (runs: {})",
                rates[1],
                runs.join(", ")
            );
        }

        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            let reply = http(server.addr, "GET", &format!("/{hash}.narinfo")).await;
            assert_eq!(reply.status, 200);
        }
        let per_narinfo = start.elapsed() / rounds;
        let start = Instant::now();
        for _ in 0..rounds {
            check_daemon(&lab.socket(), DEADLINE)
                .await
                .expect("handshake");
        }
        let per_handshake = start.elapsed() / rounds;
        let mut daemon = nix_daemon::Daemon::connect(&lab.socket(), DEADLINE)
            .await
            .expect("connect");
        let start = Instant::now();
        for _ in 0..rounds {
            daemon
                .query_path_from_hash_part(hash, DEADLINE)
                .await
                .expect("query");
            daemon
                .query_path_info(&path, DEADLINE)
                .await
                .expect("query");
        }
        let per_queries = start.elapsed() / rounds;
        println!(
            "GET .narinfo: {per_narinfo:?} each; of which connect + handshake {per_handshake:?}, \
             the two queries on an open connection {per_queries:?}"
        );
        server.stop().await;
    });
}
