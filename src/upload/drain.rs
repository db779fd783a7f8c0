//! One run over the upload spool for the agent: claim the builds the post-build hook recorded
//! (each uploading host gets every one), then either only count a host's queue (while it is
//! away) or upload one batch of it ([`upload_batch`]). The agent decides which and when
//! ([`reconcile::upload_timing`](crate::reconcile::upload_timing)); dropping a run's future stops it, `nix
//! copy` included, and the queue stays as it was before the step under way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;

use crate::error::{chain, Chain};
use crate::reconcile::{BatchOutcome, Run};

use super::batch::{upload_batch, Limits, Nix};
use super::spool::{Spool, SpoolError};

/// Paths per batch: enough to amortise a `nix copy`, few enough to report progress often.
const BATCH_PATHS: usize = 200;
/// The longest one batch may take (a large path over a slow link).
const BATCH_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The spool as the agent drains it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    spool_dir: PathBuf,
    /// Every host that uploads: a claim gives each of them every build.
    hosts: Arc<[String]>,
    nix: Nix,
    /// Claims move files between directories: one at a time.
    claiming: Arc<Mutex<()>>,
}

impl Drain {
    /// The spool in `spool_dir` drained for `hosts` with `nix`.
    pub fn new(spool_dir: PathBuf, hosts: Vec<String>, nix: Nix) -> Self {
        Drain {
            spool_dir,
            hosts: hosts.into(),
            nix,
            claiming: Arc::new(Mutex::new(())),
        }
    }

    /// The same drain for another spool, other hosts or another Nix (a reload): runs under way
    /// with this one and the new one's runs still claim one at a time.
    pub fn reconfigured(&self, spool_dir: PathBuf, hosts: Vec<String>, nix: Nix) -> Self {
        Drain {
            spool_dir,
            hosts: hosts.into(),
            nix,
            claiming: self.claiming.clone(),
        }
    }

    /// Claims new builds, then counts `host`'s queue or uploads a batch of it to `store`.
    pub async fn run(&self, host: &str, store: &str, run: Run) -> BatchOutcome {
        let spool = match self.claim().await {
            Ok(spool) => spool,
            Err(err) => {
                return BatchOutcome {
                    error: Some(err),
                    ..BatchOutcome::default()
                }
            }
        };
        match run {
            Run::Count => count(&spool, host).await,
            Run::Upload => {
                let limits = Limits {
                    max_paths: BATCH_PATHS,
                    deadline: Instant::now() + BATCH_DEADLINE,
                };
                let report = upload_batch(&spool, host, &self.nix, store, limits).await;
                for rejected in &report.rejected {
                    warn!(host, "upload spool: {}", Chain(rejected));
                }
                BatchOutcome {
                    pending: u32::try_from(report.pending).unwrap_or(u32::MAX),
                    copied: report.copied,
                    lost: report.lost.len(),
                    done: report.done.len(),
                    error: report.failure.map(|f| chain(&f.error)),
                    next_try: report.next_try.map(instant_of),
                }
            }
        }
    }

    async fn claim(&self) -> Result<Spool, String> {
        let _one_at_a_time = self.claiming.lock().await;
        let (dir, hosts) = (self.spool_dir.clone(), self.hosts.clone());
        let claimed = tokio::task::spawn_blocking(move || -> Result<Spool, SpoolError> {
            let spool = Spool::open(dir)?;
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let report = spool.claim(&hosts)?;
            for rejected in &report.rejected {
                warn!("upload spool: {}", Chain(rejected));
            }
            Ok(spool)
        })
        .await;
        match claimed {
            Ok(result) => result.map_err(|err| chain(&err)),
            Err(err) => Err(format!("claiming new builds: {err}")),
        }
    }
}

async fn count(spool: &Spool, host: &str) -> BatchOutcome {
    let (spool, name) = (spool.clone(), host.to_string());
    let pending = tokio::task::spawn_blocking(move || spool.pending(&name)).await;
    match pending {
        Ok(Ok(ids)) => BatchOutcome {
            pending: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ..BatchOutcome::default()
        },
        Ok(Err(err)) => BatchOutcome {
            error: Some(chain(&err)),
            ..BatchOutcome::default()
        },
        Err(err) => BatchOutcome {
            error: Some(format!("counting the queue: {err}")),
            ..BatchOutcome::default()
        },
    }
}

/// The monotonic instant of a wall-clock time (now, if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}
