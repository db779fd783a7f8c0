//! A host's `[host.builder]` against root's side: the nix-daemon's `builders` must list the
//! host's store URI, since reachd only switches remote builds off while the host is away and
//! never adds a machine (docs/remote-builder.md). The list is read as Nix reads it: entries
//! separated by newlines and `;`, `#` comments, `@FILE` read (a missing file lists nothing),
//! the store URI first on each line, `ssh://` added to one with no scheme. And root's ssh should
//! give the builder a connect timeout, which bounds the one build in flight when it vanishes.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::nix_setup::SystemConf;
use super::Finding;

/// How deep `@FILE` entries are followed (a file naming itself ends there).
const MAX_DEPTH: usize = 8;

/// Whether root's nix-daemon lists `uri` among its remote builders.
pub(super) fn listed(host: &str, uri: &str, system: &SystemConf) -> Finding {
    let setting = system.conf.get("builders").join(" ");
    let setting = if system.conf.is_set("builders") {
        setting
    } else {
        // Nix's default: the machines file beside nix.conf.
        format!("@{}", system.path.with_file_name("machines").display())
    };
    let machines = store_uris(&setting, 0);
    let shown = system.path.display();
    if machines.iter().any(|m| m == uri) {
        return Finding::ok(format!(
            "{host}: the nix-daemon lists the remote builder {uri} (builders = {setting})"
        ));
    }
    let listed = if machines.is_empty() {
        "it lists none".to_string()
    } else {
        format!("it lists {}", machines.join(" "))
    };
    let fix = if system.by_nixos {
        format!(
            "{shown} is made by NixOS: set `nix.distributedBuilds = true;` and the host in `nix.buildMachines` (its protocol, sshUser and hostName making {uri}, its system, sshKey and publicHostKey) in the system's configuration, then `sudo nixos-rebuild switch`"
        )
    } else {
        format!(
            "as root, add the host's machine line to {} (e.g. `{uri} aarch64-linux /root/.ssh/nix-builder 4 1 - - -`, the system and key yours), or name that file in `builders` of {shown} and restart the nix-daemon",
            system.path.with_file_name("machines").display()
        )
    };
    Finding::fail(
        format!("{host}: {uri} is not among the nix-daemon's remote builders (builders = {setting}; {listed}): builds never go to the host"),
        fix,
    )
}

/// The system's ssh configuration, which root's ssh reads too.
const SYSTEM_SSH_CONFIG: &str = "/etc/ssh/ssh_config";
/// How long `ssh -G` (which only reads its configuration) may take.
const SSH_G_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the system's ssh configuration gives the builder's host a `ConnectTimeout`: without
/// one, a build started as the host vanishes waits for the kernel's TCP timeout. Root's own
/// `~/.ssh/config` and the nix-daemon's `NIX_SSHOPTS` may set it too; a user cannot read them.
pub(super) fn connect_timeout(host: &str, uri: &str) -> Finding {
    let target = ssh_target(uri);
    let config = match ssh_config_for(&target) {
        Ok(config) => config,
        Err(why) => {
            return Finding::warn(
                format!("{host}: cannot ask ssh how root reaches {target} ({why})"),
                "install openssh-client, which the nix-daemon's build hook runs",
            )
        }
    };
    match timeout_in(&config) {
        Some(seconds) => Finding::ok(format!(
            "{host}: ssh gives {target} a connect timeout of {seconds} s ({SYSTEM_SSH_CONFIG})"
        )),
        None => Finding::warn(
            format!("{host}: {SYSTEM_SSH_CONFIG} gives {target} no ConnectTimeout: unless root's ~/.ssh/config or the nix-daemon's NIX_SSHOPTS does, a build started as the host vanishes waits for the TCP timeout (about 2 min)"),
            format!("as root, put `Host {}` and `ConnectTimeout 1` in /etc/ssh/ssh_config.d/nix-builder.conf (NixOS: `programs.ssh.extraConfig`)", target.rsplit('@').next().unwrap_or(&target)),
        ),
    }
}

/// `user@host` of an `ssh://` or `ssh-ng://` store URI (its parameters and port dropped).
fn ssh_target(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = rest.split(['?', '/']).next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((target, port)) if port.bytes().all(|b| b.is_ascii_digit()) => target.into(),
        _ => authority.into(),
    }
}

/// What `ssh -G` makes of the system's configuration for `target`.
fn ssh_config_for(target: &str) -> Result<String, String> {
    let mut child = Command::new("ssh")
        .args(["-G", "-F", SYSTEM_SSH_CONFIG, "--", target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("`ssh -G` cannot be run: {e}"))?;
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed() > SSH_G_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`ssh -G` did not answer within {SSH_G_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!("`ssh -G` failed ({})", output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The connect timeout in `ssh -G` output, in seconds; `None` when there is none.
fn timeout_in(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("connecttimeout "))
        .and_then(|value| value.trim().parse().ok())
}

/// The store URIs the `builders` value `text` names, as Nix expands it.
fn store_uris(text: &str, depth: usize) -> Vec<String> {
    let mut uris = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for entry in line.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(file) = entry.strip_prefix('@') {
                if depth < MAX_DEPTH {
                    let text = fs::read_to_string(Path::new(file.trim())).unwrap_or_default();
                    uris.extend(store_uris(&text, depth + 1));
                }
                continue;
            }
            let Some(uri) = entry.split_whitespace().next() else {
                continue;
            };
            uris.push(if uri.contains("://") {
                uri.to_string()
            } else {
                format!("ssh://{uri}")
            });
        }
    }
    uris
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::nix_conf::NixConf;
    use crate::doctor::Level;

    fn system(dir: &Path, text: &str, by_nixos: bool) -> SystemConf {
        let path = dir.join("nix.conf");
        fs::write(&path, text).unwrap();
        SystemConf {
            conf: NixConf::read(&path).unwrap(),
            path,
            by_nixos,
        }
    }

    #[test]
    fn machine_lines_are_read_as_nix_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let more = dir.path().join("more");
        fs::write(&more, "ssh-ng://b@pi2 aarch64-linux\n# ssh://commented\n").unwrap();
        let text = format!(
            "ssh://a@pi1 x86_64-linux - 2 ; nas.local # no scheme\n@{}\n@/nonexistent/machines",
            more.display()
        );
        assert_eq!(
            store_uris(&text, 0),
            ["ssh://a@pi1", "ssh://nas.local", "ssh-ng://b@pi2"]
        );
    }

    #[test]
    fn ssh_is_asked_about_the_uri_s_login_and_host() {
        assert_eq!(
            ssh_target("ssh-ng://nix-builder@rpi.local?remote-store=unix%3A%2F%2Fx"),
            "nix-builder@rpi.local"
        );
        assert_eq!(ssh_target("ssh://rpi.local:2222"), "rpi.local");
        assert_eq!(
            timeout_in("user root\nconnecttimeout 1\nport 22\n"),
            Some(1)
        );
        assert_eq!(timeout_in("user root\nconnecttimeout none\n"), None);
        assert_eq!(timeout_in("port 22\n"), None);
    }

    #[test]
    fn the_host_must_be_in_root_s_list() {
        let dir = tempfile::tempdir().unwrap();
        let uri = "ssh-ng://nix-builder@rpi.local";
        // Unset: Nix reads the machines file beside nix.conf.
        let unset = system(dir.path(), "", false);
        let missing = listed("rpi", uri, &unset);
        assert_eq!(missing.level, Level::Fail, "{missing}");
        assert!(missing.what.contains("it lists none"), "{missing}");
        assert!(
            missing.fix.as_deref().unwrap().contains(&format!(
                "add the host's machine line to {}",
                dir.path().join("machines").display()
            )),
            "{missing}"
        );
        fs::write(
            dir.path().join("machines"),
            format!("{uri} aarch64-linux\n"),
        )
        .unwrap();
        assert_eq!(listed("rpi", uri, &unset).level, Level::Ok);

        let other = system(dir.path(), "builders = ssh://other\n", true);
        let finding = listed("rpi", uri, &other);
        assert!(finding.what.contains("it lists ssh://other"), "{finding}");
        assert!(
            finding
                .fix
                .as_deref()
                .unwrap()
                .contains("nix.buildMachines"),
            "on NixOS, the option: {finding}"
        );
    }
}
