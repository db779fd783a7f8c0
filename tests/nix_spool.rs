//! The upload spool, its hook and its drain against real Nix (Debian's nix-bin): a laptop store
//! in a directory (`$T/lap`), a "Pi" store served by a real `nix-daemon` on `$T/pi.sock` that
//! does not trust the laptop's user (so it checks signatures), and the hook run the way Nix runs
//! it (by Nix itself, or as a child with only `DRV_PATH`/`OUT_PATHS`). Every Nix setting is
//! given to child processes only. Needs root (chroot stores, a daemon, a second user) and
//! nix-bin; it fails (never skips) without them.
//!
//! Figures for docs/nix-upload.md: `cargo test --release --test nix_spool -- --ignored
//! --nocapture`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use reachd::store_path::StorePath;
use reachd::upload::batch::{upload_batch, BatchReport, Failure, Limits, Nix, Scope};
use reachd::upload::spool::{Retry, Spool};
use reachd_testkit::nix::{require_root_and_nix, wait_for_daemon};
use reachd_testkit::process::{Daemon, Spawn};

const HOOK: &str = env!("CARGO_BIN_EXE_reachd-nix-upload");
const SHORT: Duration = Duration::from_secs(60);

/// Why these tests need root and Nix, for the message when either is missing.
const NEEDS: &str = "the Nix spool tests use chroot stores, a nix-daemon and a second user";

/// Runs an async test body on a runtime of its own, failing it after `limit`. (Each blocking
/// command inside has its own deadline, so the limit is always reached.)
fn run_for(limit: Duration, body: impl AsyncFnOnce()) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(limit, body())
            .await
            .unwrap_or_else(|_| panic!("the test took over {limit:?}"));
    });
}

/// A laptop store, a signing key, and a Pi store behind a daemon, in one temporary directory.
struct Stores {
    dir: tempfile::TempDir,
    pi: Option<Daemon>,
}

impl Stores {
    fn new() -> Stores {
        require_root_and_nix(NEEDS);
        let dir = tempfile::Builder::new()
            .prefix("reachd-nix-")
            .tempdir()
            .expect("temp dir");
        // Reachable by the unprivileged user of the permissions test.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["etc", "home", "pi-etc", "spool"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let stores = Stores { dir, pi: None };
        stores.ok(
            "nix-store",
            &["--generate-binary-cache-key", "lap-1", "lap.sec", "lap.pub"],
        );
        let public = fs::read_to_string(stores.path("lap.pub")).expect("public key");
        // `trusted-users =`: even root is an untrusted client, like the laptop's user, so the
        // Pi accepts only paths signed with a key it trusts.
        stores.write_pi_conf(&public, "");
        stores
    }

    /// The Pi's nix.conf: trusting the laptop's key `public`, and the users `trusted_users`.
    fn write_pi_conf(&self, public: &str, trusted_users: &str) {
        let conf = format!(
            "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\n\
             substituters =\ntrusted-users = {trusted_users}\ntrusted-public-keys = {}\n",
            public.trim()
        );
        fs::write(self.path("pi-etc/nix.conf"), conf).expect("pi nix.conf");
    }

    /// From the next start of the Pi's daemon, root's connections are trusted, as those of
    /// the example tunnel (`ssh root@` the Pi) are.
    fn trust_root_on_the_pi(&self) {
        let public = fs::read_to_string(self.path("lap.pub")).expect("public key");
        self.write_pi_conf(&public, "root");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spool_dir(&self) -> PathBuf {
        self.path("spool")
    }

    fn spool(&self) -> Spool {
        Spool::open(self.spool_dir()).expect("open spool")
    }

    /// The laptop's Nix: its own config, and `$T/lap` as the default store.
    fn env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("PATH", std::env::var_os("PATH").unwrap_or_default()),
            ("HOME", self.path("home").into()),
            ("NIX_CONF_DIR", self.path("etc").into()),
            (
                "NIX_CONFIG",
                "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\n\
                 substituters =\nextra-sandbox-paths = /bin /usr /lib /lib64"
                    .into(),
            ),
            ("NIX_REMOTE", self.path("lap").into()),
        ]
    }

    fn spawn(&self, program: &str) -> Spawn {
        let mut spawn = Spawn::new(program).env_clear().current_dir(self.dir.path());
        for (key, value) in self.env() {
            spawn = spawn.env(key, value);
        }
        spawn
    }

    /// The drain's view of Nix: the same settings, on its child commands only.
    fn nix(&self) -> Nix {
        self.env()
            .into_iter()
            .fold(Nix::default(), |nix, (key, value)| nix.env(key, value))
    }

    fn ok(&self, program: &str, args: &[&str]) -> String {
        self.spawn(program)
            .args(args)
            .ok(Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}"))
            .stdout
    }

    fn pi_uri(&self) -> String {
        format!("unix://{}", self.path("pi.sock").display())
    }

    /// Starts (or restarts, on a fresh store with `fresh`) the Pi's daemon and waits for its
    /// socket.
    fn start_pi(&mut self, store: &str) {
        self.pi = None;
        let socket = self.path("pi.sock");
        let log = self.path(&format!("{store}.log"));
        let _ = fs::remove_file(&socket);
        let daemon = Spawn::new("nix-daemon")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NIX_CONF_DIR", self.path("pi-etc"))
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .arg("--option")
            .arg("store")
            .arg(format!("local?root={}", self.path(store).display()))
            .start("pi nix-daemon", &log, None)
            .expect("start nix-daemon");
        wait_for_daemon(&socket, &log, Duration::from_secs(10));
        self.pi = Some(daemon);
    }

    /// Writes a derivation per name (no nixpkgs), instantiates and builds them, with the hook
    /// run by Nix itself when a spool is given. Returns (derivation, output) pairs.
    fn build(&self, names: &[&str], hook_spool: Option<&Path>) -> Vec<(String, String)> {
        let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let expr = format!(
            "map (n: derivation {{ name = n; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo ${{n}} > $out\" ]; }}) [ {} ]",
            list.join(" ")
        );
        fs::write(self.path("drv.nix"), expr).expect("write drv.nix");
        let drvs = self.ok("nix-instantiate", &["drv.nix"]);
        let drvs: Vec<&str> = drvs.lines().collect();
        let mut realise = self.spawn("nix-store").arg("--realise").args(&drvs);
        if let Some(spool) = hook_spool {
            realise = realise
                .args(["--option", "post-build-hook", HOOK])
                .env("REACHD_SPOOL", spool);
        }
        realise
            .ok(Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}"));
        drvs.iter()
            .map(|drv| {
                let out = self.ok("nix-store", &["--query", "--outputs", drv]);
                (drv.to_string(), out.trim().to_string())
            })
            .collect()
    }

    /// Adds `n` small files to the laptop store (content-addressed paths).
    fn add_files(&self, prefix: &str, n: usize) -> Vec<String> {
        let dir = self.path(&format!("files-{prefix}"));
        fs::create_dir(&dir).expect("mkdir");
        let mut args = Vec::new();
        for i in 0..n {
            let file = dir.join(format!("{prefix}{i}"));
            fs::write(&file, format!("payload {prefix} {i}\n")).expect("write");
            args.push(file.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let added = self.ok("nix-store", &[&["--add"], &args[..]].concat());
        let added: Vec<String> = added.lines().map(str::to_string).collect();
        assert_eq!(added.len(), n);
        added
    }

    fn sign(&self, paths: &[String]) {
        let mut args = vec!["store", "sign", "--key-file", "lap.sec"];
        args.extend(paths.iter().map(String::as_str));
        self.ok("nix", &args);
    }

    /// `Ok` if the Pi's daemon holds every path (`nix path-info --store unix://…`).
    fn on_pi(&self, paths: &[String]) -> Result<(), String> {
        let out = self
            .spawn("nix")
            .args(["path-info", "--store", &self.pi_uri()])
            .args(paths)
            .run(SHORT)
            .expect("nix path-info");
        if out.success() && out.stdout.lines().count() == paths.len() {
            Ok(())
        } else {
            Err(out.stderr)
        }
    }

    fn delete(&self, path: &str) {
        self.ok("nix-store", &["--delete", path]);
    }

    /// Runs the hook as Nix does: only the daemon's sort of environment (no HOME) plus
    /// `DRV_PATH` and `OUT_PATHS`, and `REACHD_SPOOL` for the test's spool.
    fn hook(&self, drv: Option<&str>, outs: Option<&str>) -> Output {
        hook_command(&self.spool_dir(), drv, outs)
            .output()
            .expect("run the hook")
    }
}

fn hook_command(spool: &Path, drv: Option<&str>, outs: Option<&str>) -> Command {
    let mut command = Command::new(HOOK);
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("REACHD_SPOOL", spool)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(drv) = drv {
        command.env("DRV_PATH", drv);
    }
    if let Some(outs) = outs {
        command.env("OUT_PATHS", outs);
    }
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn incoming_texts(spool: &Path) -> Vec<String> {
    let mut names: Vec<PathBuf> = fs::read_dir(spool.join("incoming"))
        .expect("list incoming")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "entry"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| fs::read_to_string(p).expect("read entry"))
        .collect()
}

fn deadline(after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + after
}

/// One batch of at most `max_paths` of host `rpi`'s queue to the Pi's store, within [`SHORT`].
async fn batch(stores: &Stores, spool: &Spool, max_paths: usize) -> BatchReport {
    let limits = Limits {
        max_paths,
        deadline: deadline(SHORT),
    };
    upload_batch(spool, "rpi", &stores.nix(), &stores.pi_uri(), limits).await
}

/// Drains `host` in batches of `max_paths` until the queue is empty; every batch must succeed.
async fn drain(stores: &Stores, spool: &Spool, max_paths: usize) -> Vec<BatchReport> {
    let mut reports = Vec::new();
    loop {
        let report = batch(stores, spool, max_paths).await;
        if let Some(failure) = &report.failure {
            panic!("batch {} failed: {}", reports.len(), failure.error);
        }
        let next = report.next_try;
        reports.push(report);
        match next {
            None => return reports,
            Some(t) if t <= SystemTime::now() => {}
            Some(t) => panic!("the queue waits until {t:?} without a failure"),
        }
        assert!(reports.len() < 10_000, "the drain does not end");
    }
}

fn nix_version() -> (u32, u32) {
    let out = Command::new("nix").arg("--version").output().expect("nix");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().last().unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn nix_runs_the_hook_after_each_build_and_the_drain_uploads_the_outputs() {
    run_for(Duration::from_secs(240), async || {
        let mut stores = Stores::new();
        let built = stores.build(&["alpha", "beta", "gamma"], Some(&stores.spool_dir()));
        let texts = incoming_texts(&stores.spool_dir());
        assert_eq!(texts.len(), 3, "{texts:?}");
        for (drv, out) in &built {
            let text = texts
                .iter()
                .find(|t| t.contains(drv.as_str()))
                .unwrap_or_else(|| panic!("no entry for {drv}: {texts:?}"));
            if nix_version() < (2, 9) {
                // Nix 2.8 runs the hook with OUT_PATHS empty: the derivation alone is recorded.
                assert_eq!(text, &format!("reachd-upload 1\ndrv {drv}\n"));
            } else {
                assert_eq!(text, &format!("reachd-upload 1\ndrv {drv}\nout {out}\n"));
            }
        }
        let outs: Vec<String> = built.iter().map(|(_, out)| out.clone()).collect();
        stores.sign(&outs);
        stores.start_pi("pi");
        assert!(stores.on_pi(&outs).is_err(), "the Pi has them already");

        let spool = stores.spool();
        let claim = spool.claim(&["rpi"]).expect("claim");
        assert_eq!(claim.claimed, 3);
        let reports = drain(&stores, &spool, 100).await;
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!((report.done.len(), report.paths, report.copied), (3, 3, 3));
        assert!(report.lost.is_empty(), "{:?}", report.lost);
        assert_eq!((report.pending, report.next_try), (0, None));
        stores.on_pi(&outs).expect("the outputs on the Pi");
    });
}

#[test]
fn filled_out_paths_as_from_nix_2_9_and_hostile_values() {
    run_for(Duration::from_secs(180), async || {
        let mut stores = Stores::new();
        let built = stores.build(&["one", "two"], None);
        for (drv, out) in &built {
            let output = stores.hook(Some(drv), Some(&format!("{out} ")));
            assert!(output.status.success(), "{}", stderr(&output));
            assert_eq!(stderr(&output), "");
        }
        let texts = incoming_texts(&stores.spool_dir());
        assert_eq!(texts.len(), 2);
        assert!(
            texts.iter().all(|t| t.contains("\nout /nix/store/")),
            "{texts:?}"
        );

        // Nothing the environment says is run or written unless it is a store path.
        let pwned = stores.path("pwned");
        let evil = format!("$(touch {0}) `touch {0}`; touch {0}", pwned.display());
        let output = stores.hook(Some(&evil), Some(&format!("{evil}\n/etc/passwd")));
        assert!(output.status.success(), "the hook must never fail a build");
        assert!(stderr(&output).contains("refused"), "{}", stderr(&output));
        assert!(!pwned.exists());
        assert_eq!(incoming_texts(&stores.spool_dir()).len(), 2);

        stores.start_pi("pi");
        let outs: Vec<String> = built.iter().map(|(_, out)| out.clone()).collect();
        stores.sign(&outs);
        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");
        let reports = drain(&stores, &spool, 100).await;
        assert_eq!(reports[0].done.len(), 2);
        stores.on_pi(&outs).expect("on the Pi");
    });
}

#[test]
fn a_thousand_paths_are_queued_by_the_hook_and_drained_in_batches() {
    run_for(Duration::from_secs(600), async || {
        let mut stores = Stores::new();
        let paths = stores.add_files("p", 1000);
        stores.sign(&paths);
        let mut times = Vec::with_capacity(paths.len());
        for path in &paths {
            let started = Instant::now();
            let output = stores.hook(None, Some(path));
            times.push(started.elapsed());
            assert!(output.status.success(), "{}", stderr(&output));
        }
        times.sort();
        eprintln!(
            "hook, spawn included, 1000 runs: p50 {:?}, p99 {:?}, max {:?}",
            times[499], times[989], times[999]
        );
        assert!(times[989] < Duration::from_secs(1), "p99 {:?}", times[989]);

        let spool = stores.spool();
        assert_eq!(spool.claim(&["rpi"]).expect("claim").claimed, 1000);
        stores.start_pi("pi");
        let reports = drain(&stores, &spool, 300).await;
        let sizes: Vec<usize> = reports.iter().map(|r| r.done.len()).collect();
        assert_eq!(sizes, [300, 300, 300, 100]);
        assert_eq!(reports.iter().map(|r| r.copied).sum::<usize>(), 1000);
        stores.on_pi(&paths).expect("all 1000 on the Pi");
        assert!(spool.pending("rpi").expect("pending").is_empty());
    });
}

#[test]
fn hooks_killed_midway_leave_only_whole_entries() {
    run_for(Duration::from_secs(180), async || {
        require_root_and_nix(NEEDS);
        let dir = tempfile::tempdir().expect("temp dir");
        let spool_dir = dir.path();
        let (mut killed, mut exited) = (0, 0);
        for wave in 0..20u64 {
            // Each hook is spawned and, every other one, killed a spread of moments after its
            // own spawn (before exec, while loading, while writing): spawning them all first
            // let the early ones finish before any kill on an idle machine.
            let mut children: Vec<Child> = Vec::with_capacity(25);
            for i in 0..25u64 {
                let n = wave * 25 + i;
                let out = format!("/nix/store/{:032}-killed-{n}", n % 10);
                let mut child = hook_command(spool_dir, None, Some(&out))
                    .spawn()
                    .expect("spawn hook");
                if i % 2 == 0 {
                    let spin = Instant::now();
                    let wait = Duration::from_micros((wave * 97 + i * 131) % 3000);
                    while spin.elapsed() < wait {
                        std::hint::spin_loop();
                    }
                    child.kill().expect("SIGKILL by PID");
                }
                children.push(child);
            }
            for child in children {
                let output = child.wait_with_output().expect("wait");
                if output.status.success() {
                    exited += 1;
                } else {
                    killed += 1;
                }
            }
        }
        let spool = Spool::open(spool_dir).expect("open");
        let entries = spool.incoming_len().expect("count");
        let temps = fs::read_dir(spool_dir.join("incoming"))
            .expect("list")
            .filter(|e| {
                let name = e.as_ref().expect("entry").file_name();
                name.to_string_lossy().starts_with(".tmp-")
            })
            .count();
        eprintln!(
            "{killed} hooks killed, {exited} exited; {entries} entries, {temps} cut temp files"
        );
        assert!(killed > 0, "no hook was killed");
        assert!(
            temps > 0,
            "no kill landed between create and rename: the test proved little"
        );
        assert!(entries >= exited && entries <= 500, "{entries} entries");
        // Every visible entry is whole: the claim rejects none, and each is in the queue.
        let report = spool.claim(&["rpi"]).expect("claim");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert_eq!(report.claimed, entries);
        for id in spool.pending("rpi").expect("pending") {
            let queued = spool.load("rpi", &id).expect("load").expect("present");
            assert_eq!(queued.entry.outs.len(), 1);
        }
    });
}

#[test]
fn paths_collected_before_upload_are_reported_lost_and_the_rest_go_on() {
    run_for(Duration::from_secs(240), async || {
        let mut stores = Stores::new();
        let files = stores.add_files("f", 3);
        let built = stores.build(&["kept", "outgone", "drvgone"], None);
        for file in &files {
            assert!(stores.hook(None, Some(file)).status.success());
        }
        for (drv, _) in &built {
            // Nix 2.8: the derivation only.
            assert!(stores.hook(Some(drv), Some("")).status.success());
        }
        let mut signed = files.clone();
        signed.push(built[0].1.clone());
        stores.sign(&signed);
        // Collected meanwhile: one file, one build's output, and a whole build.
        stores.delete(&files[1]);
        stores.delete(&built[1].1);
        stores.delete(&built[2].1);
        stores.delete(&built[2].0);

        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");
        stores.start_pi("pi");
        let reports = drain(&stores, &spool, 100).await;
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        let mut lost: Vec<&str> = report.lost.iter().map(StorePath::as_str).collect();
        lost.sort();
        let mut expected = vec![files[1].as_str(), built[1].1.as_str(), built[2].0.as_str()];
        expected.sort();
        assert_eq!(lost, expected);
        assert_eq!((report.done.len(), report.paths), (6, 3));
        assert!(report.failure.is_none());
        stores
            .on_pi(&[files[0].clone(), files[2].clone(), built[0].1.clone()])
            .expect("the rest on the Pi");
        assert!(stores.on_pi(&[files[1].clone()]).is_err());
    });
}

#[test]
fn an_unreachable_store_keeps_every_entry_and_the_error() {
    run_for(Duration::from_secs(180), async || {
        let mut stores = Stores::new();
        let files = stores.add_files("u", 2);
        for file in &files {
            assert!(stores.hook(None, Some(file)).status.success());
        }
        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");
        // The Pi's daemon is not running: its socket does not exist.
        for attempt in 1..=2 {
            let before = SystemTime::now();
            let report = batch(&stores, &spool, 100).await;
            let failure = report.failure.expect("a failure");
            assert_eq!((failure.scope, failure.attempts), (Scope::Queue, attempt));
            assert!(
                failure
                    .error
                    .to_string()
                    .contains("cannot connect to socket"),
                "{}",
                failure.error
            );
            assert_eq!((report.pending, report.done.len()), (2, 0));
            let next = report.next_try.expect("a next try");
            assert!(next >= before + Duration::from_secs(15), "no backoff");
            let retry = spool.queue_retry("rpi").expect("read").expect("state");
            assert_eq!((retry.attempts, retry.next_try), (attempt, next));
            assert!(retry.error.contains("cannot connect"), "{}", retry.error);
        }
        for id in spool.pending("rpi").expect("pending") {
            let queued = spool.load("rpi", &id).expect("load").expect("kept");
            assert_eq!(queued.retry, None, "a store failure is not the entry's");
        }
        // The Pi comes back: the caller may try before the backoff ends.
        stores.start_pi("pi");
        let reports = drain(&stores, &spool, 100).await;
        assert_eq!(reports[0].done.len(), 2);
        assert_eq!(spool.queue_retry("rpi").expect("read"), None);
        stores.on_pi(&files).expect("on the Pi");
    });
}

/// The batch's failure, which must be the Pi refusing a path for want of a signature.
fn signature_refused(report: &BatchReport) -> &Failure {
    let failure = report.failure.as_ref().expect("refused");
    assert!(
        failure
            .error
            .to_string()
            .contains("lacks a valid signature"),
        "{}",
        failure.error
    );
    failure
}

/// docs/nix.md, "Uploads": a Pi that trusts the connection (the example tunnel logs in as root@)
/// still takes only paths signed with a key it trusts: reachd's copy checks signatures.
#[test]
fn a_pi_that_trusts_the_connection_still_refuses_an_unsigned_upload() {
    run_for(Duration::from_secs(120), async || {
        let mut stores = Stores::new();
        stores.trust_root_on_the_pi();
        // An input-addressed build, never signed.
        let built = stores.build(&["unsigned"], None);
        for (drv, out) in &built {
            assert!(stores.hook(Some(drv), Some(out)).status.success());
        }
        stores.start_pi("pi");
        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");
        let report = batch(&stores, &spool, 100).await;
        signature_refused(&report);
        assert!(report.done.is_empty());
        // The Pi does trust the connection: told not to check, it takes the path.
        let out = &built[0].1;
        stores.ok(
            "nix",
            &["copy", "--no-check-sigs", "--to", &stores.pi_uri(), out],
        );
        stores.on_pi(std::slice::from_ref(out)).expect("on the Pi");
    });
}

#[test]
fn a_refused_path_backs_off_alone_and_the_others_go_on() {
    run_for(Duration::from_secs(240), async || {
        let mut stores = Stores::new();
        // Built paths are input-addressed: the Pi wants a signature, and one has none.
        let built = stores.build(&["signed1", "unsigned", "signed2"], None);
        for (drv, out) in &built {
            assert!(stores.hook(Some(drv), Some(out)).status.success());
        }
        stores.sign(&[built[0].1.clone(), built[2].1.clone()]);
        stores.start_pi("pi");
        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");

        let report = batch(&stores, &spool, 100).await;
        let failure = signature_refused(&report);
        assert_eq!((failure.scope, failure.attempts), (Scope::Entries, 1));
        let ids = spool.pending("rpi").expect("pending");
        assert_eq!(ids.len(), 3);
        for id in &ids {
            let retry = spool.load("rpi", id).expect("load").expect("kept").retry;
            let retry = retry.expect("the entry keeps its error");
            assert_eq!(retry.attempts, 1);
            assert!(retry.error.contains("lacks a valid signature"));
        }
        assert!(report.next_try.expect("next") > SystemTime::now() + Duration::from_secs(50));
        // Not due yet: nothing to do, and the report says until when.
        let idle = batch(&stores, &spool, 100).await;
        assert!(idle.entries.is_empty() && idle.failure.is_none());
        assert_eq!(idle.next_try, report.next_try);

        // Time passes (the backoff is made due): each failed entry is tried alone.
        let due: Vec<_> = ids
            .iter()
            .map(|id| {
                let mut retry = spool.load("rpi", id).expect("load").expect("kept").retry;
                if let Some(r) = retry.as_mut() {
                    r.next_try = SystemTime::now() - Duration::from_secs(1);
                }
                (*id, retry)
            })
            .collect();
        spool.set_retries("rpi", &due).expect("make due");
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let report = batch(&stores, &spool, 100).await;
            assert_eq!(report.entries.len(), 1, "tried alone");
            outcomes.push(report.failure.map(|f| (f.scope, f.attempts)));
        }
        assert_eq!(outcomes, [None, Some((Scope::Entries, 2)), None]);
        let left = spool.pending("rpi").expect("pending");
        assert_eq!(left, vec![ids[1]]);
        let kept: Option<Retry> = spool
            .load("rpi", &ids[1])
            .expect("load")
            .expect("kept")
            .retry;
        assert_eq!(kept.map(|r| r.attempts), Some(2));
        stores
            .on_pi(&[built[0].1.clone(), built[2].1.clone()])
            .expect("the signed ones on the Pi");
    });
}

#[test]
fn a_store_that_never_answers_is_given_up_at_the_deadline_and_dropping_stops_nix() {
    run_for(Duration::from_secs(120), async || {
        let stores = Stores::new();
        let files = stores.add_files("h", 2);
        for file in &files {
            assert!(stores.hook(None, Some(file)).status.success());
        }
        let spool = stores.spool();
        spool.claim(&["rpi"]).expect("claim");
        // Accepts connections and never answers (a Pi that lost power behind a live tunnel).
        let socket = stores.path("mute.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let uri = format!("unix://{}", socket.display());
        let nix = stores.nix();

        let started = Instant::now();
        let report = upload_batch(
            &spool,
            "rpi",
            &nix,
            &uri,
            Limits {
                max_paths: 100,
                deadline: deadline(Duration::from_secs(3)),
            },
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let failure = report.failure.expect("timed out");
        assert_eq!(failure.scope, Scope::Queue);
        assert!(
            failure.error.to_string().contains("deadline"),
            "{}",
            failure.error
        );
        assert_eq!(report.pending, 2);

        // Dropping the future kills `nix copy`.
        let far = deadline(Duration::from_secs(600));
        let dropped = tokio::time::timeout(
            Duration::from_secs(2),
            upload_batch(
                &spool,
                "rpi",
                &nix,
                &uri,
                Limits {
                    max_paths: 100,
                    deadline: far,
                },
            ),
        )
        .await;
        assert!(dropped.is_err(), "the upload should still be waiting");
        let gone_by = Instant::now() + Duration::from_secs(5);
        loop {
            let alive = live_children_named("nix");
            if alive.is_empty() {
                break;
            }
            assert!(Instant::now() < gone_by, "nix still running: {alive:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(spool.pending("rpi").expect("pending").len(), 2);
        drop(listener);
    });
}

/// Our children with this command name that are not zombies.
fn live_children_named(name: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 2..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next());
        if comm == name && ppid == Some(me.as_str()) && state != Some("Z") {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_full_spool_still_exits_0_and_says_so_in_the_build_log() {
    run_for(Duration::from_secs(180), async || {
        require_root_and_nix(NEEDS);
        let dir = tempfile::tempdir().expect("temp dir");
        let incoming = dir.path().join("incoming");
        fs::create_dir(&incoming).expect("mkdir");
        for i in 0..reachd::upload::spool::DEFAULT_CAPACITY {
            // Only names are counted on the hook's side.
            let name = format!("{i:020}-1-0000000000000000.entry");
            fs::File::create(incoming.join(name)).expect("create");
        }
        let out = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0";
        let started = Instant::now();
        let output = hook_command(dir.path(), None, Some(out))
            .output()
            .expect("hook");
        eprintln!("hook with a full incoming/: {:?}", started.elapsed());
        assert!(output.status.success());
        assert!(
            stderr(&output).contains("spool full"),
            "{}",
            stderr(&output)
        );
        assert!(stderr(&output).contains(out), "{}", stderr(&output));
        let count = fs::read_dir(&incoming).expect("list").count();
        assert_eq!(
            count,
            reachd::upload::spool::DEFAULT_CAPACITY,
            "nothing dropped or added"
        );
    });
}

/// Set in the child of the permissions test: the spool it claims from as that user.
const MEMBER_CHILD: &str = "REACHD_TEST_SPOOL_MEMBER";

#[test]
fn the_agent_side_works_as_an_unprivileged_member_of_the_spool_group() {
    if let Some(dir) = std::env::var_os(MEMBER_CHILD) {
        // The child, running as uid/gid 65534: what the user's agent does.
        let spool = Spool::open(PathBuf::from(dir)).expect("open as the member");
        let report = spool.claim(&["rpi"]).expect("claim as the member");
        let ids = spool.pending("rpi").expect("pending");
        println!("claimed {} pending {}", report.claimed, ids.len());
        spool.done("rpi", &ids[..1]).expect("done as the member");
        return;
    }
    run_for(Duration::from_secs(60), async || {
        require_root_and_nix(NEEDS);
        let stores = Stores::new();
        // As systemd/tmpfiles.d/reachd.conf lays it out, with nogroup (65534) as the group.
        let root = stores.path("spool");
        let group = 65534;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o750)).expect("chmod");
        std::os::unix::fs::chown(&root, Some(0), Some(group)).expect("chown");
        for sub in ["incoming", "hosts"] {
            let dir = root.join(sub);
            fs::create_dir(&dir).expect("mkdir");
            std::os::unix::fs::chown(&dir, Some(0), Some(group)).expect("chown");
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o2770)).expect("chmod");
        }
        // The hook runs as root under a umask that would drop the group's write bit.
        for file in [
            "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-a",
            "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznk-b",
        ] {
            let output = Spawn::new("sh")
                .args(["-c", "umask 022 && exec \"$0\"", HOOK])
                .env_clear()
                .env("REACHD_SPOOL", &root)
                .env("OUT_PATHS", file)
                .run(SHORT)
                .expect("hook");
            assert!(
                output.success() && output.stderr.is_empty(),
                "{}",
                output.stderr
            );
        }
        let test_binary = std::env::current_exe().expect("test binary");
        let output = Spawn::new(test_binary)
            .args([
                "--exact",
                "the_agent_side_works_as_an_unprivileged_member_of_the_spool_group",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MEMBER_CHILD, &root)
            .user(65534, group)
            .run(SHORT)
            .expect("run the member child");
        assert!(output.success(), "{}\n{}", output.stdout, output.stderr);
        assert!(
            output.stdout.contains("claimed 2 pending 2"),
            "{}",
            output.stdout
        );
        let queue = root.join("hosts/rpi");
        let meta = fs::metadata(&queue).expect("the queue");
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (65534, group));
        assert_eq!(fs::read_dir(&queue).expect("list").count(), 1);
        assert_eq!(
            fs::read_dir(root.join("incoming")).expect("list").count(),
            0
        );
    });
}

#[test]
#[ignore = "a measurement for docs/nix-upload.md, not a check: run with --ignored --nocapture"]
fn measure_drain_against_bare_nix_copy() {
    run_for(Duration::from_secs(1800), async || {
        let mut stores = Stores::new();
        let paths = stores.add_files("m", 1000);
        stores.sign(&paths);
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let mut bare = Vec::new();
        let mut drained: Vec<(usize, Vec<Duration>)> = vec![(1000, vec![]), (250, vec![])];
        for round in 0..3 {
            stores.start_pi(&format!("pi-bare-{round}"));
            let started = Instant::now();
            stores
                .spawn("nix")
                .args(["copy", "--to", &stores.pi_uri()])
                .args(&paths)
                .ok(Duration::from_secs(600))
                .expect("bare nix copy");
            bare.push(started.elapsed());
            stores.on_pi(&paths).expect("copied");
            for (batch, times) in &mut drained {
                let spool_dir = stores.path(&format!("spool-{round}-{batch}"));
                fs::create_dir(&spool_dir).expect("mkdir");
                let spool = Spool::open(&spool_dir).expect("spool");
                for path in &paths {
                    let out = hook_command(&spool_dir, None, Some(path))
                        .output()
                        .expect("hook");
                    assert!(out.status.success());
                }
                spool.claim(&["rpi"]).expect("claim");
                stores.start_pi(&format!("pi-{round}-{batch}"));
                let started = Instant::now();
                let reports = drain(&stores, &spool, *batch).await;
                times.push(started.elapsed());
                assert_eq!(reports.iter().map(|r| r.copied).sum::<usize>(), 1000);
            }
        }
        let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!("1000 paths to a fresh Pi store, median of 3 (load average now: {load}):");
        eprintln!("  bare nix copy: {:?} ({bare:?})", median(bare.clone()));
        for (batch, times) in drained {
            eprintln!(
                "  upload_batch, batches of {batch}: {:?} ({times:?})",
                median(times.clone())
            );
        }
        let mut hook_times = Vec::new();
        let spool_dir = stores.path("spool-hook");
        fs::create_dir(&spool_dir).expect("mkdir");
        for path in &paths {
            let started = Instant::now();
            let out = hook_command(&spool_dir, None, Some(path))
                .output()
                .expect("hook");
            hook_times.push(started.elapsed());
            assert!(out.status.success());
        }
        hook_times.sort();
        eprintln!(
            "hook, spawn included, 1000 runs into a growing incoming/: p50 {:?} p99 {:?}",
            hook_times[499], hook_times[989]
        );
    });
}
