//! Cleaning up from what is on disk alone, so that a run can undo what an earlier one left after
//! dying halfway (SIGKILL, a power cut, the watchdog): recorded PIDs, the lab's cgroups, `rl-`
//! namespaces, and markers in DIR/state for what the lab created outside DIR.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab::on_disk::{state, unmount_below};
use crate::lab::{dir, io_err, HOOK, LAB_CGROUP, OLD_SCRIPT, PREFIX, SYSTEM_BUS};
use crate::netns;
use crate::process::{kill_cgroup_tree, Tracker};

/// The machine's avahi runtime directory, which the benchmark's laptop-side avahi uses (and
/// creates, if the machine has none) so that nss-mdns finds its socket.
pub const RUN_AVAHI: &str = "/run/avahi-daemon";

/// Ends a run that hangs despite the deadlines: after `budget`, cleans up from the on-disk
/// records, calls `report` (what the run prints when it fails) and exits with status 1.
pub fn watchdog(budget: Duration, what: &'static str, report: fn()) {
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        eprintln!(
            "{what}: still running after {} s: cleaning up and giving up",
            budget.as_secs()
        );
        recover();
        report();
        std::process::exit(1);
    });
}

/// Records that the lab created something outside DIR that recovery must undo.
pub fn mark(name: &str, content: &str) -> Result<(), String> {
    fs::write(state(name), content).map_err(|e| io_err(format!("marker {name}"), e))
}

pub fn marked(name: &str) -> Option<String> {
    fs::read_to_string(state(name)).ok()
}

/// Removes whatever the lab (this run or an earlier one) left behind, using only what is on
/// disk: recorded PIDs, the lab's cgroups, `rl-` namespaces, markers in DIR/state. Idempotent.
pub fn recover() {
    if let Ok(t) = Tracker::open(&state("pids")) {
        t.stop_recorded();
    }
    crate::lab::user::recover();
    kill_cgroup_tree(Path::new(LAB_CGROUP));
    if marked("hook").is_some() {
        let _ = fs::remove_file(HOOK);
    }
    if marked("hook-backup").is_some() {
        let _ = fs::copy(state("hook.orig"), HOOK);
    }
    remove_old_way();
    if marked("system-bus").is_some() {
        let _ = fs::remove_file(SYSTEM_BUS);
    }
    if marked("run-nm").is_some() {
        let _ = fs::remove_dir("/run/NetworkManager");
    }
    if marked("run-sshd").is_some() {
        let _ = fs::remove_dir("/run/sshd");
    }
    netns::remove_stale(PREFIX);
    unmount_below(dir());
    keep_logs();
    let _ = fs::remove_dir_all(dir());
}

/// Removes what the benchmark installed for the old way, by its markers: the dispatcher script
/// and the machine's /run/avahi-daemon (only if the benchmark created it).
pub fn remove_old_way() {
    if marked("old-script").is_some() {
        let _ = fs::remove_file(OLD_SCRIPT);
        let _ = fs::remove_file(state("old-script"));
    }
    if marked("run-avahi").is_some() {
        let _ = fs::remove_dir_all(RUN_AVAHI);
        let _ = fs::remove_file(state("run-avahi"));
    }
}

/// With `REACHD_LAB_LOGS=DIR` in the environment, copies the daemons' logs and reachd's there
/// before the lab's files are removed (for debugging a failed run).
fn keep_logs() {
    let Some(to) = std::env::var_os("REACHD_LAB_LOGS") else {
        return;
    };
    let to = PathBuf::from(to);
    let _ = fs::create_dir_all(&to);
    let mut files: Vec<PathBuf> = fs::read_dir(dir().join("logs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.push(dir().join("home/reachd.log"));
    for f in files {
        if let Some(name) = f.file_name() {
            let _ = fs::copy(&f, to.join(name));
        }
    }
}
