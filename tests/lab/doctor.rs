//! `reachd doctor` in the lab: on the lab's working set-up every line is ok and it exits 0; then
//! each piece is broken on purpose, one at a time (the target's unit file, the dispatcher
//! hook's mode, the `!include`, `trusted-substituters`, the post-build hook's mode, the signing
//! key's mode, the spool's, the tunnel's key), and the failing line must name it and its fix;
//! each is restored before the next, and the lab is left as it was found. A Pi away is only a
//! warning.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use reachd_testkit::lab::expect::TARGET;
use reachd_testkit::lab::nix::{hook_path, laptop_etc, spool_dir, user_nix_conf, CACHE_URL};
use reachd_testkit::lab::{dir, Lab, HOOK, PI_ADDR, T};
use reachd_testkit::process::wait_until;

use crate::scenarios::{baseline, secs};

/// One `reachd doctor` run as the lab user, with the laptop's "/etc/nix" as NIX_CONF_DIR.
struct Doctor {
    code: i32,
    stdout: String,
    took: Duration,
}

impl Doctor {
    fn run(lab: &Lab) -> Result<Doctor, String> {
        let reachd = dir().join("bin/reachd");
        let started = Instant::now();
        let out = lab
            .user()
            .nix(&[&reachd.to_string_lossy(), "doctor"])
            .run(Duration::from_secs(30))
            .map_err(|e| format!("reachd doctor: {e}"))?;
        Ok(Doctor {
            code: out.code(),
            stdout: out.stdout,
            took: started.elapsed(),
        })
    }

    /// The line holding every one of `words`.
    fn line(&self, words: &[&str]) -> Result<&str, String> {
        self.stdout
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .ok_or_else(|| {
                format!(
                    "no line with {words:?} in reachd doctor's report:\n{}",
                    self.stdout
                )
            })
    }

    /// Exit 1 and a FAIL line naming `words` (the broken piece and its fix).
    fn expect_failure(&self, words: &[&str]) -> Result<String, String> {
        if self.code != 1 {
            return Err(format!(
                "reachd doctor exited {}, not 1:\n{}",
                self.code, self.stdout
            ));
        }
        let line = self.line(words)?;
        if !line.starts_with("FAIL ") {
            return Err(format!("not a failure: {line}"));
        }
        Ok(line.to_string())
    }
}

/// Everything in order: exit 0, no line but ok ones, and each check named.
pub fn doctor_ok(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let report = Doctor::run(lab)?;
    let not_ok: Vec<&str> = report
        .stdout
        .lines()
        .filter(|l| !l.starts_with("ok   "))
        .collect();
    if report.code != 0 || !not_ok.is_empty() {
        return Err(format!(
            "reachd doctor exited {} with:\n{}",
            report.code, report.stdout
        ));
    }
    report.line(&["NetworkManager: State 50"])?;
    report.line(&["the systemd user manager"])?;
    report.line(&["reachd is running on the session bus"])?;
    report.line(&[
        "rpi: rpi-accessible.target is loaded; units bound to it:",
        "rpi-mount.service",
        "rpi-nix-tunnel.service (Wants, BoundBy, ConsistsOf)",
    ])?;
    let answer = report.line(&["rpi: rpi.local answers at", PI_ADDR, "TCP port 22 open"])?;
    report.line(&["dispatcher hook", HOOK, "installed"])?;
    report.line(&[
        "includes reachd's fragment",
        "/run/user/1500/reachd/nix.conf",
    ])?;
    report.line(&[CACHE_URL, "is in trusted-substituters"])?;
    report.line(&["post-build hook", "reachd-nix-upload"])?;
    report.line(&["upload spool"])?;
    report.line(&["secret key", "laptop-1.sec", "cannot be checked from here"])?;
    Ok(format!(
        "{} lines, all ok, in {}; {}",
        report.stdout.lines().count(),
        secs(report.took),
        answer.trim_start_matches("ok   ")
    ))
}

/// Each piece broken in turn; the doctor names it and its fix; each is restored.
pub fn doctor_broken(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let named = [
        target_removed(lab)?,
        hook_group_writable(lab)?,
        include_removed(lab)?,
        substituter_untrusted(lab)?,
        post_build_hook_writable(lab)?,
        secret_key_readable(lab)?,
        spool_not_writable(lab)?,
        key_gone(lab)?,
    ];
    let report = Doctor::run(lab)?;
    if report.code != 0 {
        return Err(format!(
            "after restoring everything, reachd doctor exited {}:\n{}",
            report.code, report.stdout
        ));
    }
    baseline(lab)?;
    lab.expect_tunnel()?;
    Ok(format!(
        "named, then exit 0 once restored: {}",
        named.join(" | ")
    ))
}

/// Runs `check` with a file's content replaced by `broken`, restoring it whatever happens.
fn with_file_text(
    path: &Path,
    broken: Option<&str>,
    check: impl FnOnce() -> Result<String, String>,
) -> Result<String, String> {
    let original = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let written = match broken {
        Some(text) => fs::write(path, text),
        None => fs::remove_file(path),
    };
    written.map_err(|e| format!("breaking {}: {e}", path.display()))?;
    let outcome = check();
    fs::write(path, original).map_err(|e| format!("restoring {}: {e}", path.display()))?;
    outcome
}

fn target_removed(lab: &mut Lab) -> Result<String, String> {
    let u = lab.user();
    let file = u.home.join(".config/systemd/user").join(TARGET);
    let outcome = with_file_text(&file, None, || {
        u.systemctl(&["daemon-reload"])?;
        Doctor::run(lab)?.expect_failure(&[
            &format!("rpi: {TARGET} not found"),
            &format!("create ~/.config/systemd/user/{TARGET}"),
            "daemon-reload",
        ])
    });
    chown(&file, Some(u.uid), Some(u.gid)).map_err(|e| format!("{}: {e}", file.display()))?;
    u.systemctl(&["daemon-reload"])?;
    outcome
}

/// Runs `check` with `path`'s mode set to `mode`, restoring the mode whatever happens.
fn with_mode(
    path: &Path,
    mode: u32,
    check: impl FnOnce() -> Result<String, String>,
) -> Result<String, String> {
    let shown = path.display();
    let original = fs::metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .permissions();
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {shown}: {e}"))?;
    let outcome = check();
    fs::set_permissions(path, original).map_err(|e| format!("restoring {shown}: {e}"))?;
    outcome
}

fn hook_group_writable(lab: &Lab) -> Result<String, String> {
    with_mode(Path::new(HOOK), 0o775, || {
        Doctor::run(lab)?.expect_failure(&[
            &format!("dispatcher hook {HOOK} is writable by group or others"),
            &format!("`sudo chmod go-w {HOOK}`"),
        ])
    })
}

/// Nix's post-build hook (the lab daemon's copy of reachd-nix-upload) writable by anyone.
fn post_build_hook_writable(lab: &Lab) -> Result<String, String> {
    let hook = hook_path();
    with_mode(&hook, 0o757, || {
        Doctor::run(lab)?.expect_failure(&[
            &format!(
                "post-build hook {} is writable by group or others",
                hook.display()
            ),
            &format!("`sudo chmod go-w {}`", hook.display()),
        ])
    })
}

/// The laptop's signing key readable by everyone.
fn secret_key_readable(lab: &Lab) -> Result<String, String> {
    let key = laptop_etc().join("laptop-1.sec");
    with_mode(&key, 0o644, || {
        Doctor::run(lab)?.expect_failure(&[
            &format!("secret key {}", key.display()),
            "others can sign paths as this machine",
            &format!("sudo chmod 600 {}", key.display()),
        ])
    })
}

/// The spool's incoming/ no longer writable by the user's group.
fn spool_not_writable(lab: &Lab) -> Result<String, String> {
    let incoming = spool_dir().join("incoming");
    with_mode(&incoming, 0o2750, || {
        Doctor::run(lab)?.expect_failure(&[
            &format!("upload spool {} is not writable by you", incoming.display()),
            "systemd-tmpfiles --create",
        ])
    })
}

/// The tunnel's key gone (as a key with a passphrase is, to ssh in a unit without an agent):
/// the tunnel restarts every 2 s, and doctor names it and the missing agent.
fn key_gone(lab: &Lab) -> Result<String, String> {
    let u = lab.user();
    let key = u.home.join(".ssh/id_lab");
    let aside = u.home.join(".ssh/id_lab.aside");
    fs::rename(&key, &aside).map_err(|e| format!("moving {} aside: {e}", key.display()))?;
    let outcome = (|| {
        u.systemctl(&["restart", "rpi-nix-tunnel.service"])?;
        let mut last = None;
        // The restart fails at once; the unit then waits to restart (auto-restart).
        wait_until(T, "reachd doctor naming the failing tunnel", || {
            let report = Doctor::run(lab)?;
            let named = report.expect_failure(&[
                "rpi-nix-tunnel.service",
                "keeps failing",
                "exit status 255",
                "no SSH_AUTH_SOCK",
            ]);
            last = Some(report.stdout);
            Ok(named.ok())
        })
        .map_err(|e| format!("{e}; last report:\n{}", last.unwrap_or_default()))
    })();
    fs::rename(&aside, &key).map_err(|e| format!("restoring {}: {e}", key.display()))?;
    let outcome = outcome?;
    // Its next restart, 2 s on, finds the key again.
    lab.expect_tunnel()?;
    Ok(outcome)
}

fn include_removed(lab: &Lab) -> Result<String, String> {
    let file = lab.user().home.join(".config/nix/nix.conf");
    with_file_text(&file, Some(&user_nix_conf(false)), || {
        Doctor::run(lab)?.expect_failure(&[
            "no nix.conf of yours includes reachd's fragment",
            "add the line `!include /run/user/1500/reachd/nix.conf`",
        ])
    })
}

/// Only the file: the laptop's nix-daemon read it when it started and keeps trusting the cache.
fn substituter_untrusted(lab: &Lab) -> Result<String, String> {
    let file = laptop_etc().join("nix.conf");
    let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("trusted-substituters"))
        .map(|l| format!("{l}\n"))
        .collect();
    if without == text {
        return Err(format!(
            "no trusted-substituters line in {}",
            file.display()
        ));
    }
    with_file_text(&file, Some(&without), || {
        Doctor::run(lab)?.expect_failure(&[
            &format!("rpi: {CACHE_URL} is not in trusted-substituters"),
            &format!("`trusted-substituters = {CACHE_URL}`"),
        ])
    })
}

/// The Pi loses power: the host's line is a warning, and the doctor still exits 0 (being away
/// from a host is no misconfiguration); the Pi comes back.
pub fn doctor_host_away(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    lab.pi_port(false)?;
    let report = Doctor::run(lab);
    lab.pi_port(true)?;
    let report = report?;
    let line = report
        .line(&["rpi: rpi.local does not answer now"])?
        .to_string();
    if report.code != 0 || !line.starts_with("warn ") {
        return Err(format!(
            "exit {} with the Pi off:\n{}",
            report.code, report.stdout
        ));
    }
    lab.expect_up(T, "pi back after the doctor")?;
    Ok(format!("exit 0 in {}: {line}", secs(report.took)))
}
