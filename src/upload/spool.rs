//! The upload spool: a crash-safe on-disk queue between Nix's post-build hook and the agent.
//!
//! Nix runs its `post-build-hook` as root, synchronously, after every build, and fails the build
//! if the hook fails; the Pi is often not there. So the hook only *records* what was built, in a
//! few milliseconds and without touching the network, and the user's agent uploads later, while
//! the Pi is reachable. The two run as different users at different times and either may be
//! killed at any moment, so the queue is plain files whose every change is one atomic rename,
//! link or unlink:
//!
//! - `incoming/` is where the hook writes, one file per build (`<ns>-<pid>-<key>.entry`, written
//!   under a `.tmp-` name, fsynced, renamed, directory fsynced): a reader sees a whole entry or
//!   none.
//! - `hosts/<host>/` is one queue per uploading host, owned by the agent. [`Spool::claim`] links
//!   each incoming entry into every host's queue, fsyncs the queues and only then unlinks it from
//!   `incoming/`: a crash in between leaves the entry in both places, and the next claim finds
//!   the same name (or an identical entry) in the queue and merges. Nothing is lost, at worst
//!   something is uploaded twice, which Nix makes a no-op.
//!
//! The entry format is a tiny versioned text file holding only validated store paths (see
//! [`Entry`]); the file name carries a digest of those paths so that a claim can merge identical
//! entries from a directory listing. docs/nix-upload.md gives the whole argument.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::atomic_file::{self, Mode, WriteError, TEMP_PREFIX};
use crate::store_path::{Shown, StorePath, StorePathError};

/// The most entries `incoming/` or one host's queue holds. Beyond it the hook refuses new entries
/// (and says so in the build log) instead of dropping old ones: see docs/nix-upload.md.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// The largest entry file read. A real entry is a few hundred bytes; this bounds what a corrupt
/// or planted file can make the agent read.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// How old a `.tmp-` file must be before a claim removes it. A hook holds its temporary file for
/// milliseconds; one that is an hour old belongs to a writer that was killed.
pub const TEMP_MAX_AGE: Duration = Duration::from_secs(3600);

/// The most characters of an error message kept in an entry or a queue's state.
pub const MAX_ERROR_CHARS: usize = 1000;

const ENTRY_HEADER: &str = "reachd-upload 1";
const QUEUE_HEADER: &str = "reachd-queue 1";
const ENTRY_SUFFIX: &str = ".entry";
const QUEUE_STATE: &str = "state";
const DIR_MODE: u32 = 0o2770;
const FILE_MODE: u32 = 0o660;

/// What one build asks to upload: the derivation and the outputs Nix named. With Nix 2.8
/// (`OUT_PATHS` empty) only the derivation is known and its outputs are looked up when the entry
/// is uploaded. Outputs are kept sorted and without duplicates, so equal builds are equal entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub drv: Option<StorePath>,
    pub outs: BTreeSet<StorePath>,
}

impl Entry {
    /// An entry naming at least one path; `None` when there is none.
    pub fn new(drv: Option<StorePath>, outs: impl IntoIterator<Item = StorePath>) -> Option<Entry> {
        let entry = Entry {
            drv,
            outs: outs.into_iter().collect(),
        };
        (entry.drv.is_some() || !entry.outs.is_empty()).then_some(entry)
    }

    /// Every path the entry names, the derivation first.
    pub fn paths(&self) -> impl Iterator<Item = &StorePath> {
        self.drv.iter().chain(&self.outs)
    }

    /// The path lines, in canonical order: what identifies the entry.
    fn path_lines(&self) -> String {
        let mut text = String::new();
        if let Some(drv) = &self.drv {
            text.push_str(&format!("drv {drv}\n"));
        }
        for out in &self.outs {
            text.push_str(&format!("out {out}\n"));
        }
        text
    }

    /// A digest of the paths (64-bit FNV-1a, fixed here so that it never changes under us), put
    /// in the file name to find identical entries from a directory listing. Equal digests are
    /// compared in full before anything is merged, so a collision costs a read, never an entry.
    pub fn key(&self) -> u64 {
        self.path_lines()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            })
    }

    /// The file's text: the header, the paths, then the retry state if any.
    pub fn encode(&self, retry: Option<&Retry>) -> String {
        let mut text = format!("{ENTRY_HEADER}\n{}", self.path_lines());
        if let Some(retry) = retry {
            text.push_str(&retry.lines());
        }
        text
    }

    /// Parses an entry file's text. Strict: the header, then `key value` lines with known keys
    /// only, every path validated, a final newline (a cut file never parses).
    pub fn decode(text: &str) -> Result<(Entry, Option<Retry>), EntryError> {
        let mut drv = None;
        let mut outs = BTreeSet::new();
        let mut state = RetryFields::default();
        for (number, key, value) in fields(text, ENTRY_HEADER)? {
            let err = |problem| Err(EntryError::Line { number, problem });
            match key {
                "drv" if drv.is_some() => return err("a second `drv`".into()),
                "drv" => drv = Some(path_value(value, number)?),
                "out" => {
                    outs.insert(path_value(value, number)?);
                }
                _ if state.take(key, value, number)? => {}
                _ => return err(format!("unknown field {}", Shown(key))),
            }
        }
        let entry = Entry::new(drv, outs).ok_or(EntryError::NoPath)?;
        Ok((entry, state.finish()?))
    }
}

/// When a failed entry (or a whole queue) may be tried again, and why it failed last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Consecutive failed attempts.
    pub attempts: u32,
    /// Not before this time (kept to the nanosecond on disk).
    pub next_try: SystemTime,
    /// The last error, on one line (see [`one_line`]).
    pub error: String,
}

impl Retry {
    fn lines(&self) -> String {
        format!(
            "attempts {}\nnext-try {}\nerror {}\n",
            self.attempts,
            nanos(self.next_try),
            one_line(&self.error)
        )
    }

    /// The queue-wide retry state file's text.
    fn encode_queue(&self) -> String {
        format!("{QUEUE_HEADER}\n{}", self.lines())
    }

    fn decode_queue(text: &str) -> Result<Retry, EntryError> {
        let mut state = RetryFields::default();
        for (number, key, value) in fields(text, QUEUE_HEADER)? {
            if !state.take(key, value, number)? {
                return Err(EntryError::Line {
                    number,
                    problem: format!("unknown field {}", Shown(key)),
                });
            }
        }
        state.finish()?.ok_or(EntryError::PartialRetry)
    }
}

#[derive(Default)]
struct RetryFields {
    attempts: Option<u32>,
    next_try: Option<u64>,
    error: Option<String>,
}

impl RetryFields {
    /// Takes a retry field; `false` if `key` is not one.
    fn take(&mut self, key: &str, value: &str, number: usize) -> Result<bool, EntryError> {
        let bad = |problem: &str| EntryError::Line {
            number,
            problem: problem.into(),
        };
        match key {
            "attempts" if self.attempts.is_none() => {
                self.attempts = Some(value.parse().map_err(|_| bad("bad `attempts`"))?)
            }
            "next-try" if self.next_try.is_none() => {
                self.next_try = Some(value.parse().map_err(|_| bad("bad `next-try`"))?)
            }
            "error" if self.error.is_none() => self.error = Some(value.to_string()),
            "attempts" | "next-try" | "error" => return Err(bad("a repeated retry field")),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self) -> Result<Option<Retry>, EntryError> {
        match (self.attempts, self.next_try, self.error) {
            (None, None, None) => Ok(None),
            (Some(attempts), Some(ns), Some(error)) => Ok(Some(Retry {
                attempts,
                next_try: UNIX_EPOCH + Duration::from_nanos(ns),
                error,
            })),
            _ => Err(EntryError::PartialRetry),
        }
    }
}

/// Splits a spool file into `(line number, key, value)` after checking its header and ending.
fn fields<'t>(
    text: &'t str,
    header: &str,
) -> Result<impl Iterator<Item = (usize, &'t str, &'t str)>, EntryError> {
    let Some(body) = text.strip_suffix('\n') else {
        return Err(EntryError::Unterminated);
    };
    let mut lines = body.split('\n');
    if lines.next() != Some(header) {
        return Err(EntryError::Header);
    }
    let fields: Vec<_> = lines
        .enumerate()
        .map(|(i, line)| {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            (i + 2, key, value)
        })
        .collect();
    Ok(fields.into_iter())
}

fn path_value(value: &str, number: usize) -> Result<StorePath, EntryError> {
    value.parse().map_err(|e: StorePathError| EntryError::Line {
        number,
        problem: e.to_string(),
    })
}

/// Why a spool file's text is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the first line is not `{ENTRY_HEADER}` (or `{QUEUE_HEADER}`)")]
    Header,
    #[error("it does not end with a newline (cut short)")]
    Unterminated,
    #[error("line {number}: {problem}")]
    Line { number: usize, problem: String },
    #[error("it names no path")]
    NoPath,
    #[error("`attempts`, `next-try` and `error` must come together")]
    PartialRetry,
    #[error("it is larger than {MAX_ENTRY_BYTES} bytes")]
    TooLarge,
    #[error("it is not UTF-8")]
    NotUtf8,
    #[error("its contents do not match the digest in its name")]
    KeyMismatch,
}

/// An error message on one line, at most [`MAX_ERROR_CHARS`] characters: terminal escape
/// sequences and carriage returns dropped, lines joined with ` | `, other control characters
/// made spaces.
pub fn one_line(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    let mut pending_break = false;
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; anything else: drop the ESC alone.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\n' => pending_break = !out.is_empty(),
            '\r' => {}
            c => {
                let c = if c.is_control() { ' ' } else { c };
                if pending_break {
                    out.push_str(" | ");
                    pending_break = false;
                }
                out.push(c);
            }
        }
    }
    if out.chars().count() > MAX_ERROR_CHARS {
        out = out.chars().take(MAX_ERROR_CHARS - 1).collect();
        out.push('…');
    }
    out
}

/// An entry's name without `.entry`: `<ns since the epoch, 20 digits>-<pid>-<key, 16 hex>`.
/// Ordered by time, then PID, then key: oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ns: u64,
    pub pid: u32,
    pub key: u64,
}

impl EntryId {
    fn file_name(&self) -> String {
        format!("{self}{ENTRY_SUFFIX}")
    }

    /// Parses a directory entry's name; `None` for anything that is not an entry.
    fn from_file_name(name: &str) -> Option<EntryId> {
        let mut parts = name.strip_suffix(ENTRY_SUFFIX)?.split('-');
        let (ns, pid, key) = (parts.next()?, parts.next()?, parts.next()?);
        let digits = |s: &str, max| !s.is_empty() && s.len() <= max;
        if parts.next().is_some()
            || !digits(ns, 20)
            || !ns.bytes().all(|b| b.is_ascii_digit())
            || !digits(pid, 10)
            || !pid.bytes().all(|b| b.is_ascii_digit())
            || key.len() != 16
            || !key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        Some(EntryId {
            ns: ns.parse().ok()?,
            pid: pid.parse().ok()?,
            key: u64::from_str_radix(key, 16).ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020}-{}-{:016x}", self.ns, self.pid, self.key)
    }
}

/// An entry in a host's queue, with its retry state if it failed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: EntryId,
    pub entry: Entry,
    pub retry: Option<Retry>,
}

/// What went wrong with the spool. Every variant names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool {} does not exist or is not a directory: install systemd/tmpfiles.d/reachd.conf and run `systemd-tmpfiles --create` (docs/nix-upload.md)", .0.display())]
    Missing(PathBuf),
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool full: {} holds {count} entries, the limit; is the reachd agent uploading?", dir.display())]
    Full { dir: PathBuf, count: usize },
    #[error("{} is not a host name: [a-z0-9-], 1 to 32 characters", Shown(.0))]
    BadHost(String),
    #[error("{}", path.display())]
    BadEntry {
        path: PathBuf,
        #[source]
        source: EntryError,
    },
}

impl From<WriteError> for SpoolError {
    fn from(err: WriteError) -> SpoolError {
        SpoolError::Io {
            action: err.action,
            path: err.path,
            source: err.source,
        }
    }
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SpoolError + 'p {
    move |source| SpoolError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What a claim did.
#[derive(Debug, Default)]
pub struct ClaimReport {
    /// Entries moved out of `incoming/`.
    pub claimed: usize,
    /// Of those, how many host queues already held an identical entry (counted once per host).
    pub merged: usize,
    /// Files in `incoming/` that were not valid entries, removed: the error says which and why.
    pub rejected: Vec<SpoolError>,
    /// Hosts whose queue is full: entries stay in `incoming/` until they have room.
    pub full: Vec<String>,
    /// Stale `.tmp-` files of killed writers, removed.
    pub stale_temps: usize,
}

/// A host's queue as a claim sees it: its entries by digest, and how many.
struct QueueIndex {
    host: String,
    dir: PathBuf,
    by_key: HashMap<u64, Vec<EntryId>>,
    count: usize,
}

/// The spool directory. Cheap to clone: a path and a limit.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    capacity: usize,
}

impl Spool {
    /// Opens the spool at `dir`, which must exist; creates `incoming/` and `hosts/` in it when
    /// missing (mode 2770, so that their files get the spool's group).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Spool, SpoolError> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(SpoolError::Missing(dir));
        }
        let spool = Spool {
            dir,
            capacity: DEFAULT_CAPACITY,
        };
        ensure_dir(&spool.incoming())?;
        ensure_dir(&spool.dir.join("hosts"))?;
        Ok(spool)
    }

    /// The same spool with another limit per directory (tests, small machines).
    pub fn with_capacity(mut self, capacity: usize) -> Spool {
        self.capacity = capacity;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }

    fn queue(&self, host: &str) -> Result<PathBuf, SpoolError> {
        let valid = (1..=32).contains(&host.len())
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(SpoolError::BadHost(host.to_string()));
        }
        Ok(self.dir.join("hosts").join(host))
    }

    /// The hook's write: one new file in `incoming/`, whole or not at all, durable when this
    /// returns. Refuses with [`SpoolError::Full`] at the limit rather than dropping anything.
    pub fn record(&self, entry: &Entry) -> Result<EntryId, SpoolError> {
        let incoming = self.incoming();
        let count = count_entries(&incoming, self.capacity)?;
        if count >= self.capacity {
            return Err(SpoolError::Full {
                dir: incoming,
                count,
            });
        }
        let id = EntryId {
            ns: nanos(SystemTime::now()),
            pid: std::process::id(),
            key: entry.key(),
        };
        write_atomically(&incoming, &id.file_name(), entry.encode(None).as_bytes())?;
        sync_dir(&incoming)?;
        Ok(id)
    }

    /// Moves every entry of `incoming/` into the queue of each host in `hosts` (all the hosts
    /// that upload: each gets every entry). Per entry: a hard link into each queue (a copy where
    /// linking is refused), the queues fsynced, then the entry unlinked from `incoming/`. An
    /// entry whose paths a queue already holds is merged (that queue keeps the older one). A full
    /// queue stops the claim: the rest waits in `incoming/`. Also removes writers' stale
    /// temporary files. With no host at all nothing is claimed (an entry is removed from
    /// `incoming/` only once some queue holds it).
    pub fn claim(&self, hosts: &[&str]) -> Result<ClaimReport, SpoolError> {
        const CHUNK: usize = 256;
        let mut report = ClaimReport::default();
        let hosts: BTreeSet<&str> = hosts.iter().copied().collect();
        if hosts.is_empty() {
            return Ok(report);
        }
        let mut queues = Vec::with_capacity(hosts.len());
        for host in hosts {
            let dir = self.queue(host)?;
            ensure_queue_dir(&dir)?;
            report.stale_temps += remove_stale_temps(&dir)?;
            let ids = list_entries(&dir)?;
            let mut queue = QueueIndex {
                host: host.to_string(),
                dir,
                by_key: HashMap::new(),
                count: ids.len(),
            };
            for id in ids {
                queue.by_key.entry(id.key).or_default().push(id);
            }
            queues.push(queue);
        }
        let incoming = self.incoming();
        report.stale_temps += remove_stale_temps(&incoming)?;
        let ids = list_entries(&incoming)?;
        'chunks: for chunk in ids.chunks(CHUNK) {
            let mut claimed = Vec::with_capacity(chunk.len());
            for id in chunk {
                let path = incoming.join(id.file_name());
                let entry = match read_entry(&path, id) {
                    Ok(Some((entry, _))) => entry,
                    Ok(None) => continue, // claimed meanwhile by another agent
                    Err(err @ SpoolError::BadEntry { .. }) => {
                        remove_file(&path)?;
                        report.rejected.push(err);
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                let text = entry.encode(None);
                let mut complete = true;
                for queue in &mut queues {
                    let same = queue.by_key.get(&id.key).map(Vec::as_slice);
                    if holds_entry(&queue.dir, same.unwrap_or_default(), &entry)? {
                        report.merged += 1;
                        continue;
                    }
                    if queue.count >= self.capacity {
                        report.full.push(queue.host.clone());
                        complete = false;
                        continue;
                    }
                    link_or_copy(&path, &queue.dir, &id.file_name(), &text)?;
                    queue.by_key.entry(id.key).or_default().push(*id);
                    queue.count += 1;
                }
                if !complete {
                    // Links made for the other hosts stay; the next claim merges them.
                    self.finish_claim(&queues, &claimed, &mut report)?;
                    break 'chunks;
                }
                claimed.push(*id);
            }
            self.finish_claim(&queues, &claimed, &mut report)?;
        }
        Ok(report)
    }

    /// The durable end of a claimed chunk: queues first, then `incoming/`.
    fn finish_claim(
        &self,
        queues: &[QueueIndex],
        claimed: &[EntryId],
        report: &mut ClaimReport,
    ) -> Result<(), SpoolError> {
        if claimed.is_empty() {
            return Ok(());
        }
        for queue in queues {
            sync_dir(&queue.dir)?;
        }
        let incoming = self.incoming();
        for id in claimed {
            remove_file(&incoming.join(id.file_name()))?;
        }
        sync_dir(&incoming)?;
        report.claimed += claimed.len();
        Ok(())
    }

    /// How many entries wait in `incoming/` (for status; counts up to the limit).
    pub fn incoming_len(&self) -> Result<usize, SpoolError> {
        count_entries(&self.incoming(), self.capacity)
    }

    /// The entries in `host`'s queue, oldest first.
    pub fn pending(&self, host: &str) -> Result<Vec<EntryId>, SpoolError> {
        let dir = self.queue(host)?;
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        list_entries(&dir)
    }

    /// One queued entry; `None` if it is gone (done meanwhile).
    pub fn load(&self, host: &str, id: &EntryId) -> Result<Option<Queued>, SpoolError> {
        let path = self.queue(host)?.join(id.file_name());
        Ok(read_entry(&path, id)?.map(|(entry, retry)| Queued {
            id: *id,
            entry,
            retry,
        }))
    }

    /// Removes entries from `host`'s queue (uploaded, or nothing left to upload); durable when
    /// this returns. Entries already gone are fine.
    pub fn done(&self, host: &str, ids: &[EntryId]) -> Result<(), SpoolError> {
        let dir = self.queue(host)?;
        for id in ids {
            remove_file(&dir.join(id.file_name()))?;
        }
        if !ids.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Sets (or, with `None`, clears) the retry state of entries in `host`'s queue, rewriting
    /// each atomically. Entries that are gone are skipped.
    pub fn set_retries(
        &self,
        host: &str,
        retries: &[(EntryId, Option<Retry>)],
    ) -> Result<(), SpoolError> {
        let dir = self.queue(host)?;
        for (id, retry) in retries {
            let path = dir.join(id.file_name());
            if let Some((entry, _)) = read_entry(&path, id)? {
                write_atomically(
                    &dir,
                    &id.file_name(),
                    entry.encode(retry.as_ref()).as_bytes(),
                )?;
            }
        }
        if !retries.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// The queue-wide retry state of `host` (set after a failure of the store as a whole).
    pub fn queue_retry(&self, host: &str) -> Result<Option<Retry>, SpoolError> {
        let path = self.queue(host)?.join(QUEUE_STATE);
        let Some(text) = read_small(&path)? else {
            return Ok(None);
        };
        Retry::decode_queue(&text)
            .map(Some)
            .map_err(|source| SpoolError::BadEntry { path, source })
    }

    /// Sets or clears `host`'s queue-wide retry state.
    pub fn set_queue_retry(&self, host: &str, retry: Option<&Retry>) -> Result<(), SpoolError> {
        let dir = self.queue(host)?;
        match retry {
            Some(retry) => {
                ensure_queue_dir(&dir)?;
                write_atomically(&dir, QUEUE_STATE, retry.encode_queue().as_bytes())?;
            }
            None if !dir.is_dir() => return Ok(()),
            None => remove_file(&dir.join(QUEUE_STATE))?,
        }
        sync_dir(&dir)
    }
}

/// Nanoseconds since the epoch (0 before it; saturating far after it).
pub fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Whether one of the `candidates` in `dir` names exactly the paths of `entry`.
fn holds_entry(dir: &Path, candidates: &[EntryId], entry: &Entry) -> Result<bool, SpoolError> {
    for id in candidates {
        if let Some((held, _)) = read_entry(&dir.join(id.file_name()), id)? {
            if &held == entry {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A host's queue: the agent's own directory (only the agent and its user's `reachd uploads`
/// use it), made without changing its mode afterwards. A chmod that keeps the setgid bit it
/// inherits from `hosts/` is refused to the agent by its unit's `RestrictSUIDSGID=yes`, and
/// none is needed: the entries linked in keep their own group and mode.
fn ensure_queue_dir(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o770).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("create", dir)(e)),
    }
}

fn ensure_dir(dir: &Path) -> Result<(), SpoolError> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
            .map_err(io_err("set the mode of", dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("create", dir)(e)),
    }
}

/// The entries of a directory, oldest first; other names are ignored.
fn list_entries(dir: &Path) -> Result<Vec<EntryId>, SpoolError> {
    let mut ids = Vec::new();
    for item in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let item = item.map_err(io_err("list", dir))?;
        if let Some(id) = item.file_name().to_str().and_then(EntryId::from_file_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Counts the entries of a directory, stopping at `limit` (the hook only needs to know whether
/// the limit is reached, and must stay fast).
fn count_entries(dir: &Path, limit: usize) -> Result<usize, SpoolError> {
    let mut count = 0;
    for item in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let item = item.map_err(io_err("list", dir))?;
        let name = item.file_name();
        let name = name.as_encoded_bytes();
        if name.ends_with(ENTRY_SUFFIX.as_bytes()) && !name.starts_with(b".") {
            count += 1;
            if count >= limit {
                break;
            }
        }
    }
    Ok(count)
}

/// Reads a small file; `None` if it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, SpoolError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_ENTRY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    let bad = |source| SpoolError::BadEntry {
        path: path.to_path_buf(),
        source,
    };
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(bad(EntryError::TooLarge));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad(EntryError::NotUtf8))
}

/// Reads and checks an entry file; `None` if it does not exist.
fn read_entry(path: &Path, id: &EntryId) -> Result<Option<(Entry, Option<Retry>)>, SpoolError> {
    let Some(text) = read_small(path)? else {
        return Ok(None);
    };
    let bad = |source| SpoolError::BadEntry {
        path: path.to_path_buf(),
        source,
    };
    let (entry, retry) = Entry::decode(&text).map_err(bad)?;
    if entry.key() != id.key {
        return Err(bad(EntryError::KeyMismatch));
    }
    Ok(Some((entry, retry)))
}

/// Writes `name` in `dir` whole or not at all, with the spool's file mode; the caller fsyncs
/// `dir` ([`sync_dir`]).
fn write_atomically(dir: &Path, name: &str, content: &[u8]) -> Result<(), SpoolError> {
    atomic_file::write(dir, name, content, Mode::Exact(FILE_MODE)).map_err(SpoolError::from)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    atomic_file::sync_dir(dir).map_err(SpoolError::from)
}

fn remove_file(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Links `from` to `name` in `dir` (the entry's content is already durable, so nothing is copied or
/// fsynced); where the kernel refuses the link (another filesystem, or protected_hardlinks
/// with a file the caller may not write), writes `text` there instead. An existing `name` is the
/// same entry (same name, same digest): left alone.
fn link_or_copy(from: &Path, dir: &Path, name: &str, text: &str) -> Result<(), SpoolError> {
    match fs::hard_link(from, dir.join(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(_) => write_atomically(dir, name, text.as_bytes()),
    }
}

/// Removes `.tmp-` files older than [`TEMP_MAX_AGE`]; returns how many.
fn remove_stale_temps(dir: &Path) -> Result<usize, SpoolError> {
    let mut removed = 0;
    for item in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let item = item.map_err(io_err("list", dir))?;
        if !item
            .file_name()
            .as_encoded_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
        {
            continue;
        }
        let age = item
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age > TEMP_MAX_AGE) {
            remove_file(&item.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/p5fh7jg51y4pqpnm7afc44i54c8i9x0d-x0.drv";
    const OUT: &str = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0";
    const DEV: &str = "/nix/store/x8xpv4jfa69jx19l530d7yzl7pjb1y6i-x0-dev";

    fn path(s: &str) -> StorePath {
        s.parse().expect("a valid store path")
    }

    fn entry(drv: Option<&str>, outs: &[&str]) -> Entry {
        Entry::new(drv.map(path), outs.iter().map(|o| path(o))).expect("an entry")
    }

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path()).expect("open spool");
        (dir, spool)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entries_round_trip_in_canonical_order() {
        let e = entry(Some(DRV), &[OUT, DEV, OUT]);
        let text = e.encode(None);
        assert_eq!(
            text,
            format!("reachd-upload 1\ndrv {DRV}\nout {OUT}\nout {DEV}\n")
        );
        assert_eq!(Entry::decode(&text), Ok((e.clone(), None)));
        let retry = Retry {
            attempts: 3,
            next_try: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            error: "error: \x1b[31mno\x1b[0m\nway".into(),
        };
        let text = e.encode(Some(&retry));
        let (decoded, got) = Entry::decode(&text).expect("decode");
        assert_eq!(decoded, e);
        let got = got.expect("retry");
        assert_eq!((got.attempts, got.next_try), (3, retry.next_try));
        assert_eq!(got.error, "error: no | way");
        // Only the paths identify an entry.
        assert_eq!(entry(Some(DRV), &[DEV, OUT]).key(), e.key());
        assert_ne!(entry(Some(DRV), &[OUT]).key(), e.key());
    }

    #[test]
    fn the_digest_never_changes() {
        // Entries already on disk carry it in their names; a new digest would stop merging.
        assert_eq!(entry(Some(DRV), &[OUT]).key(), 0xffa1_2369_40e6_ca99);
    }

    #[test]
    fn decode_refuses_anything_but_a_whole_valid_entry() {
        let good = format!("reachd-upload 1\ndrv {DRV}\nout {OUT}\n");
        assert!(Entry::decode(&good).is_ok());
        let cases = [
            (String::new(), "newline"),
            (good[..good.len() - 1].to_string(), "newline"),
            (good[..good.len() - 10].to_string(), "newline"),
            (good.replace("upload 1", "upload 2"), "first line"),
            (good.replace('\n', "\r\n"), "first line"),
            (format!("{good}rm -rf /\n"), "unknown field"),
            (format!("{good}drv {DRV}\n"), "second `drv`"),
            (format!("{good}out /etc/passwd\n"), "not a store path"),
            (format!("{good}out {OUT} x\n"), "not a store path"),
            (format!("{good}\n"), "unknown field"),
            ("reachd-upload 1\n".into(), "no path"),
            (format!("{good}attempts 1\n"), "together"),
            (
                format!("{good}attempts x\nnext-try 1\nerror e\n"),
                "attempts",
            ),
            (
                format!("{good}attempts 1\nattempts 1\nnext-try 1\nerror e\n"),
                "repeated",
            ),
        ];
        for (text, why) in cases {
            let err = Entry::decode(&text).expect_err(&text).to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn error_text_is_kept_on_one_short_line() {
        assert_eq!(
            one_line("\x1b[31;1merror:\x1b[0m a\r\n\n\tb\n"),
            "error: a |  b"
        );
        let long = one_line(&"é".repeat(5000));
        assert_eq!(long.chars().count(), MAX_ERROR_CHARS);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn entry_names_sort_oldest_first_and_odd_names_are_not_entries() {
        let a = EntryId {
            ns: 9,
            pid: 70000,
            key: 1,
        };
        let b = EntryId {
            ns: 10,
            pid: 1,
            key: 0,
        };
        assert!(a < b);
        assert_eq!(
            a.file_name(),
            "00000000000000000009-70000-0000000000000001.entry"
        );
        assert_eq!(EntryId::from_file_name(&a.file_name()), Some(a));
        for odd in [
            ".tmp-1-2-3",
            "00000000000000000009-70000-0000000000000001",
            "00000000000000000009-70000-000000000000001.entry",
            "00000000000000000009-70000-000000000000000G.entry",
            "9-x-0000000000000001.entry",
            "000000000000000000009-1-0000000000000001.entry",
            "9-1-0000000000000001-2.entry",
            "state",
        ] {
            assert_eq!(EntryId::from_file_name(odd), None, "{odd}");
        }
    }

    #[test]
    fn record_writes_one_whole_file_group_writable_and_leaves_no_temp() {
        let (dir, spool) = spool();
        let e = entry(Some(DRV), &[]);
        let id = spool.record(&e).expect("record");
        let incoming = dir.path().join("incoming");
        assert_eq!(names(&incoming), vec![id.file_name()]);
        let file = incoming.join(id.file_name());
        let mode = fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let dir_mode = fs::metadata(&incoming).expect("stat").permissions().mode();
        assert_eq!(dir_mode & 0o7777, 0o2770);
        assert_eq!(fs::read_to_string(file).expect("read"), e.encode(None));
        assert_eq!(id.pid, std::process::id());
        assert_eq!(id.key, e.key());
        assert_eq!(spool.incoming_len().expect("count"), 1);
    }

    #[test]
    fn a_full_spool_refuses_new_entries_and_keeps_the_old() {
        let (_dir, spool) = spool();
        let spool = spool.with_capacity(2);
        let first = spool.record(&entry(Some(DRV), &[])).expect("record");
        spool.record(&entry(None, &[OUT])).expect("record");
        let err = spool.record(&entry(None, &[DEV])).expect_err("full");
        assert!(matches!(err, SpoolError::Full { count: 2, .. }), "{err}");
        assert!(err.to_string().starts_with("spool full"), "{err}");
        spool.claim(&["rpi"]).expect("claim");
        assert_eq!(spool.pending("rpi").expect("pending")[0], first);
        // The queue is full too: the next claim leaves the entry where it is.
        spool.record(&entry(None, &[DEV])).expect("room again");
        let report = spool.claim(&["rpi"]).expect("claim");
        assert_eq!(
            (report.claimed, report.full.as_slice()),
            (0, &["rpi".to_string()][..])
        );
        assert_eq!(spool.incoming_len().expect("count"), 1);
    }

    #[test]
    fn a_writer_killed_before_its_rename_leaves_nothing_visible() {
        let (dir, spool) = spool();
        let incoming = dir.path().join("incoming");
        // What a hook killed between create and rename leaves: a partial temporary file.
        let partial = incoming.join(".tmp-4242-1-0");
        fs::write(&partial, "reachd-upload 1\ndrv /nix/st").expect("write");
        let stale = incoming.join(".tmp-4243-1-0");
        fs::write(&stale, "reachd-upload 1\n").expect("write");
        let old = SystemTime::now() - TEMP_MAX_AGE - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(old))
            .expect("age it");
        assert_eq!(spool.incoming_len().expect("count"), 0);
        let report = spool.claim(&["rpi"]).expect("claim");
        assert_eq!((report.claimed, report.rejected.len()), (0, 0));
        assert_eq!(report.stale_temps, 1);
        assert!(
            partial.exists(),
            "a recent temporary file may still be written"
        );
        assert!(!stale.exists());
        assert!(spool.pending("rpi").expect("pending").is_empty());
    }

    #[test]
    fn claim_gives_every_host_every_entry_and_empties_incoming() {
        let (dir, spool) = spool();
        let a = spool.record(&entry(Some(DRV), &[])).expect("record");
        let b = spool.record(&entry(None, &[OUT])).expect("record");
        let report = spool.claim(&["rpi", "nas"]).expect("claim");
        assert_eq!((report.claimed, report.merged), (2, 0));
        assert!(names(&dir.path().join("incoming")).is_empty());
        for host in ["rpi", "nas"] {
            assert_eq!(spool.pending(host).expect("pending"), vec![a, b]);
            let q = spool.load(host, &b).expect("load").expect("present");
            assert_eq!(q.entry, entry(None, &[OUT]));
            assert_eq!(q.retry, None);
        }
        // Done on one host only removes it there.
        spool.done("rpi", &[a]).expect("done");
        assert_eq!(spool.pending("rpi").expect("pending"), vec![b]);
        assert_eq!(spool.pending("nas").expect("pending"), vec![a, b]);
        assert_eq!(spool.load("rpi", &a).expect("load"), None);
        spool.done("rpi", &[a]).expect("done twice is fine");
    }

    #[test]
    fn claiming_for_no_host_removes_nothing() {
        let (_dir, spool) = spool();
        spool.record(&entry(Some(DRV), &[])).expect("record");
        let report = spool.claim(&[]).expect("claim");
        assert_eq!(report.claimed, 0);
        assert_eq!(spool.incoming_len().expect("count"), 1);
        let report = spool.claim(&["rpi", "rpi"]).expect("claim");
        assert_eq!((report.claimed, report.merged), (1, 0));
        assert_eq!(spool.pending("rpi").expect("pending").len(), 1);
    }

    #[test]
    fn identical_entries_merge_and_the_oldest_keeps_its_place() {
        let (_dir, spool) = spool();
        let first = spool.record(&entry(Some(DRV), &[OUT])).expect("record");
        let other = spool.record(&entry(None, &[DEV])).expect("record");
        spool.claim(&["rpi"]).expect("claim");
        spool.record(&entry(Some(DRV), &[OUT])).expect("again");
        let report = spool.claim(&["rpi"]).expect("claim");
        assert_eq!((report.claimed, report.merged), (1, 1));
        assert_eq!(spool.pending("rpi").expect("pending"), vec![first, other]);
    }

    #[test]
    fn a_claim_cut_short_is_finished_by_the_next_without_duplicates() {
        let (dir, spool) = spool();
        spool.claim(&["rpi", "nas"]).expect("create the queues");
        let id = spool.record(&entry(Some(DRV), &[])).expect("record");
        // Killed after linking into rpi's queue, before nas's and before the unlink.
        let name = id.file_name();
        fs::hard_link(
            dir.path().join("incoming").join(&name),
            dir.path().join("hosts/rpi").join(&name),
        )
        .expect("link");
        let report = spool.claim(&["rpi", "nas"]).expect("claim");
        assert_eq!((report.claimed, report.merged), (1, 1));
        assert_eq!(spool.pending("rpi").expect("pending"), vec![id]);
        assert_eq!(spool.pending("nas").expect("pending"), vec![id]);
        assert_eq!(spool.incoming_len().expect("count"), 0);
    }

    #[test]
    fn claim_removes_and_reports_files_that_are_not_entries() {
        let (dir, spool) = spool();
        let good = spool.record(&entry(None, &[OUT])).expect("record");
        let incoming = dir.path().join("incoming");
        let forged = EntryId {
            ns: 1,
            pid: 1,
            key: entry(None, &[DEV]).key(),
        };
        fs::write(
            incoming.join(forged.file_name()),
            "reachd-upload 1\nout /etc/passwd\n",
        )
        .expect("write");
        let mismatched = EntryId {
            ns: 2,
            pid: 1,
            key: 7,
        };
        fs::write(
            incoming.join(mismatched.file_name()),
            entry(None, &[DEV]).encode(None),
        )
        .expect("write");
        fs::write(incoming.join("README"), "not an entry").expect("write");
        let report = spool.claim(&["rpi"]).expect("claim");
        assert_eq!(report.claimed, 1);
        let errors: Vec<String> = report
            .rejected
            .iter()
            .map(|e| crate::error::chain(e))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("not a store path"), "{errors:?}");
        assert!(errors[1].contains("digest"), "{errors:?}");
        assert_eq!(spool.pending("rpi").expect("pending"), vec![good]);
        assert_eq!(names(&incoming), vec!["README".to_string()]);
    }

    #[test]
    fn retry_state_is_kept_per_entry_and_per_queue() {
        let (_dir, spool) = spool();
        let id = spool.record(&entry(None, &[OUT])).expect("record");
        spool.claim(&["rpi"]).expect("claim");
        let retry = Retry {
            attempts: 2,
            next_try: UNIX_EPOCH + Duration::from_secs(2_000_000_000),
            error: "lacks a valid signature".into(),
        };
        spool
            .set_retries("rpi", &[(id, Some(retry.clone()))])
            .expect("set");
        let q = spool.load("rpi", &id).expect("load").expect("present");
        assert_eq!(q.retry.as_ref(), Some(&retry));
        assert_eq!(q.entry, entry(None, &[OUT]));
        spool.set_retries("rpi", &[(id, None)]).expect("clear");
        assert_eq!(
            spool
                .load("rpi", &id)
                .expect("load")
                .expect("present")
                .retry,
            None
        );

        assert_eq!(spool.queue_retry("rpi").expect("read"), None);
        spool.set_queue_retry("rpi", Some(&retry)).expect("set");
        assert_eq!(spool.queue_retry("rpi").expect("read"), Some(retry));
        spool.set_queue_retry("rpi", None).expect("clear");
        assert_eq!(spool.queue_retry("rpi").expect("read"), None);
        spool
            .set_queue_retry("never-claimed", None)
            .expect("nothing to clear");
    }

    #[test]
    fn host_names_cannot_leave_the_spool() {
        let (_dir, spool) = spool();
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "RPI",
            "rpi.local",
            &"a".repeat(33),
        ] {
            assert!(
                matches!(spool.pending(bad), Err(SpoolError::BadHost(_))),
                "{bad:?}"
            );
            assert!(spool.claim(&[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_spool_says_how_to_create_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = Spool::open(dir.path().join("nope")).expect_err("missing");
        assert!(err.to_string().contains("tmpfiles.d/reachd.conf"), "{err}");
    }
}
