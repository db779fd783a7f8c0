//! A client of the Nix daemon's worker protocol, for the three questions a binary cache asks:
//! which store path has this hash part, what is known about it, and what is in it (its NAR).
//! Nix's own `unix://` store cannot answer the last one for another machine (it reads the files
//! from the local disk), so reachd asks the Pi's daemon itself, through the tunnelled socket.
//!
//! Learnt from Nix's source (2.8.0 and today's): `worker-protocol.hh`, `remote-store.cc`,
//! `worker-protocol-connection.cc`, `daemon.cc`, `serialise.cc`. Every number on the wire is a
//! little-endian u64; a string is its length, its bytes and zero padding to a multiple of 8; a
//! list is its length and its items. Both sides send their version and use the smaller one
//! (Nix 2.8's daemon speaks 1.34). Nothing here calls `SetOptions`: the daemon's defaults serve
//! these queries, and newer clients skip it too when the daemon allows.
//!
//! Everything read is untrusted: strings, lists and whole replies are bounded before anything is
//! allocated for them, malformed input is an error (never a panic), and every operation runs
//! under a caller-supplied deadline, so a half-dead tunnel that accepts and never answers costs
//! a timeout, not a hang.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::debug;

use super::hash::{BadHash, Sha256};
use super::nar::{NarError, NarFramer};
use crate::store_path::hash_part_of;

pub(super) const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub(super) const WORKER_MAGIC_2: u64 = 0x6478_696f;

pub(super) const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub(super) const STDERR_READ: u64 = 0x6461_7461;
pub(super) const STDERR_WRITE: u64 = 0x6461_7416;
pub(super) const STDERR_LAST: u64 = 0x616c_7473;
pub(super) const STDERR_ERROR: u64 = 0x6378_7470;
pub(super) const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub(super) const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub(super) const STDERR_RESULT: u64 = 0x5253_4c54;

pub(super) const OP_QUERY_PATH_INFO: u64 = 26;
pub(super) const OP_QUERY_PATH_FROM_HASH_PART: u64 = 29;
pub(super) const OP_NAR_FROM_PATH: u64 = 38;

/// The newest version this client speaks: 1.38 added the feature exchange (we offer none).
const CLIENT_VERSION: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 38,
};
/// The oldest daemon accepted, as in today's Nix (path info validity flag and signatures).
const MIN_DAEMON_MINOR: u8 = 18;

/// The longest protocol string kept: store paths, hashes, signatures, CA, feature names.
const MAX_STRING: usize = 64 * 1024;
/// The longest log line or error message kept.
const MAX_MESSAGE: usize = 1024 * 1024;
/// The most items in one list (references, signatures, log fields, error traces).
const MAX_LIST: u64 = 1_000_000;
/// The most string bytes one reply may make us hold (log lines are dropped as they come).
const MAX_REPLY: usize = 64 * 1024 * 1024;
/// Read buffer: also the largest NAR chunk handed out.
const BUFFER: usize = 64 * 1024;

/// A worker protocol version, `major.minor` (on the wire `major << 8 | minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtocolVersion {
    pub major: u8,
    pub minor: u8,
}

impl ProtocolVersion {
    fn wire(self) -> u64 {
        u64::from(self.major) << 8 | u64::from(self.minor)
    }

    fn at_least(self, minor: u8) -> bool {
        self >= ProtocolVersion { major: 1, minor }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the daemon knows about a valid store path (`ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The full store path asked about.
    pub path: String,
    /// The full store path of the derivation that built it, if known.
    pub deriver: Option<String>,
    pub nar_hash: Sha256,
    /// Full store paths.
    pub references: Vec<String>,
    /// Seconds since the epoch.
    pub registration_time: u64,
    pub nar_size: u64,
    /// Built locally rather than substituted.
    pub ultimate: bool,
    /// `keyname:base64`, as the daemon holds them.
    pub sigs: Vec<String>,
    /// The content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot connect to the Nix daemon at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the Nix daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Nix daemon closed the connection")]
    Closed,
    #[error("talking to the Nix daemon")]
    Io(#[source] io::Error),
    #[error("the Nix daemon broke the protocol")]
    Protocol(#[from] ProtocolError),
    #[error("the Nix daemon reported: {0}")]
    Remote(String),
    #[error("the daemon connection is out of step after an earlier failure")]
    Desynchronized,
}

/// How a daemon's reply broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad greeting {0:#x}")]
    BadMagic(u64),
    #[error("unsupported protocol version {0:#x} (1.{MIN_DAEMON_MINOR} or newer is needed)")]
    UnsupportedVersion(u64),
    #[error("{what} of {len} bytes is too long")]
    TooLong { what: &'static str, len: u64 },
    #[error("{what}: {len} items are too many")]
    TooMany { what: &'static str, len: u64 },
    #[error("non-zero padding after a string")]
    Padding,
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown message type {0:#x}")]
    UnknownMessage(u64),
    #[error("unknown log field type {0}")]
    UnknownField(u64),
    #[error("the daemon asked to exchange data in an operation that has none")]
    UnexpectedData,
    #[error("malformed error report")]
    BadErrorReport,
    #[error("invalid trust flag {0}")]
    BadTrustFlag(u64),
    #[error(transparent)]
    Hash(#[from] BadHash),
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("asked for hash part {asked}, got path {path:?}")]
    WrongPath { asked: String, path: String },
    #[error("the NAR has {got} bytes, its path info says {expected}")]
    NarSize { expected: u64, got: u64 },
    #[error("not a store path: {0:?}")]
    BadStorePath(String),
    #[error("a field with control characters: {0:?}")]
    BadField(String),
}

/// Runs `fut` within `deadline`.
pub(crate) async fn within<T>(
    deadline: Duration,
    fut: impl std::future::Future<Output = Result<T, DaemonError>>,
) -> Result<T, DaemonError> {
    tokio::time::timeout(deadline, fut)
        .await
        .map_err(|_| DaemonError::Timeout(deadline))?
}

fn io_error(e: io::Error) -> DaemonError {
    use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e.kind() {
        UnexpectedEof | BrokenPipe | ConnectionReset => DaemonError::Closed,
        _ => DaemonError::Io(e),
    }
}

/// A request being put together: numbers and padded strings.
struct Request(Vec<u8>);

impl Request {
    fn new() -> Self {
        Request(Vec::with_capacity(256))
    }

    fn num(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }

    fn string(mut self, s: &str) -> Self {
        self = self.num(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self.0.resize(self.0.len() + padding(s.len() as u64), 0);
        self
    }
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// A connection to a Nix daemon that has completed the handshake.
#[derive(Debug)]
pub struct Daemon<S> {
    io: BufReader<S>,
    version: ProtocolVersion,
    nix_version: Option<String>,
    /// Set while an operation is under way; still set if it failed half-way, when the stream
    /// can no longer be read in step with the daemon.
    busy: bool,
    /// What the current reply may still make us allocate.
    budget: usize,
}

impl Daemon<UnixStream> {
    /// Connects to the daemon socket at `socket` and completes the handshake, all within
    /// `deadline`.
    pub async fn connect(socket: &Path, deadline: Duration) -> Result<Self, DaemonError> {
        Self::connect_through(socket, deadline, |stream| stream).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Daemon<S> {
    /// Like [`Daemon::connect`], talking through what `wrap` makes of the socket's stream.
    pub async fn connect_through(
        socket: &Path,
        deadline: Duration,
        wrap: impl FnOnce(UnixStream) -> S,
    ) -> Result<Self, DaemonError> {
        let start = Instant::now();
        let stream = within(deadline, async {
            UnixStream::connect(socket)
                .await
                .map_err(|source| DaemonError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })
        })
        .await?;
        Self::handshake(wrap(stream), deadline.saturating_sub(start.elapsed())).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Daemon<S> {
    /// Greets the daemon on `stream` and agrees on a version, within `deadline`.
    pub async fn handshake(stream: S, deadline: Duration) -> Result<Self, DaemonError> {
        let mut daemon = Daemon {
            io: BufReader::with_capacity(BUFFER, stream),
            version: CLIENT_VERSION,
            nix_version: None,
            busy: true,
            budget: MAX_REPLY,
        };
        within(deadline, daemon.greet()).await?;
        daemon.busy = false;
        Ok(daemon)
    }

    /// The protocol version in use: the smaller of the daemon's and ours.
    pub fn protocol(&self) -> ProtocolVersion {
        self.version
    }

    /// True between operations: the last one ended in step with the daemon (successfully, or
    /// with an error the daemon reported), so the connection can serve another.
    pub fn is_ready(&self) -> bool {
        !self.busy
    }

    /// The daemon's Nix version, which daemons speaking 1.33 or newer tell.
    pub fn nix_version(&self) -> Option<&str> {
        self.nix_version.as_deref()
    }

    async fn greet(&mut self) -> Result<(), DaemonError> {
        // Version along with the magic, as Nix does today: old daemons read it in turn.
        self.send(
            Request::new()
                .num(WORKER_MAGIC_1)
                .num(CLIENT_VERSION.wire()),
        )
        .await?;
        let magic = self.read_num().await?;
        if magic != WORKER_MAGIC_2 {
            return Err(ProtocolError::BadMagic(magic).into());
        }
        let wire = self.read_num().await?;
        let (major, minor) = (wire >> 8, wire & 0xff);
        if wire > 0xffff || major != 1 || minor < u64::from(MIN_DAEMON_MINOR) {
            return Err(ProtocolError::UnsupportedVersion(wire).into());
        }
        self.version = CLIENT_VERSION.min(ProtocolVersion {
            major: 1,
            minor: minor as u8,
        });
        let mut request = Request::new();
        if self.version.at_least(38) {
            // Our features (none), then the daemon's, which we therefore cannot use.
            self.send(Request::new().num(0)).await?;
            let features = self.read_strings("protocol feature").await?;
            debug!(?features, "Nix daemon protocol features");
        }
        if self.version.at_least(14) {
            request = request.num(0); // obsolete CPU affinity: none
        }
        if self.version.at_least(11) {
            request = request.num(0); // obsolete reserveSpace
        }
        self.send(request).await?;
        if self.version.at_least(33) {
            self.nix_version = Some(self.read_string(MAX_STRING, "Nix version").await?);
        }
        if self.version.at_least(35) {
            // Whether the daemon trusts us: 0 unknown, 1 yes, 2 no. Reading needs no trust.
            let trusted = self.read_num().await?;
            if trusted > 2 {
                return Err(ProtocolError::BadTrustFlag(trusted).into());
            }
        }
        self.read_stderr().await
    }

    /// The store path whose hash part is `hash_part`, if the daemon has one.
    pub async fn query_path_from_hash_part(
        &mut self,
        hash_part: &str,
        deadline: Duration,
    ) -> Result<Option<String>, DaemonError> {
        self.begin()?;
        let result = within(deadline, async {
            let request = Request::new()
                .num(OP_QUERY_PATH_FROM_HASH_PART)
                .string(hash_part);
            self.send(request).await?;
            self.read_stderr().await?;
            let path = self.read_string(MAX_STRING, "store path").await?;
            if path.is_empty() {
                return Ok(None);
            }
            if hash_part_of(&path) != Some(hash_part) {
                let asked = hash_part.to_string();
                return Err(ProtocolError::WrongPath { asked, path }.into());
            }
            Ok(Some(path))
        })
        .await;
        self.end(&result);
        result
    }

    /// What the daemon knows about `path`, or `None` if it is not a valid path there.
    pub async fn query_path_info(
        &mut self,
        path: &str,
        deadline: Duration,
    ) -> Result<Option<PathInfo>, DaemonError> {
        self.begin()?;
        let result = within(deadline, async {
            let request = Request::new().num(OP_QUERY_PATH_INFO).string(path);
            self.send(request).await?;
            self.read_stderr().await?;
            if self.read_num().await? == 0 {
                return Ok(None);
            }
            let deriver = self.read_string(MAX_STRING, "deriver").await?;
            let nar_hash = self.read_string(MAX_STRING, "NAR hash").await?;
            let nar_hash = Sha256::parse(&nar_hash).map_err(ProtocolError::from)?;
            let references = self.read_strings("reference").await?;
            let registration_time = self.read_num().await?;
            let nar_size = self.read_num().await?;
            // Every version accepted (>= 1.18) sends these three (since 1.16).
            let ultimate = self.read_num().await? != 0;
            let sigs = self.read_strings("signature").await?;
            let ca = self.read_string(MAX_STRING, "content address").await?;
            Ok(Some(PathInfo {
                path: path.to_string(),
                deriver: (!deriver.is_empty()).then_some(deriver),
                nar_hash,
                references,
                registration_time,
                nar_size,
                ultimate,
                sigs,
                ca: (!ca.is_empty()).then_some(ca),
            }))
        })
        .await;
        self.end(&result);
        result
    }

    /// Asks for `path`'s NAR: the request and the daemon's go-ahead within `deadline`; then
    /// the returned stream hands out the archive, each read waiting at most `deadline` too.
    pub async fn nar_from_path(
        mut self,
        path: &str,
        deadline: Duration,
    ) -> Result<NarStream<S>, DaemonError> {
        self.begin()?;
        within(deadline, async {
            let request = Request::new().num(OP_NAR_FROM_PATH).string(path);
            self.send(request).await?;
            self.read_stderr().await
        })
        .await?;
        Ok(NarStream {
            daemon: self,
            framer: NarFramer::new(),
            stall: deadline,
        })
    }

    fn begin(&mut self) -> Result<(), DaemonError> {
        if self.busy {
            return Err(DaemonError::Desynchronized);
        }
        self.busy = true;
        self.budget = MAX_REPLY;
        Ok(())
    }

    /// The connection stays usable after success or an error the daemon reported in order.
    fn end<T>(&mut self, result: &Result<T, DaemonError>) {
        self.busy = !matches!(result, Ok(_) | Err(DaemonError::Remote(_)));
    }

    async fn send(&mut self, request: Request) -> Result<(), DaemonError> {
        self.io.write_all(&request.0).await.map_err(io_error)?;
        self.io.flush().await.map_err(io_error)
    }

    /// Reads the daemon's log messages up to `STDERR_LAST`, or its error.
    async fn read_stderr(&mut self) -> Result<(), DaemonError> {
        loop {
            match self.read_num().await? {
                STDERR_LAST => return Ok(()),
                STDERR_ERROR => return Err(self.read_remote_error().await?),
                STDERR_NEXT => {
                    let line = self.read_message().await?;
                    debug!("Nix daemon: {}", line.trim_end());
                }
                STDERR_START_ACTIVITY => {
                    let id = self.read_num().await?;
                    let _level = self.read_num().await?;
                    let _kind = self.read_num().await?;
                    let text = self.read_message().await?;
                    self.skip_fields().await?;
                    let _parent = self.read_num().await?;
                    debug!(id, "Nix daemon activity: {text}");
                }
                STDERR_STOP_ACTIVITY => {
                    self.read_num().await?;
                }
                STDERR_RESULT => {
                    let _id = self.read_num().await?;
                    let _kind = self.read_num().await?;
                    self.skip_fields().await?;
                }
                STDERR_READ | STDERR_WRITE => return Err(ProtocolError::UnexpectedData.into()),
                other => return Err(ProtocolError::UnknownMessage(other).into()),
            }
        }
    }

    /// The fields of an activity or result: a list of (0, number) or (1, string).
    async fn skip_fields(&mut self) -> Result<(), DaemonError> {
        let n = self.read_list_len("log field").await?;
        for _ in 0..n {
            match self.read_num().await? {
                0 => {
                    self.read_num().await?;
                }
                1 => {
                    self.read_message().await?;
                }
                other => return Err(ProtocolError::UnknownField(other).into()),
            }
        }
        Ok(())
    }

    /// `STDERR_ERROR`'s payload: structured since 1.26 ("Error", level, name, message, no
    /// position, traces), a message and an exit status before.
    async fn read_remote_error(&mut self) -> Result<DaemonError, DaemonError> {
        if !self.version.at_least(26) {
            let message = self.read_message().await?;
            let _status = self.read_num().await?;
            return Ok(DaemonError::Remote(message));
        }
        if self.read_string(MAX_STRING, "error type").await? != "Error" {
            return Err(ProtocolError::BadErrorReport.into());
        }
        let _level = self.read_num().await?;
        let _name = self.read_string(MAX_STRING, "error name").await?;
        let mut message = self.read_message().await?;
        if self.read_num().await? != 0 {
            // An error position, which no daemon sends.
            return Err(ProtocolError::BadErrorReport.into());
        }
        let traces = self.read_list_len("error trace").await?;
        for _ in 0..traces {
            if self.read_num().await? != 0 {
                return Err(ProtocolError::BadErrorReport.into());
            }
            let trace = self.read_message().await?;
            if message.len() + trace.len() < MAX_MESSAGE {
                message.push_str("\n… ");
                message.push_str(&trace);
            }
        }
        Ok(DaemonError::Remote(message))
    }

    async fn read_num(&mut self) -> Result<u64, DaemonError> {
        let mut buf = [0u8; 8];
        self.io.read_exact(&mut buf).await.map_err(io_error)?;
        Ok(u64::from_le_bytes(buf))
    }

    async fn read_bytes(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, DaemonError> {
        let len = self.read_num().await?;
        if len > max as u64 {
            return Err(ProtocolError::TooLong { what, len }.into());
        }
        let n = len as usize;
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or(ProtocolError::TooLong { what, len })?;
        let mut buf = vec![0u8; n];
        self.io.read_exact(&mut buf).await.map_err(io_error)?;
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding(len)];
        self.io.read_exact(pad).await.map_err(io_error)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(ProtocolError::Padding.into());
        }
        Ok(buf)
    }

    async fn read_string(&mut self, max: usize, what: &'static str) -> Result<String, DaemonError> {
        let bytes = self.read_bytes(max, what).await?;
        String::from_utf8(bytes).map_err(|_| ProtocolError::NotUtf8(what).into())
    }

    /// A log line or error message: any bytes, shown lossily, not charged to the reply.
    async fn read_message(&mut self) -> Result<String, DaemonError> {
        let budget = self.budget;
        self.budget = MAX_MESSAGE;
        let bytes = self.read_bytes(MAX_MESSAGE, "message").await;
        self.budget = budget;
        Ok(String::from_utf8_lossy(&bytes?).into_owned())
    }

    async fn read_list_len(&mut self, what: &'static str) -> Result<u64, DaemonError> {
        let len = self.read_num().await?;
        if len > MAX_LIST {
            return Err(ProtocolError::TooMany { what, len }.into());
        }
        Ok(len)
    }

    async fn read_strings(&mut self, what: &'static str) -> Result<Vec<String>, DaemonError> {
        let n = self.read_list_len(what).await?;
        // Grown as items arrive, not reserved from the untrusted count.
        let mut items = Vec::new();
        for _ in 0..n {
            items.push(self.read_string(MAX_STRING, what).await?);
        }
        Ok(items)
    }
}

/// A NAR coming from the daemon, handed out in chunks as they arrive; its end is found by
/// following the archive's structure (the daemon sends no length).
#[derive(Debug)]
pub struct NarStream<S> {
    daemon: Daemon<S>,
    framer: NarFramer,
    stall: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> NarStream<S> {
    /// The next piece of the archive, `None` after its last byte. An error if the daemon sends
    /// nothing for the stall deadline, closes the connection early, or sends something that is
    /// not a NAR.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, DaemonError> {
        if self.framer.is_done() {
            return Ok(None);
        }
        let io = &mut self.daemon.io;
        let buf = tokio::time::timeout(self.stall, io.fill_buf())
            .await
            .map_err(|_| DaemonError::Timeout(self.stall))?
            .map_err(io_error)?;
        if buf.is_empty() {
            return Err(DaemonError::Closed);
        }
        let n = self.framer.feed(buf).map_err(ProtocolError::from)?;
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        io.consume(n);
        Ok(Some(chunk))
    }

    /// The archive bytes handed out so far.
    pub fn consumed(&self) -> u64 {
        self.framer.consumed()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_daemon::{Wire, HASH_PART, HEX, PATH};
    use super::*;
    use tokio::io::{duplex, DuplexStream};
    use tokio::task::JoinHandle;

    const TREE: &[u8] = include_bytes!("testdata/tree.nar");
    const DEADLINE: Duration = Duration::from_secs(2);

    /// A daemon that sends `reply` and records what the client sent until it hangs up.
    fn fake(reply: Wire) -> (DuplexStream, JoinHandle<Vec<u8>>) {
        let (client, mut server) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let _ = server.write_all(&reply.0).await;
            let mut sent = Vec::new();
            let _ = server.read_to_end(&mut sent).await;
            sent
        });
        (client, task)
    }

    /// Like [`fake`], but the daemon closes its side after its reply (still reading).
    fn fake_then_close(reply: Wire) -> DuplexStream {
        let (client, mut server) = duplex(1 << 20);
        tokio::spawn(async move {
            let _ = server.write_all(&reply.0).await;
            let _ = server.shutdown().await;
            let _ = server.read_to_end(&mut Vec::new()).await;
        });
        client
    }

    #[tokio::test]
    async fn handshake_with_nix_2_8_speaks_1_34() {
        let (stream, sent) = fake(Wire::hello_2_8());
        let daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        assert_eq!(daemon.protocol().to_string(), "1.34");
        assert_eq!(daemon.nix_version(), Some("2.8.0"));
        drop(daemon);
        let expected = Wire::default().num(WORKER_MAGIC_1).num(0x126).num(0).num(0);
        assert_eq!(
            sent.await.unwrap(),
            expected.0,
            "magic, 1.38, no affinity, no reserve"
        );
    }

    #[tokio::test]
    async fn handshake_with_a_newer_daemon_exchanges_features_and_logs() {
        let reply = Wire::default()
            .num(WORKER_MAGIC_2)
            .num(0x127)
            .strs(&["some-feature"])
            .str("2.33.0")
            .num(2)
            .num(STDERR_NEXT)
            .str("warning: something\n")
            .num(STDERR_START_ACTIVITY)
            .num(7)
            .num(3)
            .num(100)
            .str("copying")
            .num(2)
            .num(0)
            .num(42)
            .num(1)
            .str("field")
            .num(0)
            .num(STDERR_RESULT)
            .num(7)
            .num(105)
            .num(1)
            .num(0)
            .num(5)
            .num(STDERR_STOP_ACTIVITY)
            .num(7)
            .num(STDERR_LAST);
        let (stream, sent) = fake(reply);
        let daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        assert_eq!(daemon.protocol().to_string(), "1.38");
        assert_eq!(daemon.nix_version(), Some("2.33.0"));
        drop(daemon);
        let expected = Wire::default()
            .num(WORKER_MAGIC_1)
            .num(0x126)
            .num(0)
            .num(0)
            .num(0);
        assert_eq!(sent.await.unwrap(), expected.0, "…, no features, …");
    }

    #[tokio::test]
    async fn queries_and_their_replies() {
        let reply = Wire::hello_2_8()
            .num(STDERR_LAST)
            .str(PATH)
            .num(STDERR_LAST)
            .str("")
            .raw(&Wire::path_info(160).0)
            .num(STDERR_LAST)
            .num(0);
        let (stream, sent) = fake(reply);
        let mut daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        let found = daemon.query_path_from_hash_part(HASH_PART, DEADLINE).await;
        assert_eq!(found.unwrap().as_deref(), Some(PATH));
        let missing = daemon
            .query_path_from_hash_part("00000000000000000000000000000000", DEADLINE)
            .await;
        assert_eq!(missing.unwrap(), None);
        let info = daemon.query_path_info(PATH, DEADLINE).await.unwrap();
        let info = info.expect("valid");
        assert_eq!(info.nar_hash, Sha256::parse(HEX).unwrap());
        assert_eq!(
            info.deriver.as_deref(),
            Some("/nix/store/cz6kjqr7di3ycz8n71xc4k37q453zmci-withref.drv")
        );
        assert_eq!(info.references.len(), 1);
        assert_eq!(
            (info.registration_time, info.nar_size),
            (1_700_000_000, 160)
        );
        assert!(info.ultimate);
        assert_eq!(info.sigs, ["pi-1:c2lnbmF0dXJl"]);
        assert_eq!(info.ca, None);
        let invalid = daemon.query_path_info(PATH, DEADLINE).await.unwrap();
        assert_eq!(invalid, None);
        drop(daemon);
        let expected = Wire::default()
            .num(WORKER_MAGIC_1)
            .num(0x126)
            .num(0)
            .num(0)
            .num(OP_QUERY_PATH_FROM_HASH_PART)
            .str(HASH_PART)
            .num(OP_QUERY_PATH_FROM_HASH_PART)
            .str("00000000000000000000000000000000")
            .num(OP_QUERY_PATH_INFO)
            .str(PATH)
            .num(OP_QUERY_PATH_INFO)
            .str(PATH);
        assert_eq!(sent.await.unwrap(), expected.0);
    }

    #[tokio::test]
    async fn a_reported_error_leaves_the_connection_usable() {
        let structured = Wire::hello_2_8()
            .num(STDERR_ERROR)
            .str("Error")
            .num(0)
            .str("Error")
            .str("path '/nix/store/x' is not in the Nix store")
            .num(0)
            .num(1)
            .num(0)
            .str("while doing something")
            .num(STDERR_LAST)
            .str(PATH);
        let (stream, _sent) = fake(structured);
        let mut daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        match daemon.query_path_from_hash_part(HASH_PART, DEADLINE).await {
            Err(DaemonError::Remote(msg)) => {
                assert!(msg.contains("is not in the Nix store"), "{msg}");
                assert!(msg.contains("while doing something"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let again = daemon.query_path_from_hash_part(HASH_PART, DEADLINE).await;
        assert_eq!(again.unwrap().as_deref(), Some(PATH));

        // Before 1.26: a message and an exit status.
        let old = Wire::default()
            .num(WORKER_MAGIC_2)
            .num(0x119)
            .num(STDERR_LAST)
            .num(STDERR_ERROR)
            .str("old-style failure")
            .num(1);
        let (stream, _sent) = fake(old);
        let mut daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        assert_eq!(daemon.protocol().to_string(), "1.25");
        match daemon.query_path_info(PATH, DEADLINE).await {
            Err(DaemonError::Remote(msg)) => assert_eq!(msg, "old-style failure"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_nar_ends_where_the_archive_ends() {
        let reply = Wire::hello_2_8()
            .num(STDERR_LAST)
            .raw(TREE)
            .raw(b"bytes that are not the NAR's");
        let (stream, _sent) = fake(reply);
        let daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        let mut nar = daemon.nar_from_path(PATH, DEADLINE).await.unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = nar.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, TREE);
        assert_eq!(nar.consumed(), TREE.len() as u64);
        assert!(nar.next_chunk().await.unwrap().is_none());
    }

    /// The error a NAR stream ends with when the daemon sends `nar` and closes.
    async fn nar_error(nar: &[u8]) -> DaemonError {
        let reply = Wire::hello_2_8().num(STDERR_LAST).raw(nar);
        let daemon = Daemon::handshake(fake_then_close(reply), DEADLINE)
            .await
            .unwrap();
        let mut stream = daemon.nar_from_path(PATH, DEADLINE).await.unwrap();
        loop {
            match stream.next_chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a broken NAR looked complete"),
                Err(err) => return err,
            }
        }
    }

    #[tokio::test]
    async fn a_nar_cut_short_or_corrupt_is_an_error() {
        let err = nar_error(&TREE[..TREE.len() - 8]).await;
        assert!(matches!(err, DaemonError::Closed), "{err:?}");

        let mut corrupt = TREE.to_vec();
        corrupt[100] ^= 0xff;
        let err = nar_error(&corrupt).await;
        assert!(
            matches!(err, DaemonError::Protocol(ProtocolError::Nar(_))),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_daemon_that_never_answers_times_out() {
        let (stream, _sent) = fake(Wire::default());
        let err = Daemon::handshake(stream, DEADLINE).await.unwrap_err();
        assert!(
            matches!(err, DaemonError::Timeout(d) if d == DEADLINE),
            "{err:?}"
        );

        // Greets, then says nothing about a query.
        let (stream, _sent) = fake(Wire::hello_2_8());
        let mut daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        let err = daemon.query_path_info(PATH, DEADLINE).await.unwrap_err();
        assert!(matches!(err, DaemonError::Timeout(_)), "{err:?}");
        let err = daemon.query_path_info(PATH, DEADLINE).await.unwrap_err();
        assert!(matches!(err, DaemonError::Desynchronized), "{err:?}");

        // Sends half a NAR, then stalls.
        let reply = Wire::hello_2_8().num(STDERR_LAST).raw(&TREE[..500]);
        let (stream, _sent) = fake(reply);
        let daemon = Daemon::handshake(stream, DEADLINE).await.unwrap();
        let mut nar = daemon.nar_from_path(PATH, DEADLINE).await.unwrap();
        assert!(nar.next_chunk().await.unwrap().is_some());
        let err = nar.next_chunk().await.unwrap_err();
        assert!(matches!(err, DaemonError::Timeout(_)), "{err:?}");
    }

    async fn handshake_error(reply: Wire) -> DaemonError {
        Daemon::handshake(fake_then_close(reply), DEADLINE)
            .await
            .unwrap_err()
    }

    async fn path_info_error(reply: Wire) -> DaemonError {
        let reply = Wire::hello_2_8().raw(&reply.0);
        let mut daemon = Daemon::handshake(fake_then_close(reply), DEADLINE)
            .await
            .unwrap();
        daemon.query_path_info(PATH, DEADLINE).await.unwrap_err()
    }

    #[tokio::test]
    async fn malformed_replies_are_errors_not_panics_or_huge_allocations() {
        let e = handshake_error(Wire::default().num(0x1234)).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::BadMagic(0x1234))),
            "{e:?}"
        );
        for version in [0x200, 0x111, 0x1_0122] {
            let e = handshake_error(Wire::default().num(WORKER_MAGIC_2).num(version)).await;
            assert!(
                matches!(
                    e,
                    DaemonError::Protocol(ProtocolError::UnsupportedVersion(_))
                ),
                "{version:#x}: {e:?}"
            );
        }
        let e = handshake_error(Wire::default().num(WORKER_MAGIC_2)).await;
        assert!(matches!(e, DaemonError::Closed), "{e:?}");
        let huge = Wire::default().num(WORKER_MAGIC_2).num(0x122).num(1 << 40);
        let e = handshake_error(huge).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::TooLong { .. })),
            "{e:?}"
        );
        let bad_message = Wire::default()
            .num(WORKER_MAGIC_2)
            .num(0x122)
            .str("2.8.0")
            .num(7);
        let e = handshake_error(bad_message).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::UnknownMessage(7))),
            "{e:?}"
        );

        let e = path_info_error(Wire::default().num(STDERR_READ).num(10)).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::UnexpectedData)),
            "{e:?}"
        );
        let many = Wire::default()
            .num(STDERR_LAST)
            .num(1)
            .str("")
            .str(HEX)
            .num(1 << 50);
        let e = path_info_error(many).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::TooMany { .. })),
            "{e:?}"
        );
        let bad_hash = Wire::default()
            .num(STDERR_LAST)
            .num(1)
            .str("")
            .str("md5:00");
        let e = path_info_error(bad_hash).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::Hash(_))),
            "{e:?}"
        );
        let mut padded = Wire::default().num(STDERR_LAST).num(1).str("x").0;
        let last = padded.len() - 1;
        padded[last] = 1;
        let e = path_info_error(Wire(padded)).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::Padding)),
            "{e:?}"
        );
        let not_error = Wire::default().num(STDERR_ERROR).str("Panic");
        let e = path_info_error(not_error).await;
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::BadErrorReport)),
            "{e:?}"
        );

        let wrong = Wire::hello_2_8()
            .num(STDERR_LAST)
            .str("/nix/store/cc84x1xzmv1y70awlphx8w9zcjv530x4-dep");
        let mut daemon = Daemon::handshake(fake_then_close(wrong), DEADLINE)
            .await
            .unwrap();
        let e = daemon
            .query_path_from_hash_part(HASH_PART, DEADLINE)
            .await
            .unwrap_err();
        assert!(
            matches!(e, DaemonError::Protocol(ProtocolError::WrongPath { .. })),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn random_replies_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            // A valid reply with a few bytes changed, cut at a random point.
            let mut reply = Wire::hello_2_8().raw(&Wire::path_info(160).0).0;
            for _ in 0..1 + next() % 3 {
                let at = (next() % reply.len() as u64) as usize;
                reply[at] = next() as u8;
            }
            reply.truncate(1 + (next() % reply.len() as u64) as usize);
            let stream = fake_then_close(Wire(reply));
            if let Ok(mut daemon) = Daemon::handshake(stream, DEADLINE).await {
                let _ = daemon.query_path_info(PATH, DEADLINE).await;
            }
        }
    }
}
