//! The vanish window (docs/nix-vanish-window.md; measured by reachd_testkit's lab::nix::vanish):
//! the Pi goes while the laptop's link stays up, its power lost or its sshd frozen, and builds
//! started from that moment on, one every 100 ms for 10 s, alternately with the Pi's cache and
//! without it, must all succeed, none with the Pi waiting more than a second longer than those
//! without it beside it; with the cache as the only substituter and with a second one after
//! it. A path the Pi has, asked for right after, is built instead. At home, the cost of asking
//! the Pi first is measured and printed.

use std::time::Duration;

use reachd_testkit::lab::nix::vanish::{Fault, ALONE, WITH_STAND_IN};
use reachd_testkit::lab::{secs, Lab};

use crate::scenarios::baseline;

/// The promise: no build in the window waits longer than this beyond the slowest of the same
/// builds without the Pi started near it.
const EXTRA: Duration = Duration::from_secs(1);
/// Builds at home, with the include and without, for the cost of asking the Pi first.
const HOME_BUILDS: usize = 10;

pub fn nix_vanish_window(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.pi_cache_back_in_use()?;
    // Printed, not judged: a figure for docs/performance.md.
    let mut report = vec![lab.home_cost(HOME_BUILDS)?.line()];
    for fault in Fault::ALL {
        for caches in [ALONE, WITH_STAND_IN] {
            let window = lab.vanish_window(fault, caches)?;
            let line = window.line();
            eprintln!("lab: 28: {line}");
            let failures = window.failures();
            if let Some(first) = failures.first() {
                return Err(format!(
                    "{line}: {} builds failed, the first {first}",
                    failures.len()
                ));
            }
            if let Some(why) = &window.pi_has.failure {
                return Err(format!("{line}: the Pi's path failed: {why}"));
            }
            if window.worst_extra() > EXTRA || window.pi_has_extra > EXTRA {
                return Err(format!("{line}: more than {} extra", secs(EXTRA)));
            }
            window.back?;
            report.push(line);
        }
    }
    Ok(report.join("; "))
}
