//! One upload batch: a host's queued builds uploaded to its store with `nix copy`, one bounded
//! batch per call, so that the agent decides when (while the host is reachable) and how often (the report
//! says when calling again can do anything) and can stop at any moment by dropping the future.
//!
//! A batch: the oldest due entries; derivation-only entries (Nix 2.8) resolved to their outputs;
//! paths no longer valid locally (collected since the build) reported lost and dropped; the rest
//! copied. Success removes the entries. A failure is one of two kinds, told apart by pinging the
//! store: the store is unreachable (the whole queue waits, entries untouched), or the store
//! answers and refused something (each entry of the batch records the error and backs off, and
//! is then tried alone, so one bad path cannot hold back the others). Nothing is ever dropped
//! for failing. Nix runs as a child process with explicit arguments (never a shell) and
//! `kill_on_drop` and dies with reachd, with the environment given in [`Nix`].

use std::collections::{BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::{timeout_at, Instant};

use crate::error::chain;
use crate::reconcile::upload_timing::{
    after_failure, is_due, BatchEnd, ENTRY_BACKOFF, QUEUE_BACKOFF,
};
use crate::store_path::StorePath;
use crate::upload::nix_bin::{self, NixNotFound};
use crate::upload::spool::{one_line, EntryId, Queued, Retry, Spool, SpoolError};

/// The longest a ping of the store (after a failed copy) may take, within the batch's deadline.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run Nix: where its programs are and what to add to their environment. The default
/// runs `nix` and `nix-store` from the first directory of `PATH`, or else of the places the
/// installers use, that holds them ([`nix_bin::find`], at each batch), with the agent's
/// environment, i.e. the user's Nix and its daemon. Tests point it at other stores
/// (`NIX_REMOTE`, `NIX_CONF_DIR`...) here, never by changing the process's own environment.
#[derive(Debug, Clone, Default)]
pub struct Nix {
    /// `[nix] bin_dir`: the one directory to run them from; `None`: found by [`nix_bin::find`].
    bin_dir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Nix {
    /// Runs the programs in `dir` (`[nix] bin_dir`), or, with `None`, where [`nix_bin::find`]
    /// finds them.
    pub fn in_dir(dir: Option<PathBuf>) -> Nix {
        Nix {
            bin_dir: dir,
            ..Nix::default()
        }
    }

    /// This Nix with its programs found: the directory it will run them from is checked or
    /// looked for now, so that a Nix installed or moved meanwhile is found at the next batch.
    fn found(&self) -> Result<Nix, NixNotFound> {
        let dir = nix_bin::find(self.bin_dir.as_deref(), &nix_bin::Places::from_env())?;
        Ok(Nix {
            bin_dir: Some(dir),
            env: self.env.clone(),
        })
    }

    /// Sets a variable in the environment of every Nix command.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Nix {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    fn command(&self, program: &str) -> Command {
        let program = match &self.bin_dir {
            Some(dir) => dir.join(program).into_os_string(),
            None => program.into(),
        };
        let mut command = Command::new(program);
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls (prctl,
        // getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || die_with(parent));
        }
        command
    }

    /// `nix` with the new CLI enabled, whatever nix.conf says (Nix 2.8 needs it for `copy`).
    fn nix(&self) -> Command {
        let mut command = self.command("nix");
        command.args(["--extra-experimental-features", "nix-command"]);
        command
    }
}

/// Why (part of) a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    NotFound(#[from] NixNotFound),
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {message}")]
    Nix {
        command: String,
        status: ExitStatus,
        message: String,
    },
    #[error("`{command}` did not finish before the deadline: stopped")]
    Timeout { command: String },
    #[error("`{command}` printed {line:?}, not a store path")]
    Output { command: String, line: String },
    #[error("the spool task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Which part of the queue a failure holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The store could not be reached (or the local Nix failed): the whole queue waits until
    /// [`BatchReport::next_try`]; the entries are not marked.
    Queue,
    /// The store answered but the copy failed: each entry of the batch keeps the error and its
    /// own backoff, and is tried alone next time.
    Entries,
}

/// A failed batch: what failed, for whom, and how many times in a row.
#[derive(Debug)]
pub struct Failure {
    pub scope: Scope,
    pub error: UploadError,
    /// Consecutive failures of the queue (scope `Queue`) or of the batch's entries (the most).
    pub attempts: u32,
}

/// What one call of [`upload_batch`] did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// The entries this batch took, oldest first.
    pub entries: Vec<EntryId>,
    /// Entries removed from the queue: uploaded, or with nothing left to upload.
    pub done: Vec<EntryId>,
    /// Paths handed to `nix copy`.
    pub paths: usize,
    /// How many of those Nix transferred (the others were in the store already).
    pub copied: usize,
    /// Paths no longer valid in the local store (garbage-collected since the build): dropped.
    pub lost: Vec<StorePath>,
    /// Queue files that were not valid entries: removed (each error names its file).
    pub rejected: Vec<SpoolError>,
    pub failure: Option<Failure>,
    /// Entries still queued after this batch.
    pub pending: usize,
    /// When a call can next do something: `None` once the queue is empty; now or earlier to go
    /// on at once; otherwise the end of a backoff. Nothing here sleeps: the caller waits.
    pub next_try: Option<SystemTime>,
}

/// How much one batch may do: about `max_paths` paths, until `deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_paths: usize,
    pub deadline: Instant,
}

/// Uploads the oldest due entries of `host`'s queue in `spool` (at most about `limits.max_paths`
/// paths) to `to_store` (a Nix store URI such as `unix:///run/user/1000/rpi-nix-daemon.sock`
/// or `ssh-ng://pi`), giving up at `deadline`. Call [`Spool::claim`] first so that new builds
/// are in the queue. It does not wait for the queue's backoff ([`BatchReport::next_try`] after
/// a [`Scope::Queue`] failure): the caller may try earlier, e.g. when the host has just become
/// reachable; entries that the store refused keep their own backoff. Dropping the future stops
/// it: Nix is killed, and the queue stays as it was before the step in progress (each step is
/// atomic).
pub async fn upload_batch(
    spool: &Spool,
    host: &str,
    nix: &Nix,
    to_store: &str,
    limits: Limits,
) -> BatchReport {
    let Limits {
        max_paths,
        deadline,
    } = limits;
    let now = SystemTime::now();
    let mut report = BatchReport::default();
    let selection = match blocking(spool, host, move |s, h| select(s, h, max_paths, now)).await {
        Ok(selection) => selection,
        Err(error) => {
            let (failure, next_try) = queue_failure(spool, host, error, now).await;
            report.failure = Some(failure);
            report.next_try = Some(next_try);
            return report;
        }
    };
    report.rejected = selection.rejected;
    report.entries = selection.batch.iter().map(|q| q.id).collect();
    report.pending = selection.pending;
    if selection.batch.is_empty() {
        report.next_try = selection.wait_until;
        return report;
    }

    let outcome = upload(nix, to_store, &selection.batch, deadline, &mut report).await;
    let now = SystemTime::now();
    let mut done: Vec<EntryId> = Vec::new();
    let mut next = Vec::new();
    match outcome {
        Ok(()) => done.clone_from(&report.entries),
        Err((Scope::Queue, error)) => {
            done.clone_from(&report.done);
            let (failure, next_try) = queue_failure(spool, host, error, now).await;
            next.push(next_try);
            report.failure = Some(failure);
        }
        Err((Scope::Entries, error)) => {
            done.clone_from(&report.done);
            let message = chain(&error);
            let mut retries = Vec::new();
            let mut most = 0;
            for queued in &selection.batch {
                if done.contains(&queued.id) {
                    continue;
                }
                let previous = queued.retry.as_ref().map_or(0, |r| r.attempts);
                let (attempts, next_try) = after_failure(ENTRY_BACKOFF, previous, now);
                most = most.max(attempts);
                next.push(next_try);
                retries.push((
                    queued.id,
                    Some(Retry {
                        attempts,
                        next_try,
                        error: message.clone(),
                    }),
                ));
            }
            let marked = blocking(spool, host, move |s, h| s.set_retries(h, &retries)).await;
            report.failure = Some(match marked.and(clear_queue_retry(spool, host).await) {
                Ok(()) => Failure {
                    scope: Scope::Entries,
                    error,
                    attempts: most,
                },
                // The spool itself failed: that holds back the whole queue.
                Err(error) => Failure {
                    scope: Scope::Queue,
                    error,
                    attempts: 0,
                },
            });
        }
    }
    if report.failure.is_none() {
        if let Err(error) = clear_queue_retry(spool, host).await {
            report.failure = Some(Failure {
                scope: Scope::Queue,
                error,
                attempts: 0,
            });
        }
    }
    let removing = done.clone();
    match blocking(spool, host, move |s, h| s.done(h, &removing)).await {
        Ok(()) => report.done = done,
        Err(error) => {
            report.done.clear();
            report.failure.get_or_insert(Failure {
                scope: Scope::Queue,
                error,
                attempts: 0,
            });
        }
    }
    report.pending -= report.done.len().min(report.pending);
    let queue_failed = report.failure.as_ref().map(|f| f.scope) == Some(Scope::Queue);
    report.next_try = BatchEnd {
        pending: report.pending,
        more: selection.more,
        queue_failed,
        backoffs: next,
        waiting_until: selection.wait_until,
    }
    .next_batch(now);
    report
}

/// The batch chosen from a queue.
struct Selection {
    batch: Vec<Queued>,
    /// Entries in the queue (after removing rejected files).
    pending: usize,
    /// Whether due entries may remain beyond the batch.
    more: bool,
    /// The earliest end of a backoff among the entries seen but not due.
    wait_until: Option<SystemTime>,
    rejected: Vec<SpoolError>,
}

/// The oldest due entries, up to `max_paths` paths (a derivation-only entry counts one). An
/// entry that failed before goes alone: if it is the oldest due entry it is the whole batch,
/// otherwise the batch ends before it.
fn select(
    spool: &Spool,
    host: &str,
    max_paths: usize,
    now: SystemTime,
) -> Result<Selection, SpoolError> {
    let ids = spool.pending(host)?;
    let mut selection = Selection {
        batch: Vec::new(),
        pending: ids.len(),
        more: false,
        wait_until: None,
        rejected: Vec::new(),
    };
    let mut paths = 0;
    for (index, id) in ids.iter().enumerate() {
        let queued = match spool.load(host, id) {
            Ok(Some(queued)) => queued,
            Ok(None) => {
                selection.pending -= 1;
                continue;
            }
            Err(err @ SpoolError::BadEntry { .. }) => {
                spool.done(host, &[*id])?;
                selection.rejected.push(err);
                selection.pending -= 1;
                continue;
            }
            Err(err) => return Err(err),
        };
        match &queued.retry {
            Some(retry) if !is_due(retry.next_try, now) => {
                let earliest = selection
                    .wait_until
                    .map_or(retry.next_try, |t| t.min(retry.next_try));
                selection.wait_until = Some(earliest);
                continue;
            }
            Some(_) if selection.batch.is_empty() => {
                selection.batch.push(queued);
                selection.more = index + 1 < ids.len();
                break;
            }
            Some(_) => {
                selection.more = true;
                break;
            }
            None => {}
        }
        let cost = queued.entry.outs.len().max(1);
        if !selection.batch.is_empty() && paths + cost > max_paths {
            selection.more = true;
            break;
        }
        paths += cost;
        selection.batch.push(queued);
    }
    Ok(selection)
}

/// Resolves, checks and copies a batch. Fills the report's `paths`, `copied`, `lost` and `done`
/// (entries with nothing left to upload, removed whatever happens next).
async fn upload(
    nix: &Nix,
    to_store: &str,
    batch: &[Queued],
    deadline: Instant,
    report: &mut BatchReport,
) -> Result<(), (Scope, UploadError)> {
    let local = |e| (Scope::Queue, e);
    let nix = &nix.found().map_err(|e| local(UploadError::from(e)))?;
    // Nix 2.8 entries name only the derivation: find their outputs, if the derivation is still
    // there.
    let drvs: Vec<&StorePath> = batch
        .iter()
        .filter(|q| q.entry.outs.is_empty())
        .filter_map(|q| q.entry.drv.as_ref())
        .collect();
    let mut outs: Vec<StorePath> = Vec::new();
    if !drvs.is_empty() {
        let gone = invalid_paths(nix, drvs.iter().copied(), deadline)
            .await
            .map_err(local)?;
        let present: Vec<&StorePath> = drvs.into_iter().filter(|d| !gone.contains(d)).collect();
        if !present.is_empty() {
            outs = query_outputs(nix, &present, deadline)
                .await
                .map_err(local)?;
        }
        for queued in batch {
            if queued.entry.outs.is_empty()
                && queued.entry.drv.as_ref().is_some_and(|d| gone.contains(d))
            {
                report.done.push(queued.id);
            }
        }
        report.lost.extend(gone);
    }
    let mut seen = BTreeSet::new();
    let mut paths: Vec<StorePath> = batch
        .iter()
        .flat_map(|q| q.entry.outs.iter().cloned())
        .chain(outs)
        .filter(|p| seen.insert(p.clone()))
        .collect();
    if paths.is_empty() {
        return Ok(());
    }
    let gone = invalid_paths(nix, paths.iter(), deadline)
        .await
        .map_err(local)?;
    if !gone.is_empty() {
        paths.retain(|p| !gone.contains(p));
        for queued in batch {
            let outs = &queued.entry.outs;
            if !outs.is_empty() && outs.iter().all(|p| gone.contains(p)) {
                report.done.push(queued.id);
            }
        }
        report.lost.extend(gone);
    }
    report.paths = paths.len();
    if paths.is_empty() {
        return Ok(());
    }
    match copy(nix, to_store, &paths, deadline).await {
        Ok(copied) => {
            report.copied = copied;
            Ok(())
        }
        Err((copied, error)) => {
            report.copied = copied;
            let scope = match error {
                UploadError::Timeout { .. } => Scope::Queue,
                _ if ping(nix, to_store, deadline).await => Scope::Entries,
                _ => Scope::Queue,
            };
            Err((scope, error))
        }
    }
}

/// The given paths that are not valid in the local store (`nix-store --check-validity`).
async fn invalid_paths<'p>(
    nix: &Nix,
    paths: impl Iterator<Item = &'p StorePath>,
    deadline: Instant,
) -> Result<HashSet<StorePath>, UploadError> {
    let mut command = nix.command("nix-store");
    command.args(["--check-validity", "--print-invalid"]);
    command.args(paths.map(StorePath::as_str));
    let stdout = run(command, "nix-store --check-validity", deadline).await?;
    parse_paths(&stdout, "nix-store --check-validity").map(|p| p.into_iter().collect())
}

/// The outputs of derivations (`nix-store --query --outputs`), all together.
async fn query_outputs(
    nix: &Nix,
    drvs: &[&StorePath],
    deadline: Instant,
) -> Result<Vec<StorePath>, UploadError> {
    let mut command = nix.command("nix-store");
    command.args(["--query", "--outputs"]);
    command.args(drvs.iter().map(|d| d.as_str()));
    let stdout = run(command, "nix-store --query --outputs", deadline).await?;
    parse_paths(&stdout, "nix-store --query --outputs")
}

fn parse_paths(stdout: &str, command: &str) -> Result<Vec<StorePath>, UploadError> {
    stdout
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.parse().map_err(|_| UploadError::Output {
                command: command.into(),
                line: one_line(line),
            })
        })
        .collect()
}

/// Runs a short command to completion; its stdout, or an error carrying its stderr.
/// In the child, before exec: SIGKILL it when reachd dies, so that a `nix copy` never outlives
/// a crashed agent (it would keep the service's cgroup busy, and systemd would not restart
/// reachd until it ended). The signal follows the thread that forked: reachd runs one
/// current-thread runtime, so that is the main thread, which lives as long as the process.
fn die_with(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: plain syscalls.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // reachd died between the fork and the prctl: nothing will send the signal.
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

async fn run(mut command: Command, name: &str, deadline: Instant) -> Result<String, UploadError> {
    let child = command.spawn().map_err(|source| UploadError::Spawn {
        command: name.into(),
        source,
    })?;
    let output = match timeout_at(deadline, child.wait_with_output()).await {
        Err(_) => {
            return Err(UploadError::Timeout {
                command: name.into(),
            })
        }
        Ok(output) => output.map_err(|source| UploadError::Spawn {
            command: name.into(),
            source,
        })?,
    };
    if !output.status.success() {
        return Err(UploadError::Nix {
            command: name.into(),
            status: output.status,
            message: one_line(&String::from_utf8_lossy(&output.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `nix copy --to STORE PATHS...`, reading Nix's JSON log as it goes to count the paths it
/// transferred and to keep its error message. On failure, also returns the count so far.
async fn copy(
    nix: &Nix,
    to_store: &str,
    paths: &[StorePath],
    deadline: Instant,
) -> Result<usize, (usize, UploadError)> {
    let name = format!("nix copy --to {to_store}");
    let mut command = nix.nix();
    command
        .args(["--log-format", "internal-json", "copy", "--to", to_store])
        .args(paths.iter().map(StorePath::as_str))
        .stdout(Stdio::null());
    let mut child = command.spawn().map_err(|source| {
        (
            0,
            UploadError::Spawn {
                command: name.clone(),
                source,
            },
        )
    })?;
    let mut log = CopyLog::default();
    let stderr = child.stderr.take();
    let finished = timeout_at(deadline, async {
        if let Some(stderr) = stderr {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.read(&line);
            }
        }
        child.wait().await
    })
    .await;
    let status = match finished {
        Err(_) => return Err((log.copied, UploadError::Timeout { command: name })),
        Ok(Err(source)) => {
            return Err((
                log.copied,
                UploadError::Spawn {
                    command: name,
                    source,
                },
            ))
        }
        Ok(Ok(status)) => status,
    };
    if status.success() {
        return Ok(log.copied);
    }
    let message = log.error.or(log.other).unwrap_or_default();
    Err((
        log.copied,
        UploadError::Nix {
            command: name,
            status,
            message,
        },
    ))
}

/// What `nix copy --log-format internal-json` said: `@nix {json}` lines.
#[derive(Default)]
struct CopyLog {
    /// Activities of type 100 (copying one path) started and not yet stopped.
    copying: HashSet<u64>,
    copied: usize,
    /// The last error message (level 0).
    error: Option<String>,
    /// The last line that was not JSON (messages printed before Nix set up its logger).
    other: Option<String>,
}

impl CopyLog {
    const COPY_PATH: u64 = 100;

    fn read(&mut self, line: &str) {
        let Some(json) = line.strip_prefix("@nix ") else {
            if !line.trim().is_empty() {
                self.other = Some(one_line(line));
            }
            return;
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(json) else {
            return;
        };
        let id = event.get("id").and_then(serde_json::Value::as_u64);
        match event.get("action").and_then(serde_json::Value::as_str) {
            Some("start")
                if event.get("type").and_then(serde_json::Value::as_u64)
                    == Some(Self::COPY_PATH) =>
            {
                self.copying.extend(id);
            }
            Some("stop") if id.is_some_and(|id| self.copying.remove(&id)) => self.copied += 1,
            Some("msg") if event.get("level").and_then(serde_json::Value::as_u64) == Some(0) => {
                let msg = event.get("msg").and_then(serde_json::Value::as_str);
                self.error = msg.map(one_line);
            }
            _ => {}
        }
    }
}

/// Whether the store answers (`nix store ping`), within [`PING_TIMEOUT`] and the deadline.
async fn ping(nix: &Nix, to_store: &str, deadline: Instant) -> bool {
    let mut command = nix.nix();
    command.args(["store", "ping", "--store", to_store]);
    let deadline = deadline.min(Instant::now() + PING_TIMEOUT);
    run(command, "nix store ping", deadline).await.is_ok()
}

/// Runs a spool operation on the blocking pool: directory scans and fsyncs must not stall the
/// agent's event loop.
async fn blocking<T, F>(spool: &Spool, host: &str, f: F) -> Result<T, UploadError>
where
    T: Send + 'static,
    F: FnOnce(&Spool, &str) -> Result<T, SpoolError> + Send + 'static,
{
    let spool = spool.clone();
    let host = host.to_string();
    Ok(tokio::task::spawn_blocking(move || f(&spool, &host)).await??)
}

async fn queue_retry(spool: &Spool, host: &str) -> Result<Option<Retry>, UploadError> {
    blocking(spool, host, |s, h| s.queue_retry(h)).await
}

async fn clear_queue_retry(spool: &Spool, host: &str) -> Result<(), UploadError> {
    if queue_retry(spool, host).await?.is_none() {
        return Ok(());
    }
    blocking(spool, host, |s, h| s.set_queue_retry(h, None)).await
}

/// Records a failure of the whole queue: one more attempt, and the next after the backoff.
/// Returns the failure and the end of that backoff.
async fn queue_failure(
    spool: &Spool,
    host: &str,
    error: UploadError,
    now: SystemTime,
) -> (Failure, SystemTime) {
    // An unreadable state file counts as none: it only paces retries.
    let previous = queue_retry(spool, host).await.ok().flatten();
    let (attempts, next_try) =
        after_failure(QUEUE_BACKOFF, previous.map_or(0, |r| r.attempts), now);
    let retry = Retry {
        attempts,
        next_try,
        error: chain(&error),
    };
    let error = match blocking(spool, host, move |s, h| s.set_queue_retry(h, Some(&retry))).await {
        Ok(()) => error,
        Err(recording) => recording,
    };
    let failure = Failure {
        scope: Scope::Queue,
        error,
        attempts,
    };
    (failure, next_try)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::spool::Entry;

    #[test]
    fn copy_log_counts_transfers_and_keeps_the_error() {
        let mut log = CopyLog::default();
        for line in [
            r#"@nix {"action":"start","id":1,"level":3,"text":"copying 2 paths","type":103}"#,
            r#"@nix {"action":"start","fields":["/nix/store/x"],"id":2,"level":3,"type":100}"#,
            r#"@nix {"action":"stop","id":2}"#,
            r#"@nix {"action":"start","fields":["/nix/store/y"],"id":3,"level":3,"type":100}"#,
            r#"@nix {"action":"stop","id":1}"#,
            "@nix {not json",
            r#"@nix {"action":"msg","level":0,"msg":"\u001b[31;1merror:\u001b[0m cannot add path\nbecause"}"#,
        ] {
            log.read(line);
        }
        assert_eq!(log.copied, 1);
        assert_eq!(
            log.error.as_deref(),
            Some("error: cannot add path | because")
        );
        log.read("warning: something before the logger");
        assert_eq!(
            log.other.as_deref(),
            Some("warning: something before the logger")
        );
    }

    #[test]
    fn paths_from_nix_are_validated() {
        let good = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0";
        assert_eq!(
            parse_paths(&format!("{good}\n\n"), "t")
                .map(|p| p.len())
                .ok(),
            Some(1)
        );
        assert!(matches!(
            parse_paths("warning: x\n", "t"),
            Err(UploadError::Output { .. })
        ));
    }

    /// No `nix` where the batch looks: the whole queue waits, with the search's error, and the
    /// entry is kept unmarked.
    #[tokio::test]
    async fn without_nix_the_queue_waits_and_says_where_to_set_it() {
        let root = tempfile::tempdir().unwrap();
        let spool = Spool::open(root.path()).unwrap();
        let out = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0"
            .parse()
            .unwrap();
        spool.record(&Entry::new(None, [out]).unwrap()).unwrap();
        spool.claim(&["rpi"]).unwrap();
        let empty = root.path().join("bin");
        std::fs::create_dir(&empty).unwrap();
        let limits = Limits {
            max_paths: 10,
            deadline: Instant::now() + Duration::from_secs(10),
        };
        let nix = Nix::in_dir(Some(empty.clone()));
        let report = upload_batch(&spool, "rpi", &nix, "unix:///nowhere", limits).await;
        let failure = report.failure.expect("a failure");
        assert_eq!(failure.scope, Scope::Queue);
        assert_eq!(
            chain(&failure.error),
            format!("`[nix] bin_dir` {}: holds no `nix`", empty.display())
        );
        assert_eq!((report.pending, report.done.len()), (1, 0));
        assert!(report.next_try.is_some(), "retried after a backoff");
        let queued = spool.load("rpi", &spool.pending("rpi").unwrap()[0]);
        assert!(
            queued.unwrap().unwrap().retry.is_none(),
            "the entry is not marked"
        );
    }
}
