//! How `reachd status` shows the agent's hosts to a person: a table of every host, one host in
//! detail (`reachd status HOST`), and one line per change for `--watch`. `--json` prints the
//! records themselves and is not made here. Pure text from [`HostStatus`] and the time now, so
//! that what a user reads is tested without an agent.

use std::fmt::Write as _;

use crate::status::HostStatus;

/// Every host as an aligned table with a header (the target's state only: its name is in the
/// detail), then one line per host whose uploads fail.
pub fn table(hosts: &[HostStatus], now_micros: u64) -> String {
    let header = [
        "HOST", "STATE", "SINCE", "ADDRESS", "TARGET", "NIX", "UPLOADS", "WHY",
    ];
    let rows: Vec<[String; 8]> = hosts
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                h.state.clone(),
                ago(h.since, now_micros),
                or_dash(&h.address).to_string(),
                h.target_state.clone(),
                nix_column(h),
                uploads_column(h),
                h.reason.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(|title| title.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(String::from);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for h in hosts.iter().filter(|h| !h.upload_error.is_empty()) {
        let _ = writeln!(out, "{}: uploads failing: {}", h.name, h.upload_error);
    }
    out
}

/// One host in full: a title line, then one labelled line per part the host has.
pub fn detail(h: &HostStatus, now_micros: u64) -> String {
    let mut out = format!(
        "{} ({}): {} since {}: {}\n",
        h.name,
        h.hostname,
        h.state,
        ago(h.since, now_micros),
        h.reason
    );
    let mut line = |label: &str, text: &str| {
        let _ = writeln!(out, "  {label:<13}{text}");
    };
    line("address", or_dash(&h.address));
    let job = match (h.last_job.as_str(), h.jobs_sent) {
        ("", _) => "no job sent yet".to_string(),
        (last, 1) => format!("last job {last}, 1 sent"),
        (last, sent) => format!("last job {last}, {sent} sent"),
    };
    line(
        "target",
        &format!("{} {} ({job})", h.target, h.target_state),
    );
    if !h.nix_reason.is_empty() {
        line("nix cache", &h.nix_reason);
    }
    if !h.builder_reason.is_empty() {
        line("nix builder", &h.builder_reason);
    }
    if has_uploads(h) {
        line("uploads", &format!("{} waiting", h.uploads_pending));
        line("last upload", or_dash(&h.last_upload));
    }
    if !h.upload_error.is_empty() {
        line("upload error", &h.upload_error);
    }
    out
}

/// A host after a change, on one line (`reachd status --watch`).
pub fn change_line(h: &HostStatus) -> String {
    let mut line = format!(
        "{}: {} ({}); target {} {}",
        h.name, h.state, h.reason, h.target, h.target_state
    );
    if !h.nix_reason.is_empty() {
        let _ = write!(line, "; nix: {}", h.nix_reason);
    }
    if !h.builder_reason.is_empty() {
        let _ = write!(line, "; builder: {}", h.builder_reason);
    }
    if has_uploads(h) {
        let _ = write!(line, "; uploads: {}", uploads_column(h));
    }
    if !h.upload_error.is_empty() {
        let _ = write!(line, ": {}", h.upload_error);
    }
    line
}

/// How long ago `since` was, in the largest units that matter: "12 s ago", "5 min ago",
/// "2 h 5 min ago", "3 days ago". "-" for no time; "just now" for a time ahead of the clock.
pub fn ago(since_micros: u64, now_micros: u64) -> String {
    if since_micros == 0 {
        return "-".into();
    }
    let Some(seconds) = now_micros.checked_sub(since_micros).map(|d| d / 1_000_000) else {
        return "just now".into();
    };
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => match (seconds / 3600, seconds % 3600 / 60) {
            (hours, 0) => format!("{hours} h ago"),
            (hours, minutes) => format!("{hours} h {minutes} min ago"),
        },
        _ => match seconds / 86400 {
            1 => "1 day ago".into(),
            days => format!("{days} days ago"),
        },
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

/// What Nix uses of the host now: "cache", "builder", "cache+builder"; "not used" when it has
/// either but neither is used; "-" for a host with neither.
fn nix_column(h: &HostStatus) -> String {
    let used: Vec<&str> = [("cache", h.nix_in_use), ("builder", h.builder_in_use)]
        .into_iter()
        .filter_map(|(what, in_use)| in_use.then_some(what))
        .collect();
    match (
        h.nix_reason.is_empty() && h.builder_reason.is_empty(),
        used.is_empty(),
    ) {
        (true, _) => "-".into(),
        (false, true) => "not used".into(),
        (false, false) => used.join("+"),
    }
}

/// Whether the host shows any sign of uploads (the record does not say whether it has them).
fn has_uploads(h: &HostStatus) -> bool {
    h.uploads_pending > 0 || !h.last_upload.is_empty() || !h.upload_error.is_empty()
}

/// "3 waiting", "3 waiting, failing", "none waiting", or "-" for a host without uploads.
fn uploads_column(h: &HostStatus) -> String {
    if !has_uploads(h) {
        return "-".into();
    }
    let waiting = match h.uploads_pending {
        0 => "none waiting".to_string(),
        n => format!("{n} waiting"),
    };
    if h.upload_error.is_empty() {
        waiting
    } else {
        waiting + ", failing"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000_000;
    const MINUTE: u64 = 60_000_000;

    fn pi() -> HostStatus {
        HostStatus {
            reachable: true,
            state: "reachable".into(),
            address: "192.0.2.10".into(),
            reason: "answered at 192.0.2.10".into(),
            since: NOW - 5 * MINUTE,
            target_state: "active".into(),
            last_job: "start: done".into(),
            jobs_sent: 1,
            nix_in_use: true,
            nix_reason: "in use".into(),
            uploads_pending: 3,
            last_upload: "2 builds done, 5 paths copied".into(),
            ..HostStatus::starting("rpi")
        }
    }

    fn nas() -> HostStatus {
        HostStatus {
            state: "unreachable".into(),
            reason: "network disconnected".into(),
            since: NOW - 90 * MINUTE,
            target_state: "inactive".into(),
            ..HostStatus::starting("nas")
        }
    }

    #[test]
    fn the_table_has_a_header_and_aligned_columns() {
        assert_eq!(
            table(&[pi(), nas()], NOW),
            "HOST  STATE        SINCE           ADDRESS     TARGET    NIX    UPLOADS    WHY\n\
             rpi   reachable    5 min ago       192.0.2.10  active    cache  3 waiting  answered at 192.0.2.10\n\
             nas   unreachable  1 h 30 min ago  -           inactive  -      -          network disconnected\n"
        );
    }

    #[test]
    fn the_nix_column_names_what_nix_uses() {
        let mut host = pi();
        host.builder_reason = "in use".into();
        host.builder_in_use = true;
        assert_eq!(nix_column(&host), "cache+builder");
        host.nix_in_use = false;
        assert_eq!(nix_column(&host), "builder");
        host.builder_in_use = false;
        host.builder_reason = "host unreachable".into();
        assert_eq!(nix_column(&host), "not used");
        assert!(detail(&host, NOW).contains("\n  nix builder  host unreachable\n"));
        assert!(change_line(&host).contains("; builder: host unreachable"));
        assert_eq!(nix_column(&nas()), "-");
    }

    #[test]
    fn failing_uploads_are_named_under_the_table() {
        let mut host = pi();
        host.upload_error = "cannot add path: lacks a valid signature".into();
        let text = table(&[host], NOW);
        assert!(text.contains("3 waiting, failing"), "{text}");
        assert!(
            text.ends_with("rpi: uploads failing: cannot add path: lacks a valid signature\n"),
            "{text}"
        );
    }

    #[test]
    fn the_detail_shows_every_part_the_host_has() {
        assert_eq!(
            detail(&pi(), NOW),
            "rpi (rpi.local): reachable since 5 min ago: answered at 192.0.2.10\n\
             \x20 address      192.0.2.10\n\
             \x20 target       rpi-accessible.target active (last job start: done, 1 sent)\n\
             \x20 nix cache    in use\n\
             \x20 uploads      3 waiting\n\
             \x20 last upload  2 builds done, 5 paths copied\n"
        );
        assert_eq!(
            detail(&nas(), NOW),
            "nas (nas.local): unreachable since 1 h 30 min ago: network disconnected\n\
             \x20 address      -\n\
             \x20 target       nas-accessible.target inactive (no job sent yet)\n"
        );
    }

    #[test]
    fn a_change_is_one_line() {
        let mut host = pi();
        host.upload_error = "cannot connect".into();
        assert_eq!(
            change_line(&host),
            "rpi: reachable (answered at 192.0.2.10); target rpi-accessible.target active; \
             nix: in use; uploads: 3 waiting, failing: cannot connect"
        );
        assert_eq!(
            change_line(&nas()),
            "nas: unreachable (network disconnected); target nas-accessible.target inactive"
        );
    }

    #[test]
    fn times_are_given_in_the_units_that_matter() {
        let s = 1_000_000;
        for (before, text) in [
            (0, "0 s ago"),
            (59 * s, "59 s ago"),
            (60 * s, "1 min ago"),
            (3599 * s, "59 min ago"),
            (3600 * s, "1 h ago"),
            (3660 * s, "1 h 1 min ago"),
            (86_400 * s, "1 day ago"),
            (3 * 86_400 * s + 5, "3 days ago"),
        ] {
            assert_eq!(ago(NOW - before, NOW), text, "{before} µs before");
        }
        assert_eq!(ago(0, NOW), "-", "no time");
        assert_eq!(ago(NOW + s, NOW), "just now", "a clock that went back");
    }
}
