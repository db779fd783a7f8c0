//! Why the ssh units a host's target starts (the example tunnel and mount) keep failing. They
//! run under the user manager with `BatchMode=yes`: a key with a passphrase works only through
//! an ssh agent whose socket is in the *user manager's* environment, which the login shell's
//! `SSH_AUTH_SOCK` does not reach. Without it ssh gets "Permission denied (publickey)", exits
//! 255 and the unit restarts every 2 s, silently; this check says so, and what to do.

use std::path::Path;

use systemd_zbus::{ManagerProxy, ServiceProxy, UnitProxy};

use super::session::{last_value, unit_at, Buses, TargetView};
use super::Finding;
use crate::config::HostConfig;

/// The programs whose units need the user's key.
const SSH_PROGRAMS: &[&str] = &["ssh", "sshfs"];

/// A service bound to the target that runs ssh or sshfs, as the user manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshUnit {
    pub name: String,
    pub active_state: String,
    pub sub_state: String,
    /// The main process's last exit status.
    pub exit_status: i32,
    pub restarts: u32,
    /// `SSH_AUTH_SOCK` is in the unit's environment or the manager's.
    pub has_agent: bool,
}

impl SshUnit {
    fn failing(&self) -> bool {
        self.active_state == "failed" || self.sub_state == "auto-restart"
    }
}

/// What the doctor says about the ssh units of `host`'s target.
pub fn judge(host: &str, target: &str, units: &[SshUnit]) -> Option<Finding> {
    if units.is_empty() {
        return None;
    }
    let failing: Vec<&SshUnit> = units.iter().filter(|u| u.failing()).collect();
    let Some(first) = failing.first() else {
        let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
        return Some(Finding::ok(format!(
            "{host}: the ssh units of {target} are not failing ({})",
            names.join(", ")
        )));
    };
    let names: Vec<&str> = failing.iter().map(|u| u.name.as_str()).collect();
    let verb = if failing.len() == 1 { "keeps" } else { "keep" };
    let what = format!(
        "{host}: {} {verb} failing ({}: exit status {}, restarted {} times)",
        names.join(", "),
        first.name,
        first.exit_status,
        first.restarts
    );
    let journal = format!("`journalctl --user -u {}` says why", first.name);
    let fix = if failing.iter().any(|u| !u.has_agent) {
        format!(
            "{journal}; \"Permission denied (publickey)\" with a key that has a passphrase: \
             the units need an ssh agent, and the user manager has no SSH_AUTH_SOCK (docs/ssh.md, \
             \"The ssh agent\"); `systemctl --user show-environment` shows what units get"
        )
    } else {
        format!(
            "{journal}: a key the agent does not hold (`ssh-add`), a host key not yet pinned, \
             or the host not answering on its port"
        )
    };
    Some(Finding::fail(what, fix))
}

/// Reads the ssh units related to `host`'s target (`target`, as read for its own check) and
/// judges them.
pub async fn check(
    buses: &Buses,
    host: &HostConfig,
    target: &TargetView,
    emit: &mut impl FnMut(Finding),
) {
    let Ok(session) = &buses.session else { return };
    let read = async {
        let manager = ManagerProxy::new(session).await?;
        let manager_agent = has_agent(&manager.environment().await?);
        let mut units = Vec::new();
        for name in target.related.keys().filter(|n| n.ends_with(".service")) {
            let path = manager.load_unit(name).await?;
            let service: ServiceProxy = unit_at(session, path.clone()).await?;
            let runs_ssh = service.exec_start().await?.iter().any(|exec| {
                let program = Path::new(&exec.binary_path).file_name();
                program.is_some_and(|p| SSH_PROGRAMS.iter().any(|s| p == *s))
            });
            if !runs_ssh {
                continue;
            }
            let unit: UnitProxy = unit_at(session, path).await?;
            units.push(SshUnit {
                name: name.clone(),
                active_state: <&str>::from(unit.active_state().await?).to_string(),
                sub_state: unit.sub_state().await?,
                exit_status: service.exec_main_status().await?,
                restarts: service.n_restarts().await?,
                has_agent: manager_agent || has_agent(&service.environment().await?),
            });
        }
        Ok::<_, zbus::Error>(units)
    };
    match read.await {
        Ok(units) => {
            if let Some(finding) = judge(&host.name, &host.target, &units) {
                emit(finding);
            }
        }
        Err(err) => emit(Finding::warn(
            format!(
                "{}: the units of {} cannot be read ({err})",
                host.name, host.target
            ),
            format!("`systemctl --user list-dependencies {}`", host.target),
        )),
    }
}

/// Whether an environment block sets a non-empty `SSH_AUTH_SOCK`.
fn has_agent(environment: &[String]) -> bool {
    last_value(environment, "SSH_AUTH_SOCK").is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    fn unit(name: &str, active: &str, sub: &str, has_agent: bool) -> SshUnit {
        SshUnit {
            name: name.into(),
            active_state: active.into(),
            sub_state: sub.into(),
            exit_status: 255,
            restarts: 12,
            has_agent,
        }
    }

    #[test]
    fn units_that_run_or_wait_are_fine_and_listed() {
        let units = [
            unit("rpi-nix-tunnel.service", "active", "running", false),
            unit("rpi-mount.service", "inactive", "dead", false),
        ];
        let finding = judge("rpi", "rpi-accessible.target", &units).expect("a finding");
        assert_eq!(finding.level, Level::Ok);
        assert!(
            finding.what.contains("rpi-mount.service"),
            "{}",
            finding.what
        );
        assert_eq!(judge("rpi", "rpi-accessible.target", &[]), None);
    }

    #[test]
    fn a_restarting_unit_without_an_agent_is_told_about_the_agent() {
        let units = [
            unit(
                "rpi-nix-tunnel.service",
                "activating",
                "auto-restart",
                false,
            ),
            unit("rpi-mount.service", "failed", "failed", false),
        ];
        let finding = judge("rpi", "rpi-accessible.target", &units).expect("a finding");
        assert_eq!(finding.level, Level::Fail);
        assert!(
            finding
                .what
                .contains("rpi-nix-tunnel.service, rpi-mount.service keep failing")
                && finding.what.contains("exit status 255, restarted 12 times"),
            "{}",
            finding.what
        );
        let fix = finding.fix.expect("a fix");
        assert!(
            fix.contains("no SSH_AUTH_SOCK")
                && fix.contains("journalctl --user -u rpi-nix-tunnel.service"),
            "{fix}"
        );
    }

    #[test]
    fn with_an_agent_the_other_causes_are_named() {
        let units = [unit(
            "rpi-nix-tunnel.service",
            "activating",
            "auto-restart",
            true,
        )];
        let fix = judge("rpi", "t", &units)
            .and_then(|f| f.fix)
            .expect("a fix");
        assert!(
            fix.contains("ssh-add") && !fix.contains("no SSH_AUTH_SOCK"),
            "{fix}"
        );
    }

    #[test]
    fn the_last_ssh_auth_sock_counts_and_an_empty_one_is_none() {
        let env = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(has_agent(&env(&[
            "HOME=/h",
            "SSH_AUTH_SOCK=/run/user/1/gcr/ssh"
        ])));
        assert!(!has_agent(&env(&["SSH_AUTH_SOCK=/x", "SSH_AUTH_SOCK="])));
        assert!(!has_agent(&env(&["HOME=/h"])));
    }
}
