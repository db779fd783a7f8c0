//! A host's `[host.builder]` table: the host is one of the nix-daemon's remote builders, as root
//! lists it (`builders`, /etc/nix/machines). The machine line stays root's, so that nobody but
//! root chooses which machine the daemon trusts build results from; reachd is told only its
//! store URI, to switch remote builds off while the host is away and to find root's line
//! (docs/remote-builder.md).

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuilder {
    uri: Spanned<String>,
}

/// Validates a host's `[host.builder]`: the store URI, exactly as root's machine line has it.
pub(super) fn validate(
    raw: RawBuilder,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<String, ConfigError> {
    let uri = raw.uri.get_ref();
    let rest = uri
        .strip_prefix("ssh-ng://")
        .or_else(|| uri.strip_prefix("ssh://"));
    let valid = rest.is_some_and(|host| {
        !host.is_empty() && !host.contains(|c: char| c.is_whitespace() || c == ';' || c == '#')
    });
    if !valid {
        return Err(at(
            raw.uri.span(),
            format!(
                "key `uri`: {uri:?} must be the store URI of root's machine line for the host, ssh-ng:// or ssh:// and a host, e.g. \"ssh-ng://nix-builder@rpi.local\""
            ),
        ));
    }
    Ok(raw.uri.into_inner())
}
