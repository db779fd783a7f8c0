//! The Nix part of the bench, with the lab's reachd configuration (the Pi's cache and uploads)
//! and the tunnel enabled again: Nix away from home with reachd's fragment, without any Pi and
//! with the old `extra-substituters` recipe; fetching 100 MiB from the Pi through reachd's cache
//! against plain `nix copy --from ssh://`; the post-build hook's own time; and draining the
//! upload spool against a bare `nix copy --to` through the same tunnel; then the vanish window
//! (builds started in the 10 s after the Pi vanished, against the same builds without the Pi)
//! and the home cost of asking the Pi first, with the machine's Nix and then with the current
//! one (tests/current-nix) on the laptop.

use std::fs;
use std::time::{Duration, Instant};

use reachd_testkit::lab::bench::TARGET;
use reachd_testkit::lab::nix::vanish::{Fault, HomeCost, Window, ALONE, WITH_STAND_IN};
use reachd_testkit::lab::nix::{
    nonce, old_recipe_conf, spool_dir, user_conf_without_include, LaptopNix, NixRun, TUNNEL_STORE,
};
use reachd_testkit::lab::{dir, Lab, HOME_UUID};
use reachd_testkit::process::wait_until;

use crate::measure::{median, ms, summary};

/// Runs of each measurement (the drain's are fewer: each waits for the Pi to come back).
const RUNS: usize = 5;
const DRAIN_RUNS: usize = 3;
const HOOK_RUNS: usize = 200;
/// Small paths per drain run.
const SMALL_PATHS: usize = 100;
/// Builds at home with the include and as many without, per Nix version.
const HOME_BUILDS: usize = 20;
const BIG_MIB: f64 = 100.0;
const NIX_TIMEOUT: Duration = Duration::from_secs(120);

/// Wall times of a series; `None` where a run did not finish.
type Times = Vec<Option<Duration>>;

/// What the Nix part measured.
#[derive(Default)]
pub struct NixReport {
    /// (setup, times, exit codes) of `nix-store -r` of a local path away from home.
    pub away: Vec<(&'static str, Times, Vec<i32>)>,
    /// 100 MiB from the Pi: reachd's cache, and `nix copy --from ssh://` (or why it failed).
    pub cache: Times,
    pub ssh: Times,
    pub ssh_error: Option<String>,
    pub hook: Vec<Duration>,
    /// (what, reachd's drain from target active, bare nix copy).
    pub drain: Vec<(String, Times, Times)>,
    pub vanish: Vec<Vanish>,
}

/// The vanish window and the home cost with one Nix on the laptop.
pub struct Vanish {
    /// "Nix 2.34.8".
    pub nix: String,
    pub home: HomeCost,
    /// One narinfo that the Pi does not have, asked of reachd's cache alone (no Nix): times.
    pub miss: Vec<Duration>,
    pub windows: Vec<Window>,
}

/// Restores the Pi's avahi, the lab's reachd configuration and the tunnel, then measures.
pub fn run(lab: &mut Lab) -> Result<NixReport, String> {
    // The many-hosts measurement left the Pi's avahi on a bus of its own, which is gone.
    lab.start_pi_avahi()?;
    let user = lab.user();
    user.stop_reachd()?;
    user.configure_reachd_lab()?;
    user.systemctl(&["enable", "rpi-nix-tunnel.service"])?;
    // Left active by the earlier measurements, without the tunnel: reachd starts it again.
    user.systemctl(&["stop", TARGET])?;
    user.start_reachd()?;
    lab.expect_fragment(true, Duration::from_secs(20))?;
    let mut report = NixReport::default();
    eprintln!("bench: Nix away from home ({RUNS} runs each)");
    away(lab, &mut report)?;
    eprintln!("bench: 100 MiB from the Pi: reachd's cache vs nix copy over ssh ({RUNS} runs)");
    fetch(lab, &mut report)?;
    eprintln!("bench: the post-build hook ({HOOK_RUNS} runs)");
    report.hook = hook(lab)?;
    for (what, small) in [
        (format!("{SMALL_PATHS} small paths"), true),
        ("one 100 MiB path".to_string(), false),
    ] {
        eprintln!("bench: draining {what} ({DRAIN_RUNS} runs)");
        let (reachd, bare) = drain(lab, small)?;
        report.drain.push((what, reachd, bare));
    }
    for nix in [lab.laptop_nix_install.clone(), LaptopNix::current()?] {
        if nix.root != lab.laptop_nix_install.root {
            lab.use_laptop_nix(nix.clone())?;
        }
        eprintln!(
            "bench: the vanish window and the home cost with {} on the laptop",
            nix.label()
        );
        report.vanish.push(vanish(lab, nix.label())?);
    }
    Ok(report)
}

/// Home, then each fault with the Pi's cache alone and with a second cache.
fn vanish(lab: &Lab, nix: String) -> Result<Vanish, String> {
    lab.nmcli_con("up", HOME_UUID)?;
    wait_target(lab, "active")?;
    lab.pi_cache_back_in_use()?;
    let home = lab.home_cost(HOME_BUILDS)?;
    let miss = narinfo_misses()?;
    let mut windows = Vec::new();
    for fault in Fault::ALL {
        for caches in [ALONE, WITH_STAND_IN] {
            let window = lab.vanish_window(fault, caches)?;
            eprintln!("bench: {nix}: {}", window.line());
            window.back.clone()?;
            windows.push(window);
        }
    }
    Ok(Vanish {
        nix,
        home,
        miss,
        windows,
    })
}

/// Asks reachd's cache for narinfos the Pi does not have, each on a new connection as Nix's
/// first request of a build is, from the laptop's namespace: how long each answer took.
fn narinfo_misses() -> Result<Vec<Duration>, String> {
    const ASK: &str = "import http.client, sys, time
for i in range(int(sys.argv[1])):
    t = time.monotonic()
    c = http.client.HTTPConnection('127.0.0.1', 37515)
    c.request('GET', '/%032d.narinfo' % i)
    r = c.getresponse(); r.read(); c.close()
    if r.status != 404:
        sys.exit('answered %d' % r.status)
    print(time.monotonic() - t)";
    let out = reachd_testkit::process::Spawn::new("python3")
        .args(["-c", ASK, &HOME_BUILDS.to_string()])
        .netns(Lab::netns_path("laptop"))
        .ok(Duration::from_secs(30))
        .map_err(|e| format!("narinfo misses: {e}"))?;
    out.stdout
        .lines()
        .map(|l| {
            l.trim()
                .parse::<f64>()
                .map(Duration::from_secs_f64)
                .map_err(|e| format!("narinfo misses: {l:?}: {e}"))
        })
        .collect()
}

fn away(lab: &mut Lab, report: &mut NixReport) -> Result<(), String> {
    lab.nmcli_con("down", HOME_UUID)?;
    wait_target(lab, "inactive")?;
    lab.expect_fragment(false, Duration::from_secs(5))?;
    let local = lab.nix_paths().local.clone();
    let setups: [(&'static str, Option<std::path::PathBuf>); 3] = [
        ("reachd's setup (the fragment's !include), home down", None),
        (
            "no Pi configured (no include)",
            Some(user_conf_without_include()),
        ),
        (
            "old recipe (extra-substituters = the tunnel's socket), target stopped",
            Some(old_recipe_conf()?),
        ),
    ];
    for (label, conf) in setups {
        let (mut times, mut codes) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let mut spawn = lab.user_nix(&["nix-store", "-r", &local]);
            if let Some(conf) = &conf {
                spawn = spawn.env("NIX_USER_CONF_FILES", conf);
            }
            let run = NixRun::of(spawn, Duration::from_secs(30))?;
            times.push(Some(run.elapsed));
            codes.push(run.code);
        }
        report.away.push((label, times, codes));
    }
    lab.nmcli_con("up", HOME_UUID)?;
    wait_target(lab, "active")?;
    lab.expect_fragment(true, Duration::from_secs(20)).map(drop)
}

fn fetch(lab: &Lab, report: &mut NixReport) -> Result<(), String> {
    for i in 0..RUNS {
        let (big, _) = lab.pi_add_new("big")?;
        let fresh = dir().join(format!("bench-fresh-{i}"));
        let ssh = lab.ssh_copy_from_pi(&big, &fresh)?;
        let _ = fs::remove_dir_all(&fresh);
        if ssh.code == 0 {
            report.ssh.push(Some(ssh.elapsed));
        } else {
            report.ssh.push(None);
            report.ssh_error = Some(ssh.summary());
        }
        let cache = lab.nix_as_user(&["nix-store", "-r", &big], NIX_TIMEOUT)?;
        if cache.code != 0 {
            return Err(format!("nix-store -r {big}: {}", cache.summary()));
        }
        report.cache.push(Some(cache.elapsed));
        eprintln!(
            "bench:   run {}: cache {}, ssh {}",
            i + 1,
            ms(cache.elapsed),
            if ssh.code == 0 {
                ms(ssh.elapsed)
            } else {
                ssh.summary()
            }
        );
    }
    Ok(())
}

/// The hook run directly, as the daemon runs it, into a scratch spool.
fn hook(lab: &Lab) -> Result<Vec<Duration>, String> {
    let scratch = dir().join("bench-spool");
    for d in ["incoming", "hosts"] {
        fs::create_dir_all(scratch.join(d)).map_err(|e| format!("scratch spool: {e}"))?;
    }
    let local = lab.nix_paths().local.clone();
    let times = (0..HOOK_RUNS)
        .map(|_| lab.run_hook(&local, &scratch))
        .collect::<Result<Vec<_>, _>>();
    let _ = fs::remove_dir_all(&scratch);
    let mut times = times?;
    times.sort();
    Ok(times)
}

/// Builds a fresh set as the user: `SMALL_PATHS` small outputs, or one 100 MiB path.
fn build_set(lab: &Lab, small: bool) -> Result<Vec<String>, String> {
    let name = format!("b-{}-{}", if small { "small" } else { "big" }, nonce());
    let (outputs, script) = if small {
        (
            (1..=SMALL_PATHS).map(|i| format!("\"o{i}\"")).collect(),
            "for o in $outputs; do eval \\\"echo $o > \\\\$$o\\\"; done",
        )
    } else {
        (
            vec!["\"out\"".to_string()],
            "/usr/bin/head -c 104857600 /dev/urandom > $out",
        )
    };
    let expr = format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         outputs = [ {} ]; args = [ \"-c\" \"{script}\" ]; }}\n",
        outputs.join(" ")
    );
    let file = lab.user().home.join(format!("{name}.nix"));
    fs::write(&file, expr).map_err(|e| format!("{}: {e}", file.display()))?;
    let run = lab.nix_as_user(
        &["nix-build", "--no-out-link", &file.to_string_lossy()],
        NIX_TIMEOUT,
    )?;
    let first = run.stdout.lines().next().unwrap_or_default().to_string();
    if run.code != 0 || first.is_empty() {
        return Err(format!("nix-build {name}: {}", run.summary()));
    }
    let query = |args: &[&str]| -> Result<String, String> {
        let q = lab.nix_as_user(args, Duration::from_secs(20))?;
        if q.code != 0 {
            return Err(format!("{}: {}", args.join(" "), q.summary()));
        }
        Ok(q.stdout)
    };
    let drv = query(&["nix-store", "--query", "--deriver", &first])?;
    let outs = query(&["nix-store", "--query", "--outputs", drv.trim()])?;
    Ok(outs.lines().map(str::to_string).collect())
}

/// reachd's drain of a set queued while away (from the target active until `reachd uploads
/// --wait` returns) and a bare `nix copy --to` of another set (reachd stopped meanwhile).
fn drain(lab: &Lab, small: bool) -> Result<(Times, Times), String> {
    let (mut reachd, mut bare) = (Vec::new(), Vec::new());
    for i in 0..DRAIN_RUNS {
        settle_uploads(lab)?;
        lab.nmcli_con("down", HOME_UUID)?;
        wait_target(lab, "inactive")?;
        build_set(lab, small)?;
        lab.nmcli_con("up", HOME_UUID)?;
        let active = wait_target(lab, "active")?;
        let out = lab
            .user()
            .uploads(&["--wait", "--timeout", "120"], Duration::from_secs(130))?;
        let took = active.elapsed();
        if out.code() != 0 {
            return Err(format!("reachd uploads --wait: {}", out.stderr.trim()));
        }
        reachd.push(Some(took));

        let user = lab.user();
        user.stop_reachd()?;
        let copied = build_set(lab, small).and_then(|paths| {
            let mut args = vec!["nix", "copy", "--to", TUNNEL_STORE];
            args.extend(paths.iter().map(String::as_str));
            let run = lab.nix_as_user(&args, NIX_TIMEOUT)?;
            if run.code == 0 {
                Ok(run.elapsed)
            } else {
                Err(format!("bare nix copy: {}", run.summary()))
            }
        });
        user.start_reachd()?;
        let copied = copied?;
        bare.push(Some(copied));
        eprintln!(
            "bench:   run {}: reachd {}, bare nix copy {}",
            i + 1,
            ms(took),
            ms(copied)
        );
    }
    settle_uploads(lab)?;
    Ok((reachd, bare))
}

/// Waits until nothing waits for upload (what an earlier run left is uploaded first).
fn settle_uploads(lab: &Lab) -> Result<(), String> {
    let out = lab
        .user()
        .uploads(&["--wait", "--timeout", "120"], Duration::from_secs(130))?;
    if out.code() == 0 {
        Ok(())
    } else {
        Err(format!(
            "uploads still waiting in {}: {}",
            spool_dir().display(),
            out.stderr.trim()
        ))
    }
}

/// Polls the target's ActiveState (every 10 ms) until `state`; the instant it was seen.
fn wait_target(lab: &Lab, state: &str) -> Result<Instant, String> {
    wait_until(
        Duration::from_secs(30),
        &format!("{TARGET} {state}"),
        || {
            let now = lab.user().active_state(TARGET)?;
            Ok((now == state).then(Instant::now))
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mib_s(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.0} MiB/s", BIG_MIB / d.as_secs_f64())
    })
}

/// `b / a` of two times: how fast `a` goes relative to `b`.
fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", b.as_secs_f64() / a.as_secs_f64()),
        _ => "-".into(),
    }
}

impl NixReport {
    pub fn print(&self) {
        println!();
        println!("Nix away from home: `nix-store -r` of a locally valid path as the lab user; median (min–max) of {RUNS}");
        println!("| setup | time | exit codes |");
        println!("|---|---|---|");
        for (label, times, codes) in &self.away {
            println!("| {label} | {} | {codes:?} |", summary(times));
        }
        println!();
        println!("Fetching one 100 MiB path from the Pi into the laptop; median (min–max) of {RUNS}, each run a new path");
        println!("| way | time | throughput |");
        println!("|---|---|---|");
        let (cache, ssh) = (median(&self.cache), median(&self.ssh));
        println!(
            "| reachd's cache (`nix-store -r` as the user) | {} | {} |",
            summary(&self.cache),
            mib_s(cache)
        );
        println!(
            "| `nix copy --from ssh://root@pi?remote-store=…` (root, fresh store) | {} | {} |",
            summary(&self.ssh),
            mib_s(ssh)
        );
        println!(
            "ratio (reachd / ssh throughput): {} (goal >= 0.8){}",
            ratio(cache, ssh),
            self.ssh_error
                .as_ref()
                .map(|e| format!("; ssh failed: {e}"))
                .unwrap_or_default()
        );
        println!();
        if !self.hook.is_empty() {
            println!(
                "post-build hook, run directly as the daemon runs it ({HOOK_RUNS} runs): p50 {}, p99 {}, max {} (goal <= 5 ms / <= 20 ms)",
                ms(percentile(&self.hook, 0.5)),
                ms(percentile(&self.hook, 0.99)),
                ms(percentile(&self.hook, 1.0))
            );
        }
        println!();
        println!("Uploads: reachd's drain (target active -> `reachd uploads --wait` returns) vs a bare `nix copy --to` the tunnel; median (min–max) of {DRAIN_RUNS}");
        println!("| what | reachd | bare nix copy | ratio (bare / reachd; goal >= 0.9) |");
        println!("|---|---|---|---|");
        for (what, reachd, bare) in &self.drain {
            println!(
                "| {what} | {} | {} | {} |",
                summary(reachd),
                summary(bare),
                ratio(median(reachd), median(bare))
            );
        }
        println!();
        println!("The vanish window: builds of new derivations started every 100 ms for 10 s from the Pi's vanishing (link up), alternately with the Pi's cache and without it; extra wait = a build's time less the slowest build without the Pi started within 0.5 s of it (goal: none > 1 s, no failure)");
        println!("| laptop's Nix | fault | caches | builds (failed) | extra wait: worst | median | the Pi's path right after |");
        println!("|---|---|---|---|---|---|---|");
        for v in &self.vanish {
            for w in &v.windows {
                let (fault, caches) = w.what.split_once(", ").unwrap_or((&w.what, ""));
                println!(
                    "| {} | {fault} | {caches} | {} ({}) | {} | {} | {} in {} (+{}) |",
                    v.nix,
                    w.with.count + w.without.count,
                    w.failures().len(),
                    ms(w.worst_extra()),
                    ms(w.median_extra()),
                    w.pi_has_outcome,
                    ms(w.pi_has.took),
                    ms(w.pi_has_extra)
                );
            }
        }
        println!();
        println!("At home, the Pi present: a build of one new derivation (one path no cache has) with the Pi's cache asked first vs without the include; medians of {HOME_BUILDS} each, alternating (goal: within 5 %)");
        for v in &self.vanish {
            println!(
                "- {}: {}; a narinfo the Pi lacks, asked of reachd's cache alone on a new connection: p50 {}, max {}",
                v.nix,
                v.home.line(),
                ms(percentile(&v.miss, 0.5)),
                ms(percentile(&v.miss, 1.0))
            );
        }
        println!();
        println!("how the Nix figures were taken:");
        for l in HOW {
            println!("  - {l}");
        }
    }
}

const HOW: &[&str] = &[
    "reachd runs with the lab's configuration ([host.nix] with upload = true, the lab's spool), \
     the tunnel unit enabled again; the user is untrusted by the laptop's nix-daemon.",
    "away: home connection down, target stopped (so no tunnel socket); the same `nix-store -r` \
     with the user's nix.conf, with NIX_USER_CONF_FILES naming the conf without the include, and \
     naming the old recipe's conf (the laptop's daemon lists the socket in \
     trusted-substituters, as the recipe said).",
    "fetch: a new 100 MiB path built and signed on the Pi each run; first `nix copy --from \
     ssh://root@192.0.2.10?remote-store=local?root=<the Pi's store>` as root in the laptop's \
     namespace with the lab's ssh key into a fresh chroot store (removed after), then the \
     user's `nix-store -r` through reachd's cache; wall time of each command; MiB/s = 100 / \
     median time.",
    "hook: the built reachd-nix-upload run as root with an empty environment but \
     REACHD_SPOOL (a scratch spool), DRV_PATH empty and OUT_PATHS one valid path; wall time \
     from spawn to exit, as Nix waits for it.",
    "drain: a fresh set built by the user while away (the daemon's hook queues it), home up, \
     time from the bench seeing the target active (polled every ~10 ms) to `reachd uploads \
     --wait` exiting (it looks every 0.1 s); then reachd stopped, another fresh set built and \
     `nix copy --to unix:///run/user/1500/rpi-nix-daemon.sock <paths>` timed as the user, \
     reachd started again (it re-uploads nothing: the Pi has them).",
    "vanish window: the lab's scenario 28 measurement (reachd_testkit lab::nix::vanish): the \
     fault is the Pi's switch port down (power loss) or every sshd process SIGSTOPped; builds \
     are `nix-build -E` of trivial new derivations as the user, on their own threads, the \
     ones without the Pi with NIX_USER_CONF_FILES naming the conf without the include; the \
     second cache is an empty file:// cache with Priority 40; the Pi's path is one it built \
     just before, whose derivation the laptop can build too. The current Nix runs the laptop's \
     daemon and the user's commands from the tests/current-nix chroot; the Pi keeps the \
     machine's Nix.",
];
