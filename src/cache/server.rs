//! The Pi's store as a Nix HTTP binary cache on the laptop's loopback. A `unix://` substituter
//! cannot fetch from another machine (Nix reads the NAR from the local disk), but an `http://`
//! one fetches everything over its connection: so reachd answers Nix's binary-cache requests by
//! asking the Pi's nix-daemon, reached through the tunnelled socket, and passes the Pi's
//! signatures through (it signs nothing), so the laptop still checks them.
//!
//! - `GET|HEAD /nix-cache-info`: the store directory, mass queries wanted, the priority.
//! - `GET|HEAD /<hash>.narinfo`: the path's info, 404 if the Pi does not have it.
//! - `GET|HEAD /nar/<hash>-<nar hash>.nar`: the NAR itself, uncompressed, streamed; a resumed
//!   download (`Range: bytes=N-`) gets the rest as 206. The URL names the path and its NAR
//!   hash, so no state is kept between requests, and a path that changed on the Pi since its
//!   `.narinfo` was served (rebuilt after garbage collection) gives a 404 rather than a download
//!   that fails its hash check.
//!
//! The only answers are 200/206 and 404, never an error status: Nix retries a 5xx or a refused
//! connection for seconds and then fails the build (every version when the cache is its only
//! substituter, Nix before 2.32 always), while a 404 only means "build it, or ask the next
//! cache" (docs/nix-vanish-window.md has the reasons from Nix's source). So whatever keeps the
//! Pi from answering (its daemon unreachable, silent for [`SILENCE`] while the laptop hears
//! nothing else from it ([`super::hearing`]), slower than the deadline, or talking nonsense)
//! is a 404, logged; a NAR under way is cut off, and Nix's resume of it gets the 404 while the
//! Pi is still gone. Requests reuse idle daemon connections ([`super::pool`]): a new one costs
//! the daemon a fork and a store opening, and the tunnel two round trips.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::error::Chain;

use super::daemon::{within, DaemonError, NarStream, PathInfo, ProtocolError};
use super::hash::Sha256;
use super::hearing::{Heard, Hearing, SILENCE};
use super::pool::{Pool, MAX_IDLE_TIME};
use crate::store_path::{hash_part_of, is_hash_part};

/// The store directory the cache serves, the Pi's and the laptop's.
const STORE_DIR: &str = "/nix/store";
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long responses under way may take to finish before their connections
/// are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// After this many accept errors in a row, the listener is taken to be broken.
const MAX_ACCEPT_ERRORS: u32 = 100;

/// How the cache presents itself and how long it waits for the daemon.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `Priority:` in `nix-cache-info`; Nix prefers lower (cache.nixos.org says 40).
    pub priority: u32,
    /// The longest a request waits for the daemon (connect, handshake, queries) before it
    /// answers 404, even while the daemon is heard; while a NAR streams, the longest the
    /// daemon may send nothing on it.
    pub deadline: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            priority: 30,
            deadline: Duration::from_secs(3),
        }
    }
}

type Body = UnsyncBoxBody<Bytes, DaemonError>;
/// A NAR coming from a pooled connection.
type Nar = NarStream<Heard<UnixStream>>;

struct State {
    upstream: Pool,
    settings: CacheSettings,
}

/// Serves the cache on `listener` (bind it to loopback), asking the daemon at the socket
/// `upstream` for each request and telling `hearing` what its connections receive, until
/// `shutdown` completes. Then it stops accepting, lets
/// responses under way finish for a moment ([`SHUTDOWN_GRACE`]), drops the connections and
/// returns once every connection task has ended. An error only if accepting keeps failing.
pub async fn serve(
    listener: TcpListener,
    upstream: PathBuf,
    hearing: Arc<Hearing>,
    settings: CacheSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let state = Arc::new(State {
        upstream: Pool::new(upstream, hearing),
        settings,
    });
    let mut prune = tokio::time::interval(MAX_IDLE_TIME);
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = 0;
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    errors = 0;
                    connections.spawn(connection(stream, state.clone(), stopped.clone()));
                }
                Err(err) => {
                    // Mostly one connection's trouble, or out of file descriptors for a while.
                    errors += 1;
                    warn!("binary cache: accepting a connection: {err}");
                    if errors >= MAX_ACCEPT_ERRORS {
                        break Err(err);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = prune.tick() => state.upstream.prune(),
        }
    };
    drop(listener);
    // Every connection task holds a receiver; this tells them all.
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    result
}

async fn connection(stream: TcpStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&state, request).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                debug!("binary cache: connection ended: {err}");
            }
        }
        // Also when the sender is gone: either way the server is stopping.
        () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    CacheInfo,
    NarInfo(&'a str),
    Nar { hash: &'a str, nar_hash: Sha256 },
}

impl<'a> Route<'a> {
    /// Exactly the paths the cache serves, hash parts in Nix's base32; nothing else.
    fn parse(path: &'a str) -> Option<Route<'a>> {
        if path == "/nix-cache-info" {
            return Some(Route::CacheInfo);
        }
        if let Some(hash) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix(".narinfo"))
        {
            return is_hash_part(hash).then_some(Route::NarInfo(hash));
        }
        let name = path.strip_prefix("/nar/")?.strip_suffix(".nar")?;
        let (hash, nar_hash) = name.split_once('-')?;
        // A NAR hash in nix32 (52 characters), as narinfo() writes it.
        if !is_hash_part(hash) || nar_hash.len() != 52 {
            return None;
        }
        let nar_hash = Sha256::parse(nar_hash).ok()?;
        Some(Route::Nar { hash, nar_hash })
    }
}

async fn respond(state: &State, request: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    };
    let path = request.uri().path();
    let response = match Route::parse(path) {
        Some(Route::CacheInfo) => typed(
            "text/x-nix-cache-info",
            format!(
                "StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {}\n",
                state.settings.priority
            ),
        ),
        Some(Route::NarInfo(hash)) => narinfo(state, hash).await,
        Some(Route::Nar { hash, nar_hash }) => {
            let from = match head {
                true => 0,
                false => resumed_from(request.headers().get(RANGE)),
            };
            nar(state, hash, nar_hash, head, from).await
        }
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    debug!(
        "binary cache: {} {path}: {} in {:?}",
        request.method(),
        response.status(),
        start.elapsed()
    );
    if head {
        // hyper sends no body for HEAD; the Content-Length stays as the GET would have it.
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, empty());
    }
    response
}

/// Why the daemon gave no answer.
enum Unanswered {
    /// The host is in doubt: not even asked.
    InDoubt,
    /// Nothing heard from the daemon for [`SILENCE`] while asking.
    Silent,
    /// The daemon could not be reached, was slower than the deadline, or answered wrong.
    Failed(DaemonError),
}

/// Runs `lookup` against the daemon, within the deadline and while the daemon is heard.
async fn ask<T>(
    state: &State,
    lookup: impl Future<Output = Result<T, DaemonError>>,
) -> Result<T, Unanswered> {
    let hearing = state.upstream.hearing();
    if hearing.in_doubt() {
        return Err(Unanswered::InDoubt);
    }
    tokio::select! {
        biased;
        answer = within(state.settings.deadline, lookup) => answer.map_err(Unanswered::Failed),
        () = hearing.silence(tokio::time::Instant::now()) => Err(Unanswered::Silent),
    }
}

async fn narinfo(state: &State, hash: &str) -> Response<Body> {
    let deadline = state.settings.deadline;
    let lookup = async {
        let (info, daemon) = state.upstream.path_info(hash, deadline).await?;
        state.upstream.put_back(daemon);
        Ok(info)
    };
    match ask(state, lookup).await {
        Ok(Some(info)) => match render_narinfo(hash, &info) {
            Ok(narinfo) => typed("text/x-nix-narinfo", narinfo),
            Err(err) => not_answered(hash, Unanswered::Failed(err.into())),
        },
        Ok(None) => text(StatusCode::NOT_FOUND, "no such path\n"),
        Err(why) => not_answered(hash, why),
    }
}

async fn nar(state: &State, hash: &str, nar_hash: Sha256, head: bool, from: u64) -> Response<Body> {
    let deadline = state.settings.deadline;
    let lookup = async {
        let (info, daemon) = state.upstream.path_info(hash, deadline).await?;
        let Some(info) = info.filter(|info| info.nar_hash == nar_hash) else {
            state.upstream.put_back(daemon);
            return Ok(None);
        };
        if head || from >= info.nar_size {
            state.upstream.put_back(daemon);
            return Ok(Some((info.nar_size, None)));
        }
        let stream = daemon.nar_from_path(&info.path, deadline).await?;
        Ok(Some((info.nar_size, Some(stream))))
    };
    let (size, stream) = match ask(state, lookup).await {
        Ok(Some(found)) => found,
        Ok(None) => return text(StatusCode::NOT_FOUND, "no such NAR\n"),
        Err(why) => return not_answered(hash, why),
    };
    if from > 0 && from >= size {
        let mut response = text(StatusCode::RANGE_NOT_SATISFIABLE, "past the NAR's end\n");
        response
            .headers_mut()
            .insert(CONTENT_RANGE, content_range(format!("bytes */{size}")));
        return response;
    }
    let body = match stream {
        Some(stream) => nar_body(stream, state.upstream.hearing().clone(), size, from, hash),
        None => empty(),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    // Nix resumes a download cut short only from a server that says it can.
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size - from));
    if from > 0 {
        let range = content_range(format!("bytes {from}-{}/{size}", size - 1));
        response.headers_mut().insert(CONTENT_RANGE, range);
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response
}

/// A `Content-Range` value: "bytes" and numbers only, always a valid header.
fn content_range(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("digits, spaces, '-', '/' and '*' are header text")
}

/// Where a resumed download starts: N of `Range: bytes=N-`, the only form Nix (curl's resume)
/// sends; 0 (the whole NAR) for anything else.
fn resumed_from(range: Option<&HeaderValue>) -> u64 {
    range
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The NAR from byte `from` on, as a response body that fails (so hyper cuts the connection
/// short, and Nix resumes or gives up) if the daemon stalls or goes silent, breaks off, or
/// sends a NAR of another size than it said.
fn nar_body(stream: Nar, hearing: Arc<Hearing>, size: u64, from: u64, hash: &str) -> Body {
    let hash = hash.to_string();
    let frames = futures_util::stream::try_unfold(stream, move |mut stream| {
        let (hash, hearing) = (hash.clone(), hearing.clone());
        async move {
            let chunk = loop {
                let chunk = tokio::select! {
                    biased;
                    chunk = next_chunk(&mut stream, size) => chunk,
                    () = hearing.silence(tokio::time::Instant::now()) => {
                        Err(DaemonError::Timeout(SILENCE))
                    }
                }
                .inspect_err(|err| {
                    warn!("binary cache: NAR of {hash} broken off: {}", Chain(err))
                })?;
                // Before `from`: what the client already has.
                let Some(chunk) = chunk else { break None };
                let skip = from.saturating_sub(stream.consumed() - chunk.len() as u64);
                if skip < chunk.len() as u64 {
                    break Some(chunk.slice(skip as usize..));
                }
            };
            Ok(chunk.map(|chunk| (Frame::data(chunk), stream)))
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

async fn next_chunk(stream: &mut Nar, size: u64) -> Result<Option<Bytes>, DaemonError> {
    let chunk = stream.next_chunk().await?;
    let got = stream.consumed();
    if got > size || (chunk.is_none() && got != size) {
        return Err(ProtocolError::NarSize {
            expected: size,
            got,
        }
        .into());
    }
    Ok(chunk)
}

/// The `.narinfo` for `info`, whose hash part is `hash`. Every value comes from the daemon, so
/// each is checked to be one line of what it should be.
fn render_narinfo(hash: &str, info: &PathInfo) -> Result<String, ProtocolError> {
    let base = |path: &str| -> Result<String, ProtocolError> {
        let name = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .filter(|name| hash_part_of(path).is_some() && !name.contains('/'))
            .filter(|name| name.bytes().all(|c| c.is_ascii_graphic()));
        name.map(str::to_string)
            .ok_or_else(|| ProtocolError::BadStorePath(path.chars().take(300).collect()))
    };
    let line = |value: &str| -> Result<(), ProtocolError> {
        if value.chars().any(char::is_control) {
            return Err(ProtocolError::BadField(value.chars().take(300).collect()));
        }
        Ok(())
    };
    base(&info.path)?;
    let nar_hash = info.nar_hash;
    let mut out = format!(
        "StorePath: {path}\nURL: nar/{hash}-{nix32}.nar\nCompression: none\n\
         FileHash: {nar_hash}\nFileSize: {size}\nNarHash: {nar_hash}\nNarSize: {size}\n",
        path = info.path,
        nix32 = nar_hash.to_nix32(),
        size = info.nar_size,
    );
    let references: Vec<String> = info
        .references
        .iter()
        .map(|r| base(r))
        .collect::<Result<_, _>>()?;
    out += &format!("References: {}\n", references.join(" "));
    if let Some(deriver) = &info.deriver {
        out += &format!("Deriver: {}\n", base(deriver)?);
    }
    for sig in &info.sigs {
        line(sig)?;
        out += &format!("Sig: {sig}\n");
    }
    if let Some(ca) = &info.ca {
        line(ca)?;
        out += &format!("CA: {ca}\n");
    }
    Ok(out)
}

/// 404 for a request the daemon did not answer: the one answer after which every Nix builds
/// or asks its next cache, instead of retrying and failing (see the module's docs). A failure
/// is logged; the silence is logged once by [`Hearing`], and nothing while in doubt.
fn not_answered(hash: &str, why: Unanswered) -> Response<Body> {
    let reason = match why {
        Unanswered::InDoubt => "the host's nix-daemon is silent".to_string(),
        Unanswered::Silent => {
            format!(
                "nothing from the host's nix-daemon for {} ms",
                SILENCE.as_millis()
            )
        }
        Unanswered::Failed(err) => {
            let reason = Chain(&err).to_string();
            warn!("binary cache: {hash}: {reason}: answering \"not here\"");
            reason
        }
    };
    text(StatusCode::NOT_FOUND, format!("not here: {reason}\n"))
}

fn typed(content_type: &'static str, body: String) -> Response<Body> {
    let mut response = full(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = typed("text/plain; charset=utf-8", body.into());
    *response.status_mut() = status;
    response
}

/// A response with a body of known length (hyper writes the Content-Length).
fn full(body: String) -> Response<Body> {
    let len = body.len();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    response
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::super::daemon::{STDERR_ERROR, STDERR_LAST};
    use super::super::fake_daemon::{self, Wire, HASH_PART, HEX};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HASH: &str = "39swg37h91gk143pfmv87gqplp0xj96l";
    const LONG: Duration = Duration::from_secs(30);
    const NAR_HASH: &str = "1pf6yfd4kxnprqxmm5ipgx2q39vz1xfr6wrkwrmjmv2i4b57vycn";

    fn info() -> PathInfo {
        PathInfo {
            path: format!("/nix/store/{HASH}-withref"),
            deriver: Some("/nix/store/cz6kjqr7di3ycz8n71xc4k37q453zmci-withref.drv".into()),
            nar_hash: Sha256::parse(NAR_HASH).unwrap(),
            references: vec![
                "/nix/store/cc84x1xzmv1y70awlphx8w9zcjv530x4-dep".into(),
                format!("/nix/store/{HASH}-withref"),
            ],
            registration_time: 1,
            nar_size: 160,
            ultimate: true,
            sigs: vec!["pi-1:c2ln".into(), "other-1:c2ln".into()],
            ca: Some("text:sha256:1yk2yvvf7cfngmwxh0qmaawdpzlpcpzz7511b7x538cq09q27v37".into()),
        }
    }

    #[test]
    fn routes_are_exactly_the_cache_files() {
        assert_eq!(Route::parse("/nix-cache-info"), Some(Route::CacheInfo));
        assert_eq!(
            Route::parse(&format!("/{HASH}.narinfo")),
            Some(Route::NarInfo(HASH))
        );
        assert_eq!(
            Route::parse(&format!("/nar/{HASH}-{NAR_HASH}.nar")),
            Some(Route::Nar {
                hash: HASH,
                nar_hash: Sha256::parse(NAR_HASH).unwrap()
            })
        );
        for bad in [
            "/",
            "",
            "/nix-cache-info/",
            "//nix-cache-info",
            "/nix-cache-info.narinfo",
            &format!("/{}.narinfo", &HASH[1..]),
            &format!("/{HASH}e.narinfo"),
            &format!("/{}.narinfo", HASH.replace('9', "e")),
            &format!("/{}.narinfo", HASH.to_uppercase()),
            &format!("/x/{HASH}.narinfo"),
            &format!("/{HASH}.narinfo.xz"),
            &format!("/{HASH}.ls"),
            &format!("/nar/{HASH}.nar"),
            &format!("/nar/{HASH}-{NAR_HASH}.nar.xz"),
            &format!("/nar/{HASH}-{}.nar", &NAR_HASH[1..]),
            &format!("/nar/{HASH}-{}.nar", "0".repeat(64)),
            &format!("/nar/../{HASH}.narinfo"),
            "/nar/%2e%2e/etc/passwd.nar",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn narinfo_names_the_nar_and_passes_signatures_through() {
        let text = render_narinfo(HASH, &info()).unwrap();
        assert_eq!(
            text,
            format!(
                "StorePath: /nix/store/{HASH}-withref\n\
                 URL: nar/{HASH}-{NAR_HASH}.nar\n\
                 Compression: none\n\
                 FileHash: sha256:{NAR_HASH}\n\
                 FileSize: 160\n\
                 NarHash: sha256:{NAR_HASH}\n\
                 NarSize: 160\n\
                 References: cc84x1xzmv1y70awlphx8w9zcjv530x4-dep {HASH}-withref\n\
                 Deriver: cz6kjqr7di3ycz8n71xc4k37q453zmci-withref.drv\n\
                 Sig: pi-1:c2ln\n\
                 Sig: other-1:c2ln\n\
                 CA: text:sha256:1yk2yvvf7cfngmwxh0qmaawdpzlpcpzz7511b7x538cq09q27v37\n"
            )
        );
        let bare = PathInfo {
            deriver: None,
            references: vec![],
            sigs: vec![],
            ca: None,
            ..info()
        };
        let text = render_narinfo(HASH, &bare).unwrap();
        assert!(text.ends_with("NarSize: 160\nReferences: \n"), "{text}");
    }

    #[test]
    fn narinfo_refuses_what_would_corrupt_it() {
        let cases: [fn(&mut PathInfo); 5] = [
            |i| i.sigs.push("pi-1:x\nStorePath: /nix/store/evil".into()),
            |i| i.ca = Some("text:\r".into()),
            |i| {
                i.references
                    .push("/elsewhere/cc84x1xzmv1y70awlphx8w9zcjv530x4-dep".into())
            },
            |i| {
                i.references
                    .push("/nix/store/cc84x1xzmv1y70awlphx8w9zcjv530x4-a b".into())
            },
            |i| i.deriver = Some("/nix/store/short-x.drv".into()),
        ];
        for case in cases {
            let mut bad = info();
            case(&mut bad);
            assert!(render_narinfo(HASH, &bad).is_err(), "{bad:?}");
        }
    }

    /// The cache in front of a fake daemon that gives its connections `scripts` in turn;
    /// returns its address (the server runs until the test ends).
    async fn cache_before(scripts: Vec<Wire>) -> (std::net::SocketAddr, tempfile::TempDir) {
        let (addr, dir, _) = cache_heard(scripts).await;
        (addr, dir)
    }

    /// [`cache_before`], with what the cache hears.
    async fn cache_heard(
        scripts: Vec<Wire>,
    ) -> (std::net::SocketAddr, tempfile::TempDir, Arc<Hearing>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("daemon.sock");
        fake_daemon::serve(&socket, scripts);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        // Far longer than SILENCE: an answer well before it shows that the silence ended
        // the wait, not the deadline.
        let settings = CacheSettings {
            deadline: LONG,
            ..CacheSettings::default()
        };
        let hearing = Arc::new(Hearing::default());
        let serving = serve(
            listener,
            socket,
            hearing.clone(),
            settings,
            std::future::pending(),
        );
        tokio::spawn(serving);
        (addr, dir, hearing)
    }

    /// The agent's check of the cache in `dir`: a handshake heard by the cache.
    async fn check_heard(dir: &tempfile::TempDir, hearing: &Arc<Hearing>) {
        let socket = dir.path().join("daemon.sock");
        crate::cache::pool::connect_heard(&socket, LONG, hearing.clone())
            .await
            .expect("the check's handshake");
        assert!(!hearing.in_doubt(), "the check's greeting ends the doubt");
    }

    /// GET `path`; the status, the Content-Length and the body as far as it came (status 0 if
    /// the connection closed before a whole header).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Option<u64>, Vec<u8>) {
        get_with(addr, path, "").await
    }

    /// GET `path` with `headers` (each line ending in CRLF), as [`get`].
    async fn get_with(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &str,
    ) -> (u16, Option<u64>, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        let _ = tokio::time::timeout(LONG, read).await.expect("reply");
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            // Closed before the headers were complete.
            return (0, None, raw);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
        let status = head[9..12].parse().expect("status");
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.trim().parse().ok());
        (status, length, raw[end + 4..].to_vec())
    }

    fn nar_url() -> String {
        format!(
            "/nar/{HASH_PART}-{}.nar",
            Sha256::parse(HEX).unwrap().to_nix32()
        )
    }

    #[tokio::test]
    async fn requests_share_a_daemon_connection() {
        let lookup = || Wire::found().raw(&Wire::path_info(160).0);
        let one_connection = Wire::hello_2_8().raw(&lookup().0).raw(&lookup().0);
        let (addr, _dir) = cache_before(vec![one_connection]).await;
        for _ in 0..2 {
            let (status, _, body) = get(addr, &format!("/{HASH_PART}.narinfo")).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[tokio::test]
    async fn a_nar_of_the_wrong_size_is_cut_short() {
        let tree = include_bytes!("testdata/tree.nar");
        for claimed in [tree.len() as u64 + 8, tree.len() as u64 - 8] {
            let script = Wire::hello_2_8()
                .raw(&Wire::found().0)
                .raw(&Wire::path_info(claimed).0)
                .num(STDERR_LAST)
                .raw(tree);
            let (addr, _dir) = cache_before(vec![script]).await;
            // Either the headers went out and the body stops short, or hyper met the error
            // before sending anything: a failed download for Nix either way.
            match get(addr, &nar_url()).await {
                (0, _, raw) => assert!(raw.is_empty(), "{raw:?}"),
                (status, length, body) => {
                    assert_eq!((status, length), (200, Some(claimed)));
                    assert!((body.len() as u64) < claimed, "{} bytes", body.len());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_daemon_error_or_wrong_answer_is_not_here() {
        let error = Wire::hello_2_8()
            .num(STDERR_ERROR)
            .str("Error")
            .num(0)
            .str("Error")
            .str("database is locked")
            .num(0)
            .num(0);
        let (addr, _dir) = cache_before(vec![error]).await;
        let (status, _, body) = get(addr, &format!("/{HASH_PART}.narinfo")).await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("database is locked"));

        // Asked for one hash part, answers a path with another.
        let wrong = Wire::hello_2_8().raw(&Wire::found().0);
        let (addr, _dir) = cache_before(vec![wrong]).await;
        let other = "00000000000000000000000000000000";
        let (status, _, _) = get(addr, &format!("/{other}.narinfo")).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn no_daemon_is_not_here_at_once() {
        let (addr, _dir) = cache_before(vec![]).await;
        let start = Instant::now();
        let (status, _, body) = get(addr, &format!("/{HASH_PART}.narinfo")).await;
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        assert!(start.elapsed() < LONG / 3, "took {:?}", start.elapsed());
        let (status, _, _) = get(addr, &nar_url()).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn a_silent_daemon_is_not_here_until_it_is_heard_again() {
        // Greets, then never answers the lookup (a Pi that lost power behind a tunnel that
        // still accepts); the agent's check later greets it through the cache's hearing, and
        // then a new connection answers a lookup.
        let silent = Wire::hello_2_8();
        let back = Wire::hello_2_8()
            .raw(&Wire::found().0)
            .raw(&Wire::path_info(160).0);
        let (addr, dir, hearing) = cache_heard(vec![silent, Wire::hello_2_8(), back]).await;
        let narinfo = format!("/{HASH_PART}.narinfo");
        let start = Instant::now();
        let (status, _, body) = get(addr, &narinfo).await;
        let waited = start.elapsed();
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        assert!(
            waited >= SILENCE && waited < LONG / 3,
            "the silence, not the deadline, ended the wait: {waited:?}"
        );
        // In doubt, and nothing of the cache's own asks again: "not here" at once.
        tokio::time::sleep(SILENCE).await;
        let start = Instant::now();
        let (status, _, _) = get(addr, &narinfo).await;
        assert_eq!(status, 404);
        assert!(start.elapsed() < SILENCE / 2, "took {:?}", start.elapsed());
        check_heard(&dir, &hearing).await;
        let (status, _, body) = get(addr, &narinfo).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    #[tokio::test]
    async fn a_nar_cut_off_by_silence_resumes_where_it_stopped() {
        let tree = include_bytes!("testdata/tree.nar");
        let size = tree.len() as u64;
        let half = tree.len() / 2;
        let nar_from = |bytes: &[u8]| {
            Wire::hello_2_8()
                .raw(&Wire::found().0)
                .raw(&Wire::path_info(size).0)
                .num(STDERR_LAST)
                .raw(bytes)
        };
        let scripts = vec![nar_from(&tree[..half]), Wire::hello_2_8(), nar_from(tree)];
        let (addr, dir, hearing) = cache_heard(scripts).await;
        let (status, length, body) = get(addr, &nar_url()).await;
        assert_eq!((status, length), (200, Some(size)));
        assert!(
            body.len() < tree.len() && tree.starts_with(&body),
            "{} bytes",
            body.len()
        );
        check_heard(&dir, &hearing).await;
        let resume = format!("Range: bytes={}-\r\n", body.len());
        let (status, length, rest) = get_with(addr, &nar_url(), &resume).await;
        assert_eq!((status, length), (206, Some(size - body.len() as u64)));
        assert_eq!(rest, tree[body.len()..]);
    }

    #[test]
    fn only_an_open_ended_byte_range_resumes() {
        let value = |v: &'static str| Some(HeaderValue::from_static(v));
        assert_eq!(resumed_from(value("bytes=1234-").as_ref()), 1234);
        for whole in ["bytes=0-", "bytes=1-2", "bytes=-5", "items=3-", "bytes=x-"] {
            assert_eq!(resumed_from(value(whole).as_ref()), 0, "{whole}");
        }
        assert_eq!(resumed_from(None), 0);
    }
}
