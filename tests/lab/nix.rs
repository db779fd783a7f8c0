//! The Nix scenarios: reachd's fragment and cache against the lab's real Nix (testkit's
//! lab/nix/): the Pi's store reachable only through the tunnel, the laptop's nix-daemon
//! substituting from reachd's cache for a user it does not trust, whose nix.conf includes the
//! fragment.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reachd_testkit::lab::nix::{
    laptop_store_root, pi_store_root, user_conf_without_include, Fragment, NixRun, SMALL_TEXT,
};
use reachd_testkit::lab::{Lab, CAFE_UUID, HOME_UUID, T};
use reachd_testkit::process::Frozen;

use crate::scenarios::{baseline, secs};

/// The longest a nix command may take before the scenario calls it hung.
const NIX_TIMEOUT: Duration = Duration::from_secs(60);
/// A Pi whose sshd hangs: the fragment must drop its cache within this (reachd's design: a
/// check every 2 s with a 2 s deadline, so 4 s at worst, plus room for a loaded machine)...
const HALF_DEAD_NOTICED: Duration = Duration::from_secs(7);
/// ...and a command started after that must end within this.
const HALF_DEAD_COMMAND: Duration = Duration::from_secs(10);
/// Status views may lag the fragment by this much.
const AGREE: Duration = Duration::from_secs(3);

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// `nix path-info --sigs` printed a signature by pi-1.
fn signed_by_pi(path_info: &str) -> bool {
    path_info
        .split_whitespace()
        .any(|word| word.starts_with("pi-1:"))
}

/// Before reachd runs (lab self-check): the Pi's store is out of the laptop's reach, and the
/// laptop's daemon serves the user.
pub fn self_check_stores(lab: &Lab) -> Result<String, String> {
    let ns = |p: &str| fs::read_link(p).map_err(|e| format!("{p}: {e}"));
    let pi_ns = lab.pi_mount_ns()?;
    if ns("/proc/self/ns/mnt")? == ns(&pi_ns.to_string_lossy())? {
        return Err("the Pi's nix-daemon runs in the machine's mount namespace".into());
    }
    let here = fs::read_dir(pi_store_root())
        .map_err(|e| format!("{}: {e}", pi_store_root().display()))?
        .count();
    if here != 0 {
        return Err(format!(
            "{} shows {here} entries outside the Pi's namespace",
            pi_store_root().display()
        ));
    }
    let p = lab.nix_paths();
    let local = lab.nix_as_user(&["nix", "path-info", &p.local], T)?;
    if local.code != 0 {
        return Err(format!(
            "the laptop's daemon, asked by the user: {}",
            local.summary()
        ));
    }
    let small = lab.nix_as_user(&["nix", "path-info", &p.small], T)?;
    if small.code == 0 {
        return Err("the laptop's store has the Pi's path before anything fetched it".into());
    }
    Ok(
        "the Pi's store only in its own mount namespace, the laptop's daemon serving the user"
            .into(),
    )
}

/// With the target up (lab self-check): the Pi's daemon answers through the tunnel, its paths
/// signed by pi-1.
pub fn self_check_tunnel(lab: &Lab) -> Result<String, String> {
    let version = lab.expect_tunnel()?;
    let tunnel = lab.user().runtime_dir().join("rpi-nix-daemon.sock");
    let store = format!("unix://{}", tunnel.display());
    let small = &lab.nix_paths().small;
    let info = lab.nix_as_user(&["nix", "path-info", "--sigs", "--store", &store, small], T)?;
    if info.code != 0 || !signed_by_pi(&info.stdout) {
        return Err(format!(
            "the Pi's {small} through the tunnel: {} {}",
            info.summary(),
            info.stdout.trim()
        ));
    }
    Ok(format!(
        "the Pi's nix-daemon (protocol {version}) answers through the tunnel, signed by pi-1"
    ))
}

/// `nix-store -r PATH` as the user, which must succeed and leave PATH valid.
fn realise(lab: &Lab, path: &str) -> Result<NixRun, String> {
    let run = lab.nix_as_user(&["nix-store", "-r", path], NIX_TIMEOUT)?;
    if run.code != 0 || !run.stdout.contains(path) {
        return Err(format!("nix-store -r {path}: {}", run.summary()));
    }
    expect_valid(lab, path)?;
    Ok(run)
}

/// PATH is valid in the laptop's store, signed by pi-1 (the Pi's signature came through).
fn expect_valid(lab: &Lab, path: &str) -> Result<(), String> {
    let info = lab.nix_as_user(&["nix", "path-info", "--sigs", path], T)?;
    if info.code != 0 || !signed_by_pi(&info.stdout) {
        return Err(format!(
            "{path} in the laptop's store: {} {}",
            info.summary(),
            info.stdout.trim()
        ));
    }
    Ok(())
}

/// Home, tunnel up: the user's plain `nix-store -r` fetches the Pi's paths through reachd.
pub fn nix_home(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let named = lab.expect_fragment(true, T)?;
    let reason = lab.expect_nix_in_use(true, AGREE)?;
    let p = lab.nix_paths().clone();
    let small = realise(lab, &p.small)?;
    let file = laptop_store_root().join(p.small.trim_start_matches('/'));
    let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    if text != SMALL_TEXT {
        return Err(format!("{} holds {text:?}, not the Pi's", p.small));
    }
    let reference = realise(lab, &p.reference)?;
    expect_valid(lab, &p.dep).map_err(|e| format!("the reference of {}: {e}", p.reference))?;
    let (big, _) = lab.pi_add_new("big")?;
    let fetched = realise(lab, &big)?;
    Ok(format!(
        "fragment named the cache {} after the target was up; fetched the small path in {}, \
         one with its reference in {}, 100 MiB in {} ({:.0} MiB/s); reachd: {reason:?}",
        secs(named),
        ms(small.elapsed),
        ms(reference.elapsed),
        secs(fetched.elapsed),
        100.0 / fetched.elapsed.as_secs_f64()
    ))
}

/// Away (no network, then the café with its impostor): no cache in the fragment, and Nix is as
/// fast as without the include.
pub fn nix_away(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.nmcli_con("down", HOME_UUID)?;
    lab.expect_down(T, "home down (nix)")?;
    let offline = away(lab, "offline")?;
    lab.nmcli_con("up", CAFE_UUID)?;
    let cafe = away(lab, "in the café")?;
    lab.nmcli_con("down", CAFE_UUID)?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.expect_up(T, "back home (nix)")?;
    Ok(format!("{offline}; {cafe}"))
}

fn away(lab: &Lab, place: &str) -> Result<String, String> {
    let fail = |e: String| format!("{place}: {e}");
    lab.expect_fragment(false, HALF_DEAD_NOTICED)
        .map_err(fail)?;
    lab.expect_nix_in_use(false, AGREE).map_err(fail)?;
    let local = lab.nix_paths().local.clone();
    let without = user_conf_without_include();
    let (mut with_include, mut without_include) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let args = ["nix-store", "-r", local.as_str()];
        let run = lab.nix_as_user(&args, T).map_err(fail)?;
        quiet(&run).map_err(fail)?;
        with_include.push(run.elapsed);
        let spawn = lab.user_nix(&args).env("NIX_USER_CONF_FILES", &without);
        let run = NixRun::of(spawn, T).map_err(fail)?;
        quiet(&run).map_err(|e| fail(format!("without the include: {e}")))?;
        without_include.push(run.elapsed);
    }
    let fastest = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (with, plain) = (fastest(&with_include), fastest(&without_include));
    let report = format!(
        "{place}: nix-store -r of a local path {} with the include, {} without (medians of 5; \
         fastest {} and {})",
        ms(median(with_include)),
        ms(median(without_include)),
        ms(with),
        ms(plain)
    );
    // The fastest of each: the least noisy figure on a busy machine. The include must not
    // cost a round trip to anything (stderr, above, shows Nix never named the Pi).
    if with > plain + Duration::from_millis(100) {
        return Err(format!("{report}: the include costs more than 100 ms"));
    }
    Ok(report)
}

/// Exit 0, and nothing about the Pi or its cache on stderr.
fn quiet(run: &NixRun) -> Result<(), String> {
    let err = run.stderr.to_lowercase();
    if run.code != 0 || err.contains("127.0.0.1") || err.contains("rpi") {
        return Err(format!(
            "nix-store -r: exit {}, stderr {:?}",
            run.code, run.stderr
        ));
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The Pi answers mDNS and TCP but its sshd hangs (every sshd process stopped): the fragment
/// loses the cache quickly and Nix does not hang on it.
pub fn nix_half_dead(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.expect_fragment(true, T)?;
    let sshd = lab.sshd.as_ref().ok_or("sshd is not running")?.pid();
    let frozen = Frozen::tree(sshd);
    let stopped = frozen.pids().len();
    let result = half_dead(lab);
    drop(frozen);
    let back = lab
        .expect_fragment(true, Duration::from_secs(30))
        .map_err(|e| format!("after SIGCONT: {e}"));
    let detail = result.map_err(|e| format!("{stopped} sshd processes stopped: {e}"))?;
    let back = back?;
    lab.expect_nix_in_use(true, AGREE)?;
    Ok(format!(
        "{stopped} sshd processes stopped: {detail}; the cache back {} after SIGCONT",
        secs(back)
    ))
}

fn half_dead(lab: &Lab) -> Result<String, String> {
    let gone = lab.expect_fragment(false, HALF_DEAD_NOTICED)?;
    // The wait may end one poll (0.1 s) past its deadline: the bound itself is the contract.
    if gone > HALF_DEAD_NOTICED {
        return Err(format!(
            "the fragment lost the cache only after {}, more than {}",
            secs(gone),
            secs(HALF_DEAD_NOTICED)
        ));
    }
    let reason = lab.expect_nix_in_use(false, AGREE)?;
    let other = &lab.nix_paths().other;
    let run = lab
        .nix_as_user(&["nix-store", "-r", other], HALF_DEAD_COMMAND)
        .map_err(|e| format!("nix-store -r of a path only the Pi has: {e}"))?;
    Ok(format!(
        "the fragment lost the cache after {} (reachd: {reason:?}); then nix-store -r of a path \
         only the Pi has: {}",
        secs(gone),
        run.summary()
    ))
}

/// A derivation whose output the Pi does not have: the cache's 404 falls through to a local
/// build while the fragment names the Pi.
pub fn nix_missing(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.expect_fragment(true, T)?;
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos();
    let expr = lab.user().home.join("missing.nix");
    let text = format!("built on the laptop {nonce}");
    fs::write(
        &expr,
        format!(
            "derivation {{ name = \"l-missing\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo {text} > $out\" ]; }}\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", expr.display()))?;
    let run = lab.nix_as_user(
        &["nix-build", "--no-out-link", &expr.to_string_lossy()],
        NIX_TIMEOUT,
    )?;
    let out = run.stdout.trim().to_string();
    if run.code != 0 || !out.starts_with("/nix/store/") {
        return Err(format!("nix-build: {}", run.summary()));
    }
    let file = laptop_store_root().join(out.trim_start_matches('/'));
    let built = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    if built.trim() != text {
        return Err(format!("{out} holds {built:?}"));
    }
    Ok(format!(
        "built locally in {} while the fragment named the Pi",
        secs(run.elapsed)
    ))
}

/// Reads of the fragment while it changes, by kind.
#[derive(Default)]
struct Reads {
    absent: usize,
    with: usize,
    without: usize,
    bad: Vec<String>,
}

/// Reads the fragment in a tight loop until `stop`.
fn read_until(stop: &AtomicBool) -> Reads {
    let mut reads = Reads::default();
    while !stop.load(Ordering::Relaxed) {
        match Fragment::read() {
            Fragment::Absent => reads.absent += 1,
            Fragment::WithCache => reads.with += 1,
            Fragment::WithoutCache => reads.without += 1,
            Fragment::Bad(what) => reads.bad.push(what),
        }
    }
    reads
}

/// The home connection flaps while a reader reads the fragment: every read is absent or a
/// complete file, and both kinds of file were seen.
pub fn nix_fragment_atomic(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.expect_fragment(true, T)?;
    let stop = AtomicBool::new(false);
    let (flaps, reads) = thread::scope(|s| {
        let reader = s.spawn(|| read_until(&stop));
        let flaps = (|| {
            for _ in 0..10 {
                lab.nmcli_con("down", HOME_UUID)?;
                lab.expect_fragment(false, HALF_DEAD_NOTICED)?;
                lab.nmcli_con("up", HOME_UUID)?;
                lab.expect_fragment(true, T)?;
            }
            Ok::<(), String>(())
        })();
        stop.store(true, Ordering::Relaxed);
        (flaps, reader.join())
    });
    let reads = reads.map_err(|_| "the reader thread panicked".to_string())?;
    let total = reads.absent + reads.with + reads.without + reads.bad.len();
    if let Some(first) = reads.bad.first() {
        return Err(format!(
            "{} of {total} reads were not a complete fragment, e.g. {first}",
            reads.bad.len()
        ));
    }
    flaps?;
    if reads.with == 0 || reads.without == 0 {
        return Err(format!(
            "the reader saw {} fragments with the cache and {} without: it proves nothing",
            reads.with, reads.without
        ));
    }
    lab.expect_up(T, "after the fragment's flaps")?;
    Ok(format!(
        "{total} reads over 10 down/up cycles: {} with the cache, {} without, {} absent, none torn",
        reads.with, reads.without, reads.absent
    ))
}
