//! Logging: to the journal when reachd runs as a systemd service (its stderr is then the
//! journal, and the journal keeps the fields: host, from, to, reason...), else to stderr as
//! text. `RUST_LOG` filters as usual; the default, `info`, is one line per decision and job.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. systemd sets `JOURNAL_STREAM` for a service whose stderr
/// goes to the journal; only then is the journald layer tried, and where it fails (no journal
/// socket: containers, test labs) stderr serves.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    match journald {
        Some(journald) => registry
            .with(journald.with_syslog_identifier("reachd".into()))
            .init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .init(),
    }
}
