//! The Nix side of hosts with `[host.nix]`: the user's nix.conf includes reachd's fragment, the
//! system's trusts each cache's exact URL (and does not include the fragment), and, for uploads,
//! Nix's post-build hook is reachd's, the spool is writable by the user and the signing keys are
//! in order; for remote builders, root's list names them (builders.rs). docs/nix.md is the
//! set-up these checks follow.

use std::ffi::CString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::builders;
use super::files::{root_program_problem, Facts};
use super::nix_conf::NixConf;
use super::{Finding, Paths};
use crate::cache::fragment::Fragment;
use crate::config::{Config, NixCache};

/// The post-build hook's program name.
const HOOK_NAME: &str = "reachd-nix-upload";
const RESTART: &str = "then restart the nix-daemon (`sudo systemctl restart nix-daemon`)";

/// The system's nix.conf: what it says, where it is, and whether NixOS makes it (a file in the
/// store, read-only: its fixes are options of the system's configuration, not edits).
pub(super) struct SystemConf {
    pub conf: NixConf,
    pub path: PathBuf,
    pub by_nixos: bool,
}

impl SystemConf {
    fn read(path: &Path) -> std::io::Result<SystemConf> {
        Ok(SystemConf {
            conf: NixConf::read(path)?,
            path: path.to_path_buf(),
            by_nixos: fs::canonicalize(path).is_ok_and(|real| real.starts_with("/nix/store")),
        })
    }

    /// `edit` of the file, or on NixOS the change (`nixos`) of the system's configuration that
    /// makes the file say it.
    fn fix(&self, nixos: &str, edit: impl FnOnce() -> String) -> String {
        if self.by_nixos {
            format!(
                "{} is made by NixOS: {nixos} in the system's configuration, then `sudo nixos-rebuild switch`",
                self.path.display()
            )
        } else {
            edit()
        }
    }
}

/// `agent_groups`: the running agent's groups, when it runs (the spool must be its too).
pub fn check(
    config: &Config,
    paths: &Paths,
    agent_groups: Option<&[u32]>,
    emit: &mut impl FnMut(Finding),
) {
    if config
        .hosts
        .iter()
        .all(|h| h.nix.is_none() && h.builder.is_none())
    {
        return;
    }
    let runtime_dir = paths.runtime_dir.clone().unwrap_or_else(|| {
        // SAFETY: plain syscall.
        PathBuf::from(format!("/run/user/{}", unsafe { libc::getuid() }))
    });
    let fragment = Fragment::in_runtime_dir(&runtime_dir).path().to_path_buf();
    emit(user_include(&paths.user_nix_confs, &fragment));
    let system_path = &paths.system_nix_conf;
    let system = match SystemConf::read(system_path) {
        Ok(conf) => conf,
        Err(err) => {
            emit(Finding::fail(
                format!(
                    "the system's nix.conf {} cannot be read ({err})",
                    system_path.display()
                ),
                format!(
                    "install Nix as a multi-user (daemon) installation; {} is its configuration",
                    system_path.display()
                ),
            ));
            return;
        }
    };
    for problem in &system.conf.problems {
        emit(Finding::fail(
            format!("Nix refuses {problem}"),
            "correct that line (`name = value`, `include PATH` or `!include PATH`)",
        ));
    }
    if let Some(finding) = fragment_in_system(&system, &fragment) {
        emit(finding);
    }
    for host in &config.hosts {
        if let Some(cache) = &host.nix {
            emit(trusted_substituter(&host.name, cache, &system));
        }
        if let Some(uri) = &host.builder {
            emit(builders::listed(&host.name, uri, &system));
            emit(builders::connect_timeout(&host.name, uri));
        }
    }
    if config.hosts.iter().any(|h| h.upload.is_some()) {
        emit(post_build_hook(&system));
        emit(spool(&config.spool, agent_groups));
        for finding in signing_keys(&system) {
            emit(finding);
        }
    }
}

/// The user's nix.conf files include the fragment, with `!include`.
fn user_include(files: &[PathBuf], fragment: &Path) -> Finding {
    let line = format!("`!include {}`", fragment.display());
    let mut plain = None;
    for file in files {
        let Ok(conf) = NixConf::read(file) else {
            continue;
        };
        for include in conf.includes_of(fragment) {
            let at = format!("{}:{}", include.from.display(), include.line);
            if include.optional {
                return Finding::ok(format!("{at} includes reachd's fragment ({line})"));
            }
            plain.get_or_insert(at);
        }
    }
    let place = files
        .last()
        .map_or("~/.config/nix/nix.conf".into(), |f| f.display().to_string());
    match plain {
        Some(at) => Finding::warn(
            format!("{at} includes reachd's fragment with `include`: every Nix command fails while the fragment is missing (before reachd first runs)"),
            format!("write it {line}"),
        ),
        None => Finding::fail(
            format!("no nix.conf of yours includes reachd's fragment {} (read: {place}): your Nix never uses the hosts' caches", fragment.display()),
            format!("add the line {line} to {place}"),
        ),
    }
}

/// The system's nix.conf must not include the fragment: the daemon reads it once, at its start.
fn fragment_in_system(system: &SystemConf, fragment: &Path) -> Option<Finding> {
    let include = system.conf.includes_of(fragment).into_iter().next()?;
    Some(Finding::fail(
        format!(
            "{}:{} includes reachd's fragment: the nix-daemon reads it only when it starts and would keep the host's cache for every build, home or away",
            include.from.display(),
            include.line
        ),
        system.fix("remove the `!include` of the fragment (it belongs in your own nix.conf)", || {
            format!("remove that line from {} (the fragment belongs in your own nix.conf), {RESTART}", system.path.display())
        }),
    ))
}

/// The system's `trusted-substituters` lists the host's cache URL exactly.
fn trusted_substituter(host: &str, cache: &NixCache, system: &SystemConf) -> Finding {
    let url = cache.substituter();
    let path = &system.path;
    let trusted = system.conf.get("trusted-substituters");
    if trusted.contains(&url) {
        return Finding::ok(format!(
            "{host}: {url} is in trusted-substituters of {}",
            path.display()
        ));
    }
    let listed = if trusted.is_empty() {
        "it lists none".to_string()
    } else {
        format!("it lists {}", trusted.join(" "))
    };
    Finding::fail(
        format!(
            "{host}: {url} is not in trusted-substituters of {} ({listed}): the nix-daemon ignores the cache for your commands",
            path.display()
        ),
        system.fix(&format!("set `services.reachd.cache.enable = true;` and `services.reachd.cache.substituters = [ \"{url}\" ];`"), || {
            format!("as root, add {url} to `trusted-substituters` in {} (exactly: `trusted-substituters = {url}`), {RESTART}", path.display())
        }),
    )
}

/// Nix's post-build hook is reachd's, and safe to run as root.
fn post_build_hook(system: &SystemConf) -> Finding {
    let path = &system.path;
    let fix = system.fix("set `services.reachd.upload.enable = true;`", || {
        format!(
            "as root, set `post-build-hook = /usr/local/bin/{HOOK_NAME}` in {} (a root-owned copy of the program), {RESTART}",
            path.display()
        )
    });
    let hook = system.conf.get("post-build-hook").join(" ");
    if hook.is_empty() {
        return Finding::fail(
            format!(
                "no post-build-hook in {}: builds are not recorded for upload",
                path.display()
            ),
            fix,
        );
    }
    let hook_path = Path::new(&hook);
    if hook_path.file_name().and_then(|n| n.to_str()) != Some(HOOK_NAME) {
        return Finding::fail(
            format!("post-build-hook in {} is {hook}, not {HOOK_NAME}: builds are not recorded for upload", path.display()),
            fix,
        );
    }
    match fs::metadata(hook_path) {
        Err(err) => Finding::fail(
            format!("post-build hook {hook} cannot be read ({err})"),
            fix,
        ),
        Ok(meta) => root_program_problem("post-build hook", hook_path, Facts::from(&meta))
            .unwrap_or_else(|| {
                Finding::ok(format!(
                    "post-build hook {hook}: root's, not writable by others"
                ))
            }),
    }
}

/// The user can take entries from the spool: read it, write its `incoming/` and `hosts/`.
/// The spool, as this process may use it and, when the agent runs (`agent_groups`), as the
/// agent may: the user manager keeps the groups it started with, so the agent may still lack
/// the spool's group after `usermod` and a new login.
fn spool(dir: &Path, agent_groups: Option<&[u32]>) -> Finding {
    let fix = "as root: `systemd-tmpfiles --create /etc/tmpfiles.d/reachd.conf` (systemd/tmpfiles.d/reachd.conf) and `usermod -aG reachd $USER`, then reboot or log out of every session (the user manager keeps the groups it started with)";
    for (path, mode, what) in [
        (dir.to_path_buf(), libc::R_OK | libc::X_OK, "readable"),
        (
            dir.join("incoming"),
            libc::R_OK | libc::W_OK | libc::X_OK,
            "writable",
        ),
        (
            dir.join("hosts"),
            libc::R_OK | libc::W_OK | libc::X_OK,
            "writable",
        ),
    ] {
        let problem = match access(&path, mode) {
            Ok(()) => continue,
            Err(err) if err.kind() == ErrorKind::NotFound => "does not exist".to_string(),
            Err(err) => format!("is not {what} by you ({err})"),
        };
        return Finding::fail(format!("upload spool {} {problem}", path.display()), fix);
    }
    if let Some(finding) = agent_lacks_group(dir, agent_groups) {
        return finding;
    }
    Finding::ok(format!(
        "upload spool {}: yours to take from",
        dir.display()
    ))
}

/// A failure when the agent runs without the group of the spool's directory, which it needs
/// (the directory belongs to root and the group: docs/nix.md, "Uploads").
fn agent_lacks_group(dir: &Path, agent_groups: Option<&[u32]>) -> Option<Finding> {
    use std::os::unix::fs::MetadataExt;
    let group = std::fs::metadata(dir).ok()?.gid();
    let groups = agent_groups?;
    if group == 0 || groups.contains(&group) {
        return None;
    }
    Some(Finding::fail(
        format!(
            "upload spool {}: the running agent is not in its group (gid {group}): its user \
             manager started before you joined it",
            dir.display()
        ),
        "reboot, or log out of every session (the user manager keeps the groups it started \
         with, and ends with your last session unless lingering is on), then `reachd doctor` \
         again",
    ))
}

/// access(2): whether this process's user may use `path` as `mode` says.
fn access(path: &Path, mode: libc::c_int) -> std::io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated string.
    if unsafe { libc::access(path.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `secret-key-files`: set, there, and readable by root alone; what cannot be checked is said.
fn signing_keys(system: &SystemConf) -> Vec<Finding> {
    let path = &system.path;
    let files = system.conf.get("secret-key-files");
    if files.is_empty() {
        const GENERATE: &str = "as root: `nix-store --generate-binary-cache-key laptop-1 /etc/nix/laptop-1.sec /etc/nix/laptop-1.pub`";
        const TRUST: &str = "then add laptop-1.pub to the host's trusted-public-keys";
        let set = system.fix(
            "set `nix.settings.secret-key-files = [ \"/etc/nix/laptop-1.sec\" ];`",
            || {
                format!(
                    "`secret-key-files = /etc/nix/laptop-1.sec` in {}, {RESTART}",
                    path.display()
                )
            },
        );
        return vec![Finding::warn(
            format!("no secret-key-files in {}: uploads are unsigned, and a host that does not trust the uploading user refuses them", path.display()),
            format!("{GENERATE}; {set}; {TRUST}"),
        )];
    }
    files
        .iter()
        .map(|file| signing_key(Path::new(file)))
        .collect()
}

fn signing_key(file: &Path) -> Finding {
    let shown = file.display();
    match fs::metadata(file) {
        Err(err) if err.kind() == ErrorKind::PermissionDenied => Finding::warn(
            format!("secret key {shown} cannot be checked as you ({err})"),
            format!("as root: `ls -l {shown}` must show root's file, mode 0600"),
        ),
        Err(err) => Finding::fail(
            format!("secret key {shown} cannot be read ({err}): the nix-daemon cannot sign builds"),
            format!("as root: `nix-store --generate-binary-cache-key laptop-1 {shown} {}`", file.with_extension("pub").display()),
        ),
        Ok(meta) if meta.uid() != 0 || meta.mode() & 0o077 != 0 => Finding::fail(
            format!("secret key {shown} belongs to uid {} with mode {:04o}: others can sign paths as this machine", meta.uid(), meta.mode() & 0o7777),
            format!("`sudo chown root:root {shown} && sudo chmod 600 {shown}`"),
        ),
        Ok(_) => Finding::ok(format!(
            "secret key {shown}: root's alone (whether the host trusts its public key cannot be checked from here: its trusted-public-keys must list it)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    fn cache() -> NixCache {
        NixCache::Served {
            daemon_socket: "%t/rpi-nix-daemon.sock".into(),
            listen: crate::config::DEFAULT_LISTEN,
        }
    }

    const SYSTEM: &str = "/etc/nix/nix.conf";

    fn conf(text: &str) -> SystemConf {
        let mut conf = NixConf::default();
        conf.apply(Path::new(SYSTEM), text, 0);
        SystemConf {
            conf,
            path: SYSTEM.into(),
            by_nixos: false,
        }
    }

    /// The same, made by NixOS.
    fn nixos(text: &str) -> SystemConf {
        SystemConf {
            by_nixos: true,
            ..conf(text)
        }
    }

    #[test]
    fn the_exact_url_must_be_trusted() {
        let ok = trusted_substituter(
            "rpi",
            &cache(),
            &conf("trusted-substituters = https://c http://127.0.0.1:37515\n"),
        );
        assert_eq!(ok.level, Level::Ok, "{ok}");
        let near = trusted_substituter(
            "rpi",
            &cache(),
            &conf("trusted-substituters = http://127.0.0.1:37515/\n"),
        );
        assert_eq!(near.level, Level::Fail);
        assert_eq!(
            near.to_string(),
            "FAIL rpi: http://127.0.0.1:37515 is not in trusted-substituters of /etc/nix/nix.conf (it lists http://127.0.0.1:37515/): \
             the nix-daemon ignores the cache for your commands; fix: as root, add http://127.0.0.1:37515 to `trusted-substituters` in \
             /etc/nix/nix.conf (exactly: `trusted-substituters = http://127.0.0.1:37515`), then restart the nix-daemon (`sudo systemctl restart nix-daemon`)"
        );
        let none = trusted_substituter("rpi", &cache(), &conf(""));
        assert!(none.what.contains("(it lists none)"), "{none}");
    }

    #[test]
    fn the_user_include_is_found_and_named_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("nix.conf");
        let fragment = Path::new("/run/user/1000/reachd/nix.conf");
        fs::write(&user, "!include /run/user/1000/reachd/nix.conf\n").unwrap();
        let found = user_include(std::slice::from_ref(&user), fragment);
        assert_eq!(found.level, Level::Ok, "{found}");
        assert!(
            found
                .what
                .starts_with(&format!("{}:1 includes", user.display())),
            "{found}"
        );

        fs::write(&user, "include /run/user/1000/reachd/nix.conf\n").unwrap();
        let plain = user_include(std::slice::from_ref(&user), fragment);
        assert_eq!(plain.level, Level::Warn, "{plain}");
        assert_eq!(
            plain.fix.as_deref(),
            Some("write it `!include /run/user/1000/reachd/nix.conf`")
        );

        fs::write(&user, "substituters = https://c\n").unwrap();
        let missing = user_include(std::slice::from_ref(&user), fragment);
        assert_eq!(missing.level, Level::Fail);
        assert_eq!(
            missing.fix.unwrap(),
            format!(
                "add the line `!include /run/user/1000/reachd/nix.conf` to {}",
                user.display()
            )
        );
    }

    #[test]
    fn the_fragment_in_the_system_conf_is_refused() {
        let fragment = Path::new("/run/user/1000/reachd/nix.conf");
        assert_eq!(
            fragment_in_system(&conf("trusted-substituters = http://x\n"), fragment),
            None
        );
        let found =
            fragment_in_system(&conf("!include /run/user/1000/reachd/nix.conf\n"), fragment)
                .expect("named");
        assert!(
            found
                .what
                .starts_with("/etc/nix/nix.conf:1 includes reachd's fragment"),
            "{found}"
        );
    }

    #[test]
    fn the_post_build_hook_must_be_reachds() {
        let unset = post_build_hook(&conf(""));
        assert!(
            unset
                .what
                .starts_with("no post-build-hook in /etc/nix/nix.conf"),
            "{unset}"
        );
        let other = post_build_hook(&conf("post-build-hook = /etc/nix/upload-to-pi.sh\n"));
        assert!(
            other
                .what
                .contains("is /etc/nix/upload-to-pi.sh, not reachd-nix-upload"),
            "{other}"
        );
        assert!(other
            .fix
            .unwrap()
            .contains("`post-build-hook = /usr/local/bin/reachd-nix-upload`"));
    }

    #[test]
    fn on_nixos_the_fixes_are_options_of_the_system_s_configuration() {
        let rebuild = "/etc/nix/nix.conf is made by NixOS: ";
        let untrusted = trusted_substituter("rpi", &cache(), &nixos(""));
        assert_eq!(
            untrusted.fix.as_deref(),
            Some(
                "/etc/nix/nix.conf is made by NixOS: set `services.reachd.cache.enable = true;` and \
                 `services.reachd.cache.substituters = [ \"http://127.0.0.1:37515\" ];` in the system's \
                 configuration, then `sudo nixos-rebuild switch`"
            )
        );
        let hook = post_build_hook(&nixos("")).fix.unwrap();
        assert!(
            hook.starts_with(&format!(
                "{rebuild}set `services.reachd.upload.enable = true;`"
            )),
            "{hook}"
        );
        let keys = signing_keys(&nixos("")).remove(0).fix.unwrap();
        assert!(
            keys.contains(&format!(
                "{rebuild}set `nix.settings.secret-key-files = [ \"/etc/nix/laptop-1.sec\" ];`"
            )),
            "{keys}"
        );
        let fragment = Path::new("/run/user/1000/reachd/nix.conf");
        let included = fragment_in_system(
            &nixos("!include /run/user/1000/reachd/nix.conf\n"),
            fragment,
        );
        let fix = included.expect("named").fix.unwrap();
        assert!(fix.starts_with(rebuild), "{fix}");
        for fix in [untrusted.fix.unwrap(), hook, keys, fix] {
            assert!(
                !fix.contains("systemctl restart nix-daemon"),
                "NixOS restarts it: {fix}"
            );
        }
    }

    #[test]
    fn a_spool_that_is_not_there_is_named() {
        let finding = spool(Path::new("/nonexistent/reachd-spool"), None);
        assert_eq!(finding.level, Level::Fail);
        assert_eq!(
            finding.what,
            "upload spool /nonexistent/reachd-spool does not exist"
        );
        assert!(finding.fix.unwrap().contains("systemd-tmpfiles --create"));
    }

    #[test]
    fn an_agent_without_the_spool_group_is_told_to_wait_for_a_new_user_manager() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut group = std::fs::metadata(dir.path()).expect("stat").gid();
        if group == 0 {
            // As root: a group of its own, as the spool's `reachd`.
            group = 4242;
            std::os::unix::fs::chown(dir.path(), None, Some(group)).expect("chown");
        }
        assert_eq!(agent_lacks_group(dir.path(), Some(&[7, group])), None);
        assert_eq!(
            agent_lacks_group(dir.path(), None),
            None,
            "no agent running"
        );
        let finding = agent_lacks_group(dir.path(), Some(&[7, 8])).expect("a failure");
        assert_eq!(finding.level, Level::Fail);
        assert!(
            finding.what.contains("not in its group"),
            "{}",
            finding.what
        );
        assert!(finding.fix.unwrap().contains("log out of every session"));
    }

    #[test]
    fn signing_keys_missing_or_open_to_others_are_named() {
        let unset = signing_keys(&conf(""));
        assert_eq!(unset.len(), 1);
        assert_eq!(unset[0].level, Level::Warn);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("laptop-1.sec");
        let missing = signing_key(&key);
        assert_eq!(missing.level, Level::Fail);
        assert!(missing.what.contains("cannot be read"), "{missing}");
        fs::write(&key, "laptop-1:secret").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let open = signing_key(&key);
        assert_eq!(open.level, Level::Fail, "{open}");
        assert!(open
            .fix
            .unwrap()
            .contains(&format!("sudo chmod 600 {}", key.display())));
    }
}
