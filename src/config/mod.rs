//! The configuration file: parsed and validated here, once, so that the rest of the agent works
//! only with values that are known to be good. Errors name the file, line and key, on one line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod host_builder;
mod host_nix;

pub use self::host_nix::{
    expand_runtime_dir, expand_store_uri, http_authority, NixCache, DEFAULT_LISTEN,
};

/// Where the upload spool lives unless `[nix] spool` says otherwise (created by
/// systemd/tmpfiles.d/reachd.conf); the post-build hook's default too.
pub const DEFAULT_SPOOL: &str = "/var/spool/reachd";

/// The configuration used when no file exists: the Raspberry Pi at `rpi.local`.
pub const EMBEDDED_DEFAULT: &str = r#"[[host]]
name = "rpi"
hostname = "rpi.local"
"#;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hosts: Vec<HostConfig>,
    pub probe: ProbeSettings,
    /// `[nix] spool`: where Nix's post-build hook records builds for upload.
    pub spool: PathBuf,
    /// `[nix] bin_dir`: the directory of the `nix` and `nix-store` uploads run (`None`: PATH,
    /// then where the Nix installers put them; see `upload::nix_bin`).
    pub nix_bin_dir: Option<PathBuf>,
    /// `[notify]`: desktop notifications; `None` (no table): none is ever sent.
    pub notify: Option<NotifySettings>,
}

impl Config {
    /// What `reachd run --check-config` prints: the file, the spool if any host uploads, and
    /// one line per host, each line ended by a newline.
    pub fn summary(&self, source: &Source) -> String {
        let mut text = format!("{source}: OK\n");
        if self.hosts.iter().any(|h| h.upload.is_some()) {
            text.push_str(&format!("upload spool: {}\n", self.spool.display()));
            if let Some(dir) = &self.nix_bin_dir {
                text.push_str(&format!("Nix for uploads: {}\n", dir.display()));
            }
        }
        if let Some(notify) = &self.notify {
            text.push_str(&format!(
                "notifications: uploads failing for {} min{}\n",
                notify.uploads_failing_after.as_secs() / 60,
                if notify.host_changes {
                    ", hosts coming and going"
                } else {
                    ""
                }
            ));
        }
        for host in &self.hosts {
            text.push_str(&format!(
                "host {}: {} -> {}{}{}{}{}{}\n",
                host.name,
                host.hostname,
                host.target,
                host.port
                    .map(|p| format!(", TCP port {p}"))
                    .unwrap_or_default(),
                if host.connections.is_empty() {
                    String::new()
                } else {
                    format!(", only on {}", host.connections.join(", "))
                },
                match &host.nix {
                    None => String::new(),
                    Some(cache @ NixCache::Served { daemon_socket, .. }) => format!(
                        ", Nix cache {} served from the daemon at {daemon_socket}",
                        cache.substituter()
                    ),
                    Some(cache) => format!(", Nix cache {}", cache.substituter()),
                },
                host.upload
                    .as_ref()
                    .map(|store| format!(", builds uploaded to {store}"))
                    .unwrap_or_default(),
                host.builder
                    .as_ref()
                    .map(|uri| format!(", remote builder {uri}"))
                    .unwrap_or_default(),
            ));
        }
        text
    }
}

/// One host to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// `[a-z0-9-]`, unique; names the D-Bus object and the default target.
    pub name: String,
    /// The mDNS name, without the trailing dot (`rpi.local`).
    pub hostname: String,
    /// The systemd user unit kept started while the host is reachable.
    pub target: String,
    /// When set, the host is reachable only if this TCP port accepts a connection.
    pub port: Option<u16>,
    /// When not empty, the host is reachable only while one of these NetworkManager connection
    /// UUIDs is active.
    pub connections: Vec<String>,
    /// `[host.nix]`: Nix is pointed at the host's store while it is there.
    pub nix: Option<NixCache>,
    /// `[host.nix] upload`: builds recorded by the post-build hook are copied to this store
    /// (a Nix store URI; `unix://%t/…` is under `$XDG_RUNTIME_DIR`) while the host is there.
    pub upload: Option<String>,
    /// `[host.builder] uri`: the host is the nix-daemon's remote builder of this store URI
    /// (root's machine line); remote builds are switched off while no such host is usable.
    pub builder: Option<String>,
}

impl HostConfig {
    /// The hostname as mdns-sd wants it, with the trailing dot.
    pub fn fqdn(&self) -> String {
        format!("{}.", self.hostname)
    }

    /// The user manager's environment variable that carries the resolved address:
    /// `REACHD_<NAME>_ADDRESS`, the name upper-cased with `-` as `_`.
    pub fn address_variable(&self) -> String {
        format!(
            "REACHD_{}_ADDRESS",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }
}

/// How hosts are checked. Every field has a default; reachd.toml(5) and docs/agent.md give the reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// How often a reachable host is checked again.
    pub present_interval: Duration,
    /// Consecutive failed checks before a reachable host is declared unreachable.
    pub failures: u32,
    /// The deadline of one check (mDNS answer, then TCP connect).
    pub timeout: Duration,
    /// How often an unreachable host is checked again at first.
    pub absent_interval: Duration,
    /// The longest interval between checks of a host that stays unreachable.
    pub absent_max_interval: Duration,
    /// How often a host's Nix cache (`[host.nix]`) is checked again while it is in use or
    /// failing: each check is a round trip to the host's daemon through the tunnel.
    pub cache_check_interval: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            present_interval: Duration::from_millis(3000),
            failures: 2,
            timeout: Duration::from_millis(1000),
            absent_interval: Duration::from_millis(2000),
            absent_max_interval: Duration::from_millis(60_000),
            cache_check_interval: Duration::from_millis(2000),
        }
    }
}

/// `[notify]`: which desktop notifications to send. reachd.toml(5) gives the reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifySettings {
    /// Uploads to a host that have failed for this long are notified, once until they work.
    pub uploads_failing_after: Duration,
    /// Also notify when a host becomes reachable or unreachable.
    pub host_changes: bool,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            uploads_failing_after: Duration::from_secs(30 * 60),
            host_changes: false,
        }
    }
}

/// A configuration error, already located: `FILE:LINE:COLUMN: key `K`: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

/// Where in which file an error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Where the configuration comes from, for messages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Embedded => f.write_str("the embedded default configuration"),
        }
    }
}

/// The default file: `$XDG_CONFIG_HOME/reachd/config.toml`, or `~/.config/reachd/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("reachd").join("config.toml"))
}

/// Loads the configuration: an explicit path must exist; without one, the default file is used
/// if it exists, else the embedded default.
pub fn load(explicit: Option<&Path>) -> Result<(Config, Source), ConfigError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => match default_path().filter(|p| p.exists()) {
            Some(path) => path,
            None => return Ok((parse(EMBEDDED_DEFAULT, "<embedded>")?, Source::Embedded)),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let config = parse(&text, &path.display().to_string())?;
    Ok((config, Source::File(path)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: Vec<Spanned<RawHost>>,
    probe: Option<RawProbe>,
    nix: Option<RawNixSettings>,
    notify: Option<RawNotify>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    uploads_failing_minutes: Option<Spanned<u64>>,
    host_changes: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNixSettings {
    spool: Option<Spanned<String>>,
    bin_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Spanned<String>,
    hostname: Spanned<String>,
    target: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    #[serde(default)]
    connections: Vec<Spanned<String>>,
    nix: Option<Spanned<host_nix::RawNix>>,
    builder: Option<host_builder::RawBuilder>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    present_interval_ms: Option<Spanned<u64>>,
    failures: Option<Spanned<u32>>,
    timeout_ms: Option<Spanned<u64>>,
    absent_interval_ms: Option<Spanned<u64>>,
    absent_max_interval_ms: Option<Spanned<u64>>,
    cache_check_interval_ms: Option<Spanned<u64>>,
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let at = |span: Range<usize>, message: String| ConfigError::Invalid {
        location: locate(text, file, span.start),
        message,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|err| {
        // toml's own message is several lines with a source excerpt; keep it to one line.
        at(
            err.span().unwrap_or(0..0),
            err.message().trim().replace('\n', " "),
        )
    })?;

    if raw.host.is_empty() {
        return Err(at(
            0..0,
            "no [[host]] configured: add at least one host (see `man 5 reachd.toml`)".into(),
        ));
    }
    let mut hosts: Vec<HostConfig> = Vec::with_capacity(raw.host.len());
    for spanned in raw.host {
        let raw = spanned.into_inner();
        let name_span = raw.name.span();
        let target_span = raw.target.as_ref().map_or(name_span.clone(), Spanned::span);
        let nix_span = raw.nix.as_ref().map_or(name_span.clone(), Spanned::span);
        let hostname_span = raw.hostname.span();
        let host = validate_host(raw, at)?;
        if hosts.iter().any(|h| h.name == host.name) {
            return Err(at(
                name_span,
                format!("key `name`: duplicate host name {:?}", host.name),
            ));
        }
        if let Some(other) = hosts
            .iter()
            .find(|h| h.hostname.eq_ignore_ascii_case(&host.hostname))
        {
            return Err(at(
                hostname_span,
                format!(
                    "key `hostname`: {:?} is already the mDNS name of host {:?} (names are case-insensitive)",
                    host.hostname, other.name
                ),
            ));
        }
        if let Some(other) = hosts.iter().find(|h| h.target == host.target) {
            return Err(at(
                target_span,
                format!(
                    "key `target`: {:?} is already the target of host {:?}",
                    host.target, other.name
                ),
            ));
        }
        if let Some(NixCache::Served { listen, .. }) = &host.nix {
            let taken = hosts.iter().find(|h| {
                matches!(&h.nix, Some(NixCache::Served { listen: other, .. }) if other == listen)
            });
            if let Some(other) = taken {
                return Err(at(
                    nix_span,
                    format!(
                        "key `listen`: {listen} is already where host {:?}'s cache is served; give each host its own port",
                        other.name
                    ),
                ));
            }
        }
        hosts.push(host);
    }
    let probe = match raw.probe {
        Some(raw) => validate_probe(raw, at)?,
        None => ProbeSettings::default(),
    };
    let (spool, bin_dir) = raw.nix.map_or((None, None), |n| (n.spool, n.bin_dir));
    let spool = absolute_path("spool", spool, at)?.unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL));
    let nix_bin_dir = absolute_path("bin_dir", bin_dir, at)?;
    let notify = raw.notify.map(|raw| validate_notify(raw, at)).transpose()?;
    Ok(Config {
        hosts,
        probe,
        spool,
        nix_bin_dir,
        notify,
    })
}

/// The value of path key `key`, which must be absolute (whether it exists is for its user to
/// tell: the file is also checked where that path is not, e.g. in a build sandbox).
fn absolute_path(
    key: &str,
    value: Option<Spanned<String>>,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        Some(path) if !path.get_ref().starts_with('/') => Err(at(
            path.span(),
            format!("key `{key}`: {:?} must be an absolute path", path.get_ref()),
        )),
        Some(path) => Ok(Some(PathBuf::from(path.into_inner()))),
        None => Ok(None),
    }
}

fn validate_host(
    raw: RawHost,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<HostConfig, ConfigError> {
    let name = raw.name.get_ref();
    if !is_host_name(name) {
        return Err(at(
            raw.name.span(),
            format!(
                "key `name`: {name:?} must be 1 to 32 characters of a-z, 0-9 and -, not starting or ending with -"
            ),
        ));
    }
    let hostname = raw.hostname.get_ref().trim_end_matches('.').to_string();
    if !is_mdns_hostname(&hostname) {
        return Err(at(
            raw.hostname.span(),
            format!(
                "key `hostname`: {:?} is not an mDNS name: it must end in .local (e.g. \"rpi.local\")",
                raw.hostname.get_ref()
            ),
        ));
    }
    let target = match raw.target {
        Some(target) => {
            if !is_target_name(target.get_ref()) {
                return Err(at(
                    target.span(),
                    format!(
                        "key `target`: {:?} must be a systemd unit name ending in .target",
                        target.get_ref()
                    ),
                ));
            }
            target.into_inner()
        }
        None => format!("{name}-accessible.target"),
    };
    let port = match raw.port {
        Some(port) if *port.get_ref() == 0 => {
            return Err(at(
                port.span(),
                "key `port`: must be from 1 to 65535".into(),
            ))
        }
        other => other.map(Spanned::into_inner),
    };
    let mut connections = Vec::with_capacity(raw.connections.len());
    for uuid in raw.connections {
        if !is_uuid(uuid.get_ref()) {
            return Err(at(
                uuid.span(),
                format!(
                    "key `connections`: {:?} is not a NetworkManager connection UUID (see `nmcli -f NAME,UUID connection`)",
                    uuid.get_ref()
                ),
            ));
        }
        connections.push(uuid.into_inner().to_ascii_lowercase());
    }
    let (nix, upload) = match raw.nix {
        Some(table) => {
            let valid = host_nix::validate(table.into_inner(), name, &at)?;
            (Some(valid.cache), valid.upload)
        }
        None => (None, None),
    };
    let builder = raw
        .builder
        .map(|table| host_builder::validate(table, &at))
        .transpose()?;
    Ok(HostConfig {
        name: raw.name.into_inner(),
        hostname,
        target,
        port,
        connections,
        nix,
        upload,
        builder,
    })
}

fn validate_probe(
    raw: RawProbe,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<ProbeSettings, ConfigError> {
    let defaults = ProbeSettings::default();
    let millis = |value: Option<Spanned<u64>>,
                  key: &str,
                  range: Range<u64>,
                  default: Duration|
     -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if range.contains(v.get_ref()) => Ok(Duration::from_millis(*v.get_ref())),
            Some(v) => Err(at(
                v.span(),
                format!(
                    "key `{key}`: must be from {} to {} milliseconds",
                    range.start,
                    range.end - 1
                ),
            )),
        }
    };
    let settings = ProbeSettings {
        present_interval: millis(
            raw.present_interval_ms,
            "present_interval_ms",
            100..3_600_001,
            defaults.present_interval,
        )?,
        timeout: millis(raw.timeout_ms, "timeout_ms", 10..60_001, defaults.timeout)?,
        absent_interval: millis(
            raw.absent_interval_ms,
            "absent_interval_ms",
            100..3_600_001,
            defaults.absent_interval,
        )?,
        absent_max_interval: millis(
            raw.absent_max_interval_ms,
            "absent_max_interval_ms",
            100..86_400_001,
            defaults.absent_max_interval,
        )?,
        cache_check_interval: millis(
            raw.cache_check_interval_ms,
            "cache_check_interval_ms",
            500..3_600_001,
            defaults.cache_check_interval,
        )?,
        failures: match raw.failures {
            None => defaults.failures,
            Some(v) if (1..=100).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => return Err(at(v.span(), "key `failures`: must be from 1 to 100".into())),
        },
    };
    if settings.absent_max_interval < settings.absent_interval {
        return Err(at(
            0..0,
            "key `absent_max_interval_ms`: must not be less than absent_interval_ms".into(),
        ));
    }
    Ok(settings)
}

fn validate_notify(
    raw: RawNotify,
    at: impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<NotifySettings, ConfigError> {
    let defaults = NotifySettings::default();
    let uploads_failing_after = match raw.uploads_failing_minutes {
        None => defaults.uploads_failing_after,
        Some(v) if (1..=1440).contains(v.get_ref()) => Duration::from_secs(*v.get_ref() * 60),
        Some(v) => {
            return Err(at(
                v.span(),
                "key `uploads_failing_minutes`: must be from 1 to 1440 minutes (a day)".into(),
            ))
        }
    };
    Ok(NotifySettings {
        uploads_failing_after,
        host_changes: raw.host_changes.unwrap_or(defaults.host_changes),
    })
}

fn locate(text: &str, file: &str, offset: usize) -> Location {
    // An offset inside a multi-byte character (it should not happen) counts from its start.
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Location {
        file: file.to_string(),
        line,
        column,
    }
}

fn is_host_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_mdns_hostname(hostname: &str) -> bool {
    let Some(stem) = hostname.strip_suffix(".local") else {
        return false;
    };
    hostname.len() <= 253
        && !stem.is_empty()
        && stem.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_target_name(unit: &str) -> bool {
    unit.strip_suffix(".target").is_some_and(|stem| {
        !stem.is_empty()
            && unit.len() <= 255
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
    })
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text, "config.toml").unwrap_err().to_string()
    }

    #[test]
    fn embedded_default_is_the_pi() {
        let config = parse(EMBEDDED_DEFAULT, "<embedded>").unwrap();
        assert_eq!(
            config.hosts,
            vec![HostConfig {
                name: "rpi".into(),
                hostname: "rpi.local".into(),
                target: "rpi-accessible.target".into(),
                port: None,
                connections: vec![],
                nix: None,
                upload: None,
                builder: None,
            }]
        );
        assert_eq!(config.probe, ProbeSettings::default());
        assert_eq!(config.hosts[0].fqdn(), "rpi.local.");
        assert_eq!(config.hosts[0].address_variable(), "REACHD_RPI_ADDRESS");
    }

    #[test]
    fn a_remote_builder_is_named_by_root_s_store_uri() {
        let host = |table: &str| {
            format!("[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.builder]\n{table}\n")
        };
        let config = parse(&host(r#"uri = "ssh-ng://nix-builder@rpi.local""#), "c.toml").unwrap();
        assert_eq!(
            config.hosts[0].builder.as_deref(),
            Some("ssh-ng://nix-builder@rpi.local")
        );
        assert!(config
            .summary(&Source::Embedded)
            .contains(", remote builder ssh-ng://nix-builder@rpi.local\n"));
        for bad in [
            r#"uri = "rpi.local""#,
            r#"uri = "ssh-ng://""#,
            r#"uri = "ssh://a b""#,
            r#"uri = "ssh://rpi; ssh://evil""#,
        ] {
            let err = error(&host(bad));
            assert!(
                err.starts_with("config.toml:5:7: key `uri`: ") && err.contains("ssh-ng://"),
                "{bad}: {err}"
            );
        }
        assert!(
            error(&host("")).contains("missing field `uri`"),
            "{}",
            error(&host(""))
        );
        let unknown = error(&host("uri = \"ssh://rpi\"\nsystems = \"aarch64-linux\""));
        assert!(unknown.contains("unknown field `systems`"), "{unknown}");
    }

    #[test]
    fn full_host_and_probe_settings() {
        let config = parse(
            r#"
[probe]
present_interval_ms = 5000
failures = 3
timeout_ms = 500
absent_interval_ms = 1000
absent_max_interval_ms = 10000
cache_check_interval_ms = 30000

[[host]]
name = "nas-2"
hostname = "nas.local."
target = "storage.target"
port = 22
connections = ["0F1E2D3C-4b5a-6978-8796-a5b4c3d2e1f0"]
"#,
            "c.toml",
        )
        .unwrap();
        let host = &config.hosts[0];
        assert_eq!(host.hostname, "nas.local");
        assert_eq!(host.target, "storage.target");
        assert_eq!(host.port, Some(22));
        assert_eq!(host.connections, ["0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]);
        assert_eq!(host.address_variable(), "REACHD_NAS_2_ADDRESS");
        assert_eq!(config.probe.failures, 3);
        assert_eq!(config.probe.timeout, Duration::from_millis(500));
        assert_eq!(config.probe.absent_max_interval, Duration::from_secs(10));
        assert_eq!(config.probe.cache_check_interval, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let msg = error("[[host]]\nname = \"rpi\"\nhostnme = \"rpi.local\"\n");
        assert!(msg.starts_with("config.toml:3:1: "), "{msg}");
        assert!(msg.contains("hostnme"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn bad_values_are_rejected_with_their_line() {
        let cases = [
            (
                "[[host]]\nname = \"Rpi\"\nhostname = \"rpi.local\"\n",
                "2:8",
                "`name`",
            ),
            (
                "[[host]]\nname = \"rpi\"\nhostname = \"rpi.lan\"\n",
                "3:12",
                "`hostname`",
            ),
            (
                "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\ntarget = \"rpi.service\"\n",
                "4:10",
                "`target`",
            ),
            (
                "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\nport = 0\n",
                "4:8",
                "`port`",
            ),
            (
                "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\nconnections = [\"home\"]\n",
                "4:16",
                "`connections`",
            ),
            (
                "[probe]\nfailures = 0\n[[host]]\nname = \"a\"\nhostname = \"a.local\"\n",
                "2:12",
                "`failures`",
            ),
            (
                "[probe]\ntimeout_ms = 5\n[[host]]\nname = \"a\"\nhostname = \"a.local\"\n",
                "2:14",
                "`timeout_ms`",
            ),
        ];
        for (text, place, key) in cases {
            let msg = error(text);
            assert!(
                msg.starts_with(&format!("config.toml:{place}: key {key}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn duplicates_and_empty_configs_are_rejected() {
        let msg = error(
            "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[[host]]\nname = \"rpi\"\nhostname = \"b.local\"\n",
        );
        assert!(msg.contains("duplicate host name \"rpi\""), "{msg}");
        assert!(msg.starts_with("config.toml:5:8: "), "{msg}");
        let msg = error(
            "[[host]]\nname = \"a\"\nhostname = \"a.local\"\ntarget = \"t.target\"\n[[host]]\nname = \"b\"\nhostname = \"b.local\"\ntarget = \"t.target\"\n",
        );
        assert!(msg.contains("already the target of host \"a\""), "{msg}");
        assert!(error("").contains("no [[host]] configured"));
    }

    #[test]
    fn type_errors_stay_on_one_line() {
        let msg = error("[[host]]\nname = 3\nhostname = \"rpi.local\"\n");
        assert!(msg.starts_with("config.toml:2:8: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn nix_defaults_to_a_cache_served_from_the_tunnelled_daemon_socket() {
        let config = parse(
            "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\n",
            "c.toml",
        )
        .unwrap();
        let nix = config.hosts[0].nix.clone().unwrap();
        assert_eq!(
            nix,
            NixCache::Served {
                daemon_socket: "%t/rpi-nix-daemon.sock".into(),
                listen: DEFAULT_LISTEN,
            }
        );
        assert_eq!(nix.substituter(), "http://127.0.0.1:37515");
        assert_eq!(
            expand_runtime_dir("%t/rpi-nix-daemon.sock", Path::new("/run/user/1000")),
            Path::new("/run/user/1000/rpi-nix-daemon.sock")
        );
        let config = parse(
            "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\nsubstituter = \"http://127.0.0.1:5000/\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(
            config.hosts[0].nix.as_ref().unwrap().substituter(),
            "http://127.0.0.1:5000"
        );
        assert_eq!(config.hosts[0].upload, None);
        assert_eq!(config.spool, Path::new("/var/spool/reachd"));
    }

    #[test]
    fn uploads_go_through_the_tunnel_by_default() {
        let config = parse(
            "[nix]\nspool = \"/srv/spool\"\n[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\nupload = true\n",
            "c.toml",
        )
        .unwrap();
        let upload = config.hosts[0].upload.clone().unwrap();
        assert_eq!(upload, "unix://%t/rpi-nix-daemon.sock");
        assert_eq!(
            expand_store_uri(&upload, Path::new("/run/user/1000")),
            "unix:///run/user/1000/rpi-nix-daemon.sock"
        );
        assert_eq!(config.spool, Path::new("/srv/spool"));
        assert_eq!(config.nix_bin_dir, None);
        assert!(error(
            "[nix]\nspool = \"spool\"\n[[host]]\nname = \"a\"\nhostname = \"a.local\"\n"
        )
        .contains("key `spool`"));
    }

    #[test]
    fn nix_bin_dir_is_an_absolute_path_shown_by_check_config() {
        let text = "[nix]\nbin_dir = \"/nix/var/nix/profiles/default/bin\"\n[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\nupload = true\n";
        let config = parse(text, "c.toml").unwrap();
        assert_eq!(
            config.nix_bin_dir.as_deref(),
            Some(Path::new("/nix/var/nix/profiles/default/bin"))
        );
        let summary = config.summary(&Source::File("c.toml".into()));
        assert!(
            summary.contains("Nix for uploads: /nix/var/nix/profiles/default/bin\n"),
            "{summary}"
        );
        assert_eq!(
            error("[nix]\nbin_dir = \"bin\"\n[[host]]\nname = \"a\"\nhostname = \"a.local\"\n"),
            "config.toml:2:11: key `bin_dir`: \"bin\" must be an absolute path"
        );
    }

    #[test]
    fn bad_nix_settings_are_rejected_with_their_line() {
        let host = "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\n";
        let cases = [
            ("listen = \"0.0.0.0:37515\"\n", "key `listen`", "loopback"),
            ("listen = \"127.0.0.1\"\n", "key `listen`", "loopback"),
            (
                "daemon_socket = \"rpi.sock\"\n",
                "key `daemon_socket`",
                "absolute",
            ),
            (
                "substituter = \"https://cache\"\n",
                "key `substituter`",
                "http://",
            ),
            (
                "substituter = \"http://h\\npost-build-hook = /x\"\n",
                "key `substituter`",
                "http://",
            ),
            (
                "listen = \"127.0.0.1:1\"\nsubstituter = \"http://127.0.0.1:5000\"\n",
                "key `substituter`",
                "exclude",
            ),
            ("cache = 1\n", "unknown field `cache`", "daemon_socket"),
            (
                "upload_store = \"unix:///s\"\n",
                "key `upload_store`",
                "upload = true",
            ),
            (
                "upload_store = \"-oProxyCommand=x\"\nupload = true\n",
                "key `upload_store`",
                "store URI",
            ),
            (
                "upload = true\nsubstituter = \"http://127.0.0.1:5000\"\n",
                "key `upload_store` is needed",
                "ssh-ng://",
            ),
        ];
        for (table, key, words) in cases {
            let msg = error(&format!("{host}{table}"));
            assert!(msg.starts_with("config.toml:5:"), "{msg}");
            assert!(msg.contains(key) && msg.contains(words), "{msg}");
        }
        let msg = error(&format!(
            "{host}[[host]]\nname = \"nas\"\nhostname = \"nas.local\"\n[host.nix]\n"
        ));
        assert!(
            msg.contains("already where host \"rpi\"'s cache is served"),
            "{msg}"
        );
    }

    #[test]
    fn notifications_are_off_without_a_notify_table_and_default_to_half_an_hour() {
        let host = "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n";
        assert_eq!(parse(host, "c.toml").unwrap().notify, None);
        let config = parse(&format!("[notify]\n{host}"), "c.toml").unwrap();
        assert_eq!(config.notify, Some(NotifySettings::default()));
        assert_eq!(
            NotifySettings::default().uploads_failing_after,
            Duration::from_secs(1800)
        );
        let config = parse(
            &format!("[notify]\nuploads_failing_minutes = 1440\nhost_changes = true\n{host}"),
            "c.toml",
        )
        .unwrap();
        assert_eq!(
            config.notify,
            Some(NotifySettings {
                uploads_failing_after: Duration::from_secs(24 * 3600),
                host_changes: true,
            })
        );
        let summary = config.summary(&Source::File("c.toml".into()));
        assert!(
            summary
                .contains("notifications: uploads failing for 1440 min, hosts coming and going\n"),
            "{summary}"
        );
    }

    #[test]
    fn bad_notify_settings_are_rejected_with_their_line() {
        let host = "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n";
        for minutes in ["0", "1441"] {
            assert_eq!(
                error(&format!("[notify]\nuploads_failing_minutes = {minutes}\n{host}")),
                "config.toml:2:27: key `uploads_failing_minutes`: must be from 1 to 1440 minutes (a day)"
            );
        }
        let cases = [
            ("uploads_failing_minutes = -5\n", "2:27"),
            ("host_changes = \"yes\"\n", "2:16"),
            ("uploads_failing = 30\n", "2:1"),
        ];
        for (table, place) in cases {
            let msg = error(&format!("[notify]\n{table}{host}"));
            assert!(msg.starts_with(&format!("config.toml:{place}: ")), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        let msg = error(&format!("[notify]\nuploads_failing = 30\n{host}"));
        assert!(
            msg.contains("unknown field `uploads_failing`")
                && msg.contains("uploads_failing_minutes"),
            "names the keys it knows: {msg}"
        );
    }

    #[test]
    fn an_offset_inside_a_multi_byte_character_does_not_panic() {
        let text = "# é\n[[host]]\nname = \"ünï\"\n";
        for offset in 0..=text.len() + 3 {
            let location = locate(text, "c.toml", offset);
            assert!(location.line >= 1 && location.column >= 1);
        }
        let msg = error("[[host]]\nname = \"ü\"\nhostname = \"é.local\"\n");
        assert!(msg.starts_with("config.toml:2:"), "{msg}");
    }

    #[test]
    fn two_hosts_with_one_mdns_name_are_rejected_whatever_the_case() {
        let msg = error(
            "[[host]]\nname = \"a\"\nhostname = \"rpi.local\"\n[[host]]\nname = \"b\"\nhostname = \"RPI.local.\"\n",
        );
        assert!(msg.starts_with("config.toml:6:12: key `hostname`"), "{msg}");
        assert!(msg.contains("host \"a\""), "{msg}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/reachd.toml"))).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read /nonexistent/reachd.toml"));
    }

    mod fuzzed {
        use proptest::prelude::*;

        use super::super::{parse, ConfigError};

        const VALID: &str = "[nix]\nspool = \"/srv/spool\"\n[probe]\nfailures = 3\n[notify]\nhost_changes = true\n[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\nconnections = [\"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\"]\n[host.nix]\nupload = true\n";

        /// Anything `parse` says about bad text is one located line.
        fn one_located_line(text: &str) {
            match parse(text, "c.toml") {
                Ok(_) => {}
                Err(ConfigError::Invalid { location, message }) => {
                    assert!(location.line >= 1 && location.column >= 1, "{location}");
                    assert!(!message.contains('\n'), "one line: {message:?}");
                }
                Err(other) => panic!("parse reads no file: {other}"),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_text_gives_a_config_or_one_located_line(text in "\\PC{0,300}") {
                one_located_line(&text);
            }

            #[test]
            fn a_mutated_valid_file_gives_a_config_or_one_located_line(
                at in 0..VALID.len(),
                cut in 0..20usize,
                insert in "[\\[\\]=\"\\n.a-z0-9é#-]{0,12}",
            ) {
                let mut text = VALID.to_string();
                let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                let end = (at + cut).min(text.len());
                let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
                text.replace_range(at..end, &insert);
                one_located_line(&text);
            }
        }
    }
}
