//! A host's `[host.nix]` table: how Nix reaches the host's store while the host is there. Either
//! reachd serves a binary cache on the laptop's loopback backed by the host's nix-daemon
//! (through the socket a tunnel unit forwards), or it only gates an HTTP cache served by someone
//! else (nix-serve or harmonia on the host, reached through a tunnel). Either way the URI given
//! to Nix is fixed here, so that it can be listed once in the system's `trusted-substituters`.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

/// Where reachd serves a host's store by default: a port of the laptop's loopback.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 37515);

/// How Nix reaches one host's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixCache {
    /// reachd serves an HTTP binary cache at `listen` (loopback), backed by the nix-daemon
    /// whose socket is `daemon_socket` (`%t/` standing for `$XDG_RUNTIME_DIR/`).
    Served {
        daemon_socket: String,
        listen: SocketAddr,
    },
    /// An HTTP binary cache at `url` that someone else serves; reachd only checks and gates it.
    Http { url: String },
}

impl NixCache {
    /// The substituter URI Nix is given: what the system's `trusted-substituters` must list.
    pub fn substituter(&self) -> String {
        match self {
            NixCache::Served { listen, .. } => format!("http://{listen}"),
            NixCache::Http { url } => url.clone(),
        }
    }
}

/// The daemon socket with `%t/` expanded to `runtime_dir`.
pub fn expand_runtime_dir(template: &str, runtime_dir: &Path) -> PathBuf {
    match template.strip_prefix("%t/") {
        Some(rest) => runtime_dir.join(rest),
        None => PathBuf::from(template),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNix {
    daemon_socket: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    substituter: Option<Spanned<String>>,
    upload: Option<Spanned<bool>>,
    upload_store: Option<Spanned<String>>,
}

/// A host's `[host.nix]`: the cache, and where builds are uploaded (when they are).
pub(super) struct ValidNix {
    pub cache: NixCache,
    pub upload: Option<String>,
}

/// Validates a host's `[host.nix]`; `name` is the host's name (for the default socket).
pub(super) fn validate(
    mut raw: RawNix,
    name: &str,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<ValidNix, ConfigError> {
    let upload_store = raw.upload_store.take();
    let upload = raw.upload.take();
    let cache = validate_cache(raw, name, &at)?;
    let upload_span = upload.as_ref().map_or(0..0, Spanned::span);
    let upload = match (upload.map(Spanned::into_inner), upload_store) {
        (None | Some(false), Some(store)) => {
            return Err(at(
                store.span(),
                "key `upload_store`: set `upload = true` too, or remove it".into(),
            ))
        }
        (None | Some(false), None) => None,
        (Some(true), Some(store)) => {
            if !is_store_uri(store.get_ref()) {
                return Err(at(
                    store.span(),
                    format!(
                        "key `upload_store`: {:?} must be a Nix store URI such as \"unix://%t/rpi-nix-daemon.sock\" or \"ssh-ng://pi\"",
                        store.get_ref()
                    ),
                ));
            }
            Some(store.into_inner())
        }
        (Some(true), None) => match &cache {
            NixCache::Served { daemon_socket, .. } => Some(format!("unix://{daemon_socket}")),
            NixCache::Http { .. } => {
                return Err(at(
                    upload_span,
                    format!("host {name:?}: key `upload_store` is needed with `upload = true` and an HTTP cache (e.g. \"ssh-ng://root@rpi.local\")"),
                ))
            }
        },
    };
    Ok(ValidNix { cache, upload })
}

/// A store URI `nix copy --to` may get as one argument: a scheme, then visible ASCII with no
/// quote or backslash (it is never given to a shell, but it must not read as an option either).
fn is_store_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
        && scheme.as_bytes()[0].is_ascii_lowercase()
        && !rest.is_empty()
        && uri
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"'\\".contains(&b))
}

/// The store URI with `%t/` expanded to `runtime_dir` (in `unix://%t/…`).
pub fn expand_store_uri(uri: &str, runtime_dir: &Path) -> String {
    match uri.strip_prefix("unix://") {
        Some(path) => format!("unix://{}", expand_runtime_dir(path, runtime_dir).display()),
        None => uri.to_string(),
    }
}

fn validate_cache(
    raw: RawNix,
    name: &str,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<NixCache, ConfigError> {
    if let Some(url) = raw.substituter {
        if let Some(other) = raw.daemon_socket.as_ref().or(raw.listen.as_ref()) {
            return Err(at(
                other.span(),
                "key `substituter`: an HTTP cache of its own and `daemon_socket`/`listen` (a cache reachd serves) exclude each other".into(),
            ));
        }
        if http_authority(url.get_ref()).is_none() {
            return Err(at(
                url.span(),
                format!(
                    "key `substituter`: {:?} must be an http:// URL with a host, e.g. \"http://127.0.0.1:5000\" (a tunnel to nix-serve or harmonia)",
                    url.get_ref()
                ),
            ));
        }
        let url = url.into_inner().trim_end_matches('/').to_string();
        return Ok(NixCache::Http { url });
    }
    let daemon_socket = match raw.daemon_socket {
        None => format!("%t/{name}-nix-daemon.sock"),
        Some(socket) => {
            let text = socket.get_ref();
            let absolute = text.starts_with('/') || text.starts_with("%t/");
            if !absolute || text.contains('\0') || text.matches('%').count() > 1 {
                return Err(at(
                    socket.span(),
                    format!(
                        "key `daemon_socket`: {text:?} must be an absolute path, or start with %t/ for $XDG_RUNTIME_DIR/"
                    ),
                ));
            }
            socket.into_inner()
        }
    };
    let listen = match raw.listen {
        None => DEFAULT_LISTEN,
        Some(listen) => match listen.get_ref().parse::<SocketAddr>() {
            Ok(address) if address.ip().is_loopback() && address.port() != 0 => address,
            _ => {
                return Err(at(
                    listen.span(),
                    format!(
                        "key `listen`: {:?} must be a loopback address and port, e.g. \"127.0.0.1:37515\": the cache is for this machine only",
                        listen.get_ref()
                    ),
                ))
            }
        },
    };
    Ok(NixCache::Served {
        daemon_socket,
        listen,
    })
}

/// `host[:port]` of an `http://` URL, if it is one. The URL goes into a nix.conf line as it is,
/// so it must be visible ASCII with no space, quote, backslash or `#`: nothing that could end the
/// line or start another setting.
pub fn http_authority(url: &str) -> Option<&str> {
    let safe = url
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"'\\#".contains(&b));
    let rest = url.strip_prefix("http://").filter(|_| safe)?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty() && !authority.contains('@')).then_some(authority)
}
