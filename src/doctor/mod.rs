//! `reachd doctor`: checks, in the order a user sets them up, every piece reachd depends on
//! (NetworkManager, the user manager, the configuration, each host's target, its ssh units and
//! whether the host answers now, the dispatcher hook, Nix's side for hosts with `[host.nix]`,
//! down to the `nix` uploads would run, and with `[notify]` the notification server), and says
//! per line `ok`, or what is wrong and the exact command or line that fixes it.
//!
//! Each check is a small function that returns [`Finding`]s; [`Finding`]'s `Display` is the one
//! place that decides how a line looks. The checks read; none changes anything.

mod builders;
mod files;
mod host;
mod nix_bin;
pub mod nix_conf;
mod nix_setup;
mod session;
mod ssh;

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::config;
use crate::error::Chain;

/// How a finding counts: only a failure makes `reachd doctor` exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Worth knowing, not a misconfiguration (the host is away, the agent is stopped).
    Warn,
    /// Something the user must fix for reachd to work.
    Fail,
}

/// One line of the report: what was found and, when it is not ok, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(what: impl Into<String>) -> Self {
        Finding {
            level: Level::Ok,
            what: what.into(),
            fix: None,
        }
    }

    pub fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Warn,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// `ok   what`, `warn what; fix: how`, `FAIL what; fix: how`: one line each.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag} {}", self.what)?;
        match &self.fix {
            Some(fix) => write!(f, "; fix: {fix}"),
            None => Ok(()),
        }
    }
}

/// The files the doctor reads, found as Nix and NetworkManager find them.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The NetworkManager dispatcher hook: /etc/NetworkManager/dispatcher.d/90-reachd, or
    /// `$REACHD_DISPATCHER_HOOK` (for tests).
    pub dispatcher_hook: PathBuf,
    /// The system's nix.conf: `$NIX_CONF_DIR/nix.conf`, else /etc/nix/nix.conf (as Nix reads it).
    pub system_nix_conf: PathBuf,
    /// The user's nix.conf files, as Nix finds them: `$NIX_USER_CONF_FILES`, else
    /// `nix/nix.conf` under `$XDG_CONFIG_DIRS` and `$XDG_CONFIG_HOME` (`~/.config`).
    pub user_nix_confs: Vec<PathBuf>,
    /// `$XDG_RUNTIME_DIR`, where the agent writes its nix.conf fragment.
    pub runtime_dir: Option<PathBuf>,
}

/// The dispatcher hook's place, where NetworkManager runs it.
pub const DISPATCHER_HOOK: &str = "/etc/NetworkManager/dispatcher.d/90-reachd";
/// Overrides [`DISPATCHER_HOOK`], for tests.
pub const DISPATCHER_HOOK_VAR: &str = "REACHD_DISPATCHER_HOOK";

impl Paths {
    /// From the process's environment.
    pub fn from_env() -> Self {
        Paths::from_vars(|name| std::env::var_os(name))
    }

    /// From the variables `lookup` gives (an empty one counts as unset).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let dispatcher_hook = var(DISPATCHER_HOOK_VAR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DISPATCHER_HOOK));
        let system_nix_conf = var("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"))
            .join("nix.conf");
        let user_nix_confs = match var("NIX_USER_CONF_FILES") {
            Some(files) => std::env::split_paths(&files).collect(),
            None => {
                let config_dirs = var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
                let mut dirs: Vec<PathBuf> = std::env::split_paths(&config_dirs).collect();
                // Least important first, the user's own last: as Nix applies them.
                dirs.reverse();
                let home = var("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")));
                dirs.extend(home);
                dirs.into_iter().map(|d| d.join("nix/nix.conf")).collect()
            }
        };
        Paths {
            dispatcher_hook,
            system_nix_conf,
            user_nix_confs,
            runtime_dir: var("XDG_RUNTIME_DIR").map(PathBuf::from),
        }
    }
}

/// Runs every check in order, handing each finding to `emit` as soon as it is known.
pub async fn run(config: Option<PathBuf>, paths: &Paths, mut emit: impl FnMut(Finding)) {
    let buses = session::Buses::connect().await;
    let network = session::network(&buses, &mut emit).await;
    session::user_manager(&buses, &mut emit).await;
    session::agent(&buses, &mut emit).await;
    let loaded = match config::load(config.as_deref()) {
        Ok((config, source)) => {
            let names: Vec<&str> = config.hosts.iter().map(|h| h.name.as_str()).collect();
            emit(Finding::ok(format!(
                "configuration: {source}: host(s) {}",
                names.join(", ")
            )));
            Some(config)
        }
        Err(err) => {
            emit(Finding::fail(
                format!("configuration: {}", Chain(&err)),
                "correct it, then check it with `reachd run --check-config`",
            ));
            None
        }
    };
    if let Some(config) = &loaded {
        for host in &config.hosts {
            if let Some(target) = session::target(&buses, host, &mut emit).await {
                ssh::check(&buses, host, &target, &mut emit).await;
            }
        }
        let firewall = session::active_firewall(&buses).await;
        host::check_all(config, network.as_ref(), firewall.as_deref(), &mut emit).await;
    }
    emit(files::dispatcher_hook(&paths.dispatcher_hook));
    if let Some(config) = &loaded {
        let agent_groups = session::agent_groups(&buses).await;
        nix_setup::check(config, paths, agent_groups.as_deref(), &mut emit);
        if config.hosts.iter().any(|h| h.upload.is_some()) {
            let (path, whose) = match session::agent_path(&buses).await {
                Some((path, whose)) => (Some(path.into()), whose),
                None => (
                    std::env::var_os("PATH"),
                    "this shell's PATH (the user manager's could not be read)",
                ),
            };
            let places = crate::upload::nix_bin::Places::with_path(path);
            emit(nix_bin::check(config, &places, whose).await);
        }
        if config.notify.is_some() {
            session::notification_server(&buses, &mut emit).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn paths(vars: &[(&str, &str)]) -> Paths {
        Paths::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn files_are_found_where_nix_and_networkmanager_look() {
        let default = paths(&[("HOME", "/home/me")]);
        assert_eq!(default.dispatcher_hook, Path::new(DISPATCHER_HOOK));
        assert_eq!(default.system_nix_conf, Path::new("/etc/nix/nix.conf"));
        assert_eq!(
            default.user_nix_confs,
            [
                Path::new("/etc/xdg/nix/nix.conf"),
                Path::new("/home/me/.config/nix/nix.conf")
            ]
        );
        assert_eq!(default.runtime_dir, None);

        let set = paths(&[
            ("HOME", "/home/me"),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("XDG_CONFIG_DIRS", "/a:/b"),
            ("NIX_CONF_DIR", "/lab/etc"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            (DISPATCHER_HOOK_VAR, "/tmp/hook"),
        ]);
        assert_eq!(set.system_nix_conf, Path::new("/lab/etc/nix.conf"));
        assert_eq!(set.dispatcher_hook, Path::new("/tmp/hook"));
        assert_eq!(
            set.user_nix_confs,
            [
                Path::new("/b/nix/nix.conf"),
                Path::new("/a/nix/nix.conf"),
                Path::new("/cfg/nix/nix.conf")
            ]
        );
        assert_eq!(
            set.runtime_dir.as_deref(),
            Some(Path::new("/run/user/1000"))
        );

        let files = paths(&[
            ("NIX_USER_CONF_FILES", "/x.conf:/y.conf"),
            ("NIX_CONF_DIR", ""),
        ]);
        assert_eq!(
            files.user_nix_confs,
            [Path::new("/x.conf"), Path::new("/y.conf")]
        );
        assert_eq!(files.system_nix_conf, Path::new("/etc/nix/nix.conf"));
    }
}
