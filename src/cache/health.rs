//! The cheap check that decides whether Nix may use a host's cache right now: for a cache reachd
//! serves, a handshake with the host's nix-daemon through the tunnelled socket; for an HTTP
//! cache served by someone else, `GET /nix-cache-info` answering 200. Each within a deadline, so
//! that a tunnel that accepts and never answers (the far end stopped) counts as down. A served
//! cache's check is heard by the cache ([`super::hearing`]): a daemon that greets it ends the
//! cache's doubt about the host, so the cache needs no timer of its own to notice the host back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{expand_runtime_dir, http_authority, NixCache};
use crate::error::Chain;

use super::hearing::Hearing;
use super::pool::connect_heard;

/// Checks `cache` within `deadline`; `runtime_dir` expands `%t/` in a daemon socket path.
/// `hearing`: what the cache reachd serves from a served cache's socket has heard, if it serves
/// it now.
pub async fn check(
    cache: &NixCache,
    runtime_dir: &Path,
    deadline: Duration,
    hearing: Option<Arc<Hearing>>,
) -> Result<(), String> {
    match cache {
        NixCache::Served { daemon_socket, .. } => {
            let socket = expand_runtime_dir(daemon_socket, runtime_dir);
            connect_heard(&socket, deadline, hearing.unwrap_or_default())
                .await
                .map(drop)
                .map_err(|err| format!("{}: {}", socket.display(), Chain(&err)))
        }
        NixCache::Http { url } => match tokio::time::timeout(deadline, cache_info(url)).await {
            Ok(result) => result.map_err(|err| format!("{url}/nix-cache-info: {err}")),
            Err(_) => Err(format!(
                "{url}/nix-cache-info: no answer within {} ms",
                deadline.as_millis()
            )),
        },
    }
}

/// `GET <url>/nix-cache-info` over one HTTP/1.1 connection: Ok on 200.
async fn cache_info(url: &str) -> Result<(), String> {
    let authority = http_authority(url).ok_or("not an http:// URL")?;
    let address = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let stream = TcpStream::connect(&address)
        .await
        .map_err(|err| err.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| err.to_string())?;
    let prefix = &url["http://".len() + authority.len()..];
    let request = Request::get(format!("{prefix}/nix-cache-info"))
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    // The connection is driven right here, beside the request; both end with this function.
    let response = sender.send_request(request);
    tokio::pin!(response, connection);
    let response = tokio::select! {
        biased;
        response = &mut response => response,
        ended = &mut connection => match ended {
            // The server answered and closed: the answer is already there.
            Ok(()) => response.await,
            Err(err) => return Err(err.to_string()),
        },
    };
    let status = response.map_err(|err| err.to_string())?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}
