//! What `reachd uploads` shows and waits for: the builds the post-build hook recorded and not
//! yet uploaded, read from the spool itself, so that it works whether or not the agent runs.

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use super::spool::{Queued, Spool, SpoolError};

/// The spool as one user's uploading hosts see it.
#[derive(Debug)]
pub struct Listing {
    /// Builds recorded and not yet claimed by an agent.
    pub incoming: usize,
    /// Each uploading host's queue, oldest first.
    pub hosts: Vec<(String, Vec<Queued>)>,
}

impl Listing {
    /// Reads the spool at `dir` for `hosts`.
    pub fn read(dir: &Path, hosts: &[String]) -> Result<Listing, SpoolError> {
        let spool = Spool::open(dir)?;
        let mut listing = Listing {
            incoming: spool.incoming_len()?,
            hosts: Vec::with_capacity(hosts.len()),
        };
        for host in hosts {
            let mut queue = Vec::new();
            for id in spool.pending(host)? {
                // An entry uploaded meanwhile is simply gone.
                queue.extend(spool.load(host, &id)?);
            }
            listing.hosts.push((host.clone(), queue));
        }
        Ok(listing)
    }
}

/// Builds still to upload to any of `hosts` (unclaimed ones count once), from the directory
/// listings alone: what `reachd uploads --wait` looks at twice a second.
pub fn waiting(dir: &Path, hosts: &[String]) -> Result<usize, SpoolError> {
    let spool = Spool::open(dir)?;
    let mut waiting = spool.incoming_len()?;
    for host in hosts {
        waiting += spool.pending(host)?.len();
    }
    Ok(waiting)
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.incoming > 0 {
            writeln!(
                f,
                "{} build(s) recorded, not yet taken by an agent",
                self.incoming
            )?;
        }
        let now = SystemTime::now();
        for (host, queue) in &self.hosts {
            let paths: usize = queue.iter().map(|q| q.entry.paths().count()).sum();
            writeln!(
                f,
                "{host}: {} build(s), {paths} path(s) waiting",
                queue.len()
            )?;
            for queued in queue {
                let paths: Vec<&str> = queued.entry.paths().map(|p| p.as_str()).collect();
                writeln!(f, "  {}", paths.join(" "))?;
                if let Some(retry) = &queued.retry {
                    let wait = retry.next_try.duration_since(now).unwrap_or_default();
                    writeln!(
                        f,
                        "    failed {} time(s), next try in {} s: {}",
                        retry.attempts,
                        wait.as_secs(),
                        retry.error
                    )?;
                }
            }
        }
        Ok(())
    }
}
