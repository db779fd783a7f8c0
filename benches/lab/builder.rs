//! The remote-builder part of the bench (docs/remote-builder.md): one `nix-build` of a batch of
//! [`BATCH`] new derivations, each a second of work, as the lab user. At home, with the Pi as
//! root's remote builder and reachd's `[host.builder]`, against the same batch asking no builder
//! (`--builders ''`); in the café, with reachd's switch, with no builder configured, and with
//! root's static list and no reachd (the user's nix.conf without reachd's fragment); and at
//! home with the Pi gone (its power lost), reachd's switch against root's list alone: what
//! users see today, paying the hook's ssh connect timeout, 1 s in the lab, where a machine
//! without `ConnectTimeout` waits for the kernel's TCP timeout.

use std::time::Duration;

use reachd_testkit::lab::nix::{nonce, user_conf_without_include, NixRun};
use reachd_testkit::lab::{Lab, CAFE_UUID, HOME_UUID, T};

use crate::measure::{median, ms};

/// Derivations per batch.
const BATCH: usize = 8;
/// Batches per set-up.
const RUNS: usize = 3;
const BATCH_TIMEOUT: Duration = Duration::from_secs(300);
/// The arguments of a batch that asks no builder.
const NO_BUILDERS: [&str; 2] = ["--builders", ""];

/// What the part measured: (set-up, the batch's wall times).
pub struct BuilderReport {
    pub rows: Vec<(&'static str, Vec<Duration>)>,
}

pub fn run(lab: &mut Lab) -> Result<BuilderReport, String> {
    lab.start_pi_avahi()?;
    let user = lab.user();
    user.stop_reachd()?;
    user.configure_reachd_lab()?;
    user.systemctl(&["enable", "rpi-nix-tunnel.service"])?;
    user.start_reachd()?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.pi_cache_back_in_use()?;
    lab.use_pi_builder(true)?;
    lab.expect_builders_off(false, T)?;
    let mut rows = Vec::new();
    eprintln!("bench: builder: {RUNS} batches of {BATCH} at home, with the Pi and without");
    rows.push(("home, the Pi building", batches(lab, &[], false)?));
    rows.push(("home, no builder", batches(lab, &NO_BUILDERS, false)?));

    lab.nmcli_con("down", HOME_UUID)?;
    lab.nmcli_con("up", CAFE_UUID)?;
    lab.expect_builders_off(true, T)?;
    eprintln!("bench: builder: {RUNS} batches of {BATCH} in the café, three set-ups");
    rows.push(("café, reachd's switch", batches(lab, &[], false)?));
    rows.push(("café, no builder", batches(lab, &NO_BUILDERS, false)?));
    rows.push(("café, root's list, no reachd", batches(lab, &[], true)?));
    lab.nmcli_con("down", CAFE_UUID)?;
    lab.nmcli_con("up", HOME_UUID)?;
    lab.expect_builders_off(false, T)?;

    // The Pi loses power, the link stays up: packets to it are dropped, so an attempt to reach
    // it costs the connect timeout, as a vanished Pi (or any away network that drops them)
    // costs users today.
    lab.pi_port(false)?;
    let gone = lab.expect_builders_off(true, T);
    let rows_gone = gone.and_then(|()| {
        eprintln!("bench: builder: {RUNS} batches of {BATCH} with the Pi gone, two set-ups");
        Ok([
            ("home, Pi gone, reachd's switch", batches(lab, &[], false)?),
            ("home, Pi gone, root's list alone", batches(lab, &[], true)?),
        ])
    });
    lab.pi_port(true)?;
    rows.extend(rows_gone?);
    lab.use_pi_builder(false)?;
    Ok(BuilderReport { rows })
}

/// [`RUNS`] batches, with `extra` arguments; `without_reachd`: the user's nix.conf without
/// reachd's fragment.
fn batches(lab: &Lab, extra: &[&str], without_reachd: bool) -> Result<Vec<Duration>, String> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let tag = nonce();
        let derivations: Vec<String> = (0..BATCH)
            .map(|i| {
                format!(
                    "(derivation {{ name = \"batch-{tag}-{i}\"; system = builtins.currentSystem; \
                     builder = \"/bin/sh\"; args = [ \"-c\" \"/bin/sleep 1; echo {i} > $out\" ]; }})"
                )
            })
            .collect();
        let expr = format!("[ {} ]", derivations.join(" "));
        let mut args = vec!["nix-build", "--no-out-link"];
        args.extend(extra);
        args.extend(["-E", &expr]);
        let mut spawn = lab.user_nix(&args);
        if without_reachd {
            spawn = spawn.env("NIX_USER_CONF_FILES", user_conf_without_include());
        }
        let run = NixRun::of(spawn, BATCH_TIMEOUT)?;
        if run.code != 0 {
            return Err(format!("a batch failed: {}", run.summary()));
        }
        times.push(run.elapsed);
    }
    Ok(times)
}

impl BuilderReport {
    pub fn print(&self) {
        println!();
        println!(
            "Remote builder: one nix-build of {BATCH} new derivations of 1 s each, as the lab user (machine's Nix)"
        );
        println!("  {:<32} {:>10} {:>22}", "set-up", "median", "all runs");
        for (what, times) in &self.rows {
            let all: Vec<String> = times.iter().map(|t| ms(*t)).collect();
            let samples: Vec<Option<Duration>> = times.iter().copied().map(Some).collect();
            let mid = median(&samples).map_or("-".to_string(), ms);
            println!("  {what:<32} {mid:>10} {:>22}", all.join(" "));
        }
        println!(
            "  ({RUNS} batches each; the Pi is root's builder with 1 job, the laptop builds 1 at a \
             time; the hook's ssh has ConnectTimeout=1; wall time of nix-build)"
        );
    }
}
