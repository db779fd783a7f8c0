//! The reload scenario: `systemctl --user reload reachd` (the unit's `ExecReload=`, `reachd
//! reload`: a SIGHUP) applies an edited config to the running agent. A host added shows in `reachd status`
//! while the Pi's target is left alone (same agent, no job, not re-entered); a broken file is
//! refused with its one-line error in reachd's log and the config in force kept; the lab's own
//! config, restored, removes the added host again.

use std::time::Instant;

use serde_json::Value;

use reachd_testkit::lab::expect::{REACHD, TARGET};
use reachd_testkit::lab::user::{reachd_config, TestUser};
use reachd_testkit::lab::{Lab, T};
use reachd_testkit::process::wait_until;

use crate::scenarios::{baseline, secs};

/// A second host: nothing answers for it and its target does not exist, so reachd only
/// follows it (and sends it no job).
const NAS: &str = "\n[[host]]\nname = \"nas\"\nhostname = \"nas.local\"\n";

/// What must not change across a reload: the agent's process and the Pi's target.
#[derive(Debug, PartialEq)]
struct Untouched {
    main_pid: String,
    /// When the target last became active (monotonic µs): a restart would move it.
    target_entered: String,
    /// Jobs reachd sent for it, from `reachd status --json`.
    jobs_sent: u64,
}

fn untouched(u: &TestUser) -> Result<Untouched, String> {
    let units = u.units(&[REACHD])?;
    let entered = u.systemctl(&[
        "show",
        "-p",
        "ActiveEnterTimestampMonotonic",
        "--value",
        TARGET,
    ])?;
    let rpi = hosts(u)?
        .into_iter()
        .find(|h| h["name"] == "rpi")
        .ok_or("no host rpi in reachd status --json")?;
    Ok(Untouched {
        main_pid: units[REACHD]["MainPID"].clone(),
        target_entered: entered.stdout.trim().to_string(),
        jobs_sent: rpi["jobs_sent"]
            .as_u64()
            .ok_or_else(|| format!("no jobs_sent in {rpi}"))?,
    })
}

/// The hosts of `reachd status --json`.
fn hosts(u: &TestUser) -> Result<Vec<Value>, String> {
    let out = u.reachd(&["status", "--json"])?;
    if !out.success() {
        return Err(format!("reachd status --json: {}", out.stderr.trim()));
    }
    let status: Value = serde_json::from_str(out.stdout.trim())
        .map_err(|e| format!("reachd status --json printed {:?}: {e}", out.stdout))?;
    status["hosts"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("no hosts in {status}"))
}

/// Writes `config`, reloads reachd, and waits until `reachd status` lists exactly `names`.
fn reload_to(u: &TestUser, config: &str, names: &[&str]) -> Result<std::time::Duration, String> {
    u.write_reachd_config(config)?;
    let started = Instant::now();
    u.systemctl(&["reload", REACHD])?;
    wait_until(T, &format!("reachd status listing {names:?}"), || {
        let listed: Vec<String> = hosts(u)?
            .iter()
            .map(|h| h["name"].as_str().unwrap_or_default().to_string())
            .collect();
        Ok((listed == names).then_some(()))
    })?;
    Ok(started.elapsed())
}

/// `systemctl --user reload reachd` adds a host, refuses a broken file, and removes the host,
/// without touching the Pi's target.
pub fn reload(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let u = lab.user();
    let before = untouched(u)?;
    let mark = u.monitor_mark();

    let added = reload_to(u, &format!("{}{NAS}", reachd_config()), &["rpi", "nas"])?;
    let nas = hosts(u)?
        .into_iter()
        .find(|h| h["name"] == "nas")
        .ok_or("nas vanished")?;
    if nas["target"] != "nas-accessible.target" || nas["reachable"] != false {
        return Err(format!("the added host is not as configured: {nas}"));
    }

    let log_from = u.reachd_log().len();
    u.write_reachd_config(&format!("{}{NAS}hostnme = \"nas\"\n", reachd_config()))?;
    u.systemctl(&["reload", REACHD])?;
    let refusal = wait_until(T, "the refusal in reachd's log", || {
        Ok(u.reachd_log()[log_from..]
            .lines()
            .find(|l| l.contains("reload refused"))
            .map(str::to_string))
    })?;
    if !refusal.contains("config.toml:") || !refusal.contains("hostnme") {
        return Err(format!(
            "the refusal does not name the file, line and key: {refusal}"
        ));
    }
    let listed: Vec<Value> = hosts(u)?;
    if listed.len() != 2 {
        return Err(format!(
            "the config in force changed on a broken file: {listed:?}"
        ));
    }

    let removed = reload_to(u, &reachd_config(), &["rpi"])?;
    let after = untouched(u)?;
    if after != before {
        return Err(format!(
            "the reloads touched reachd or the Pi's target: before {before:?}, after {after:?}"
        ));
    }
    let jobs = u
        .monitor_since(mark)
        .iter()
        .filter(|m| m["member"] == "JobNew" && m["payload"]["data"][2] == TARGET)
        .count();
    if jobs != 0 {
        return Err(format!("{jobs} jobs for {TARGET} during the reloads"));
    }
    lab.expect_up(T, "after the reloads")?;
    Ok(format!(
        "nas listed {} after `reload`, removed {} after; a broken file refused ({}); same \
         MainPID {}, {TARGET} not re-entered, no job",
        secs(added),
        secs(removed),
        refusal.trim(),
        after.main_pid
    ))
}
