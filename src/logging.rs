//! Logging: to the journal when there is one (what a user unit wants), else to stderr.
//! `RUST_LOG` filters as usual; the default is `info`, which is one line per decision and job.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. The journald layer is used when the journal's socket
/// answers and `REACHD_LOG` is not `stderr`; it fails where there is no journal (containers,
/// test labs), and then stderr serves.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let want_journal = std::env::var("REACHD_LOG").map_or(true, |v| v != "stderr");
    match want_journal.then(tracing_journald::layer) {
        Some(Ok(journald)) => registry.with(journald.with_syslog_identifier("reachd".into())).init(),
        _ => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
            .init(),
    }
}
