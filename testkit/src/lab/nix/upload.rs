//! The lab's upload path, so that reachd's uploads meet real Nix: the laptop's nix-daemon runs
//! the built `reachd-nix-upload` as its `post-build-hook` (with `REACHD_SPOOL` pointing at the
//! lab's spool) and signs what it builds with the laptop's key laptop-1; the Pi's daemon trusts
//! that key; the spool is made as systemd/tmpfiles.d/reachd.conf makes /var/spool/reachd.
//!
//! Facts (checked here with Debian's Nix 2.8):
//! - The tunnel logs into the Pi as root and the Pi's daemon trusts root (`trusted-users`), yet
//!   `nix copy` asks it to check signatures unless given `--no-check-sigs`, which reachd does not
//!   pass: a path the Pi has no trusted signature for is refused ("lacks a valid signature").
//!   So the Pi's `trusted-public-keys` lists laptop-1, as a real Pi's must.
//! - A `unix://` store reads NARs from the local file system below its `root`, so `nix copy` run
//!   by reachd (as the user) reads the laptop's paths below DIR/laptop-nix/root: the user's
//!   `store =` names that root (on a real laptop the store is /nix/store, the default).
//! - The spool's group is the lab user's primary group, `reachd-lab`, not a group of its own:
//!   the lab's systemd --user (and so reachd.service) runs with its primary group only (the lab
//!   starts it with `setgroups` of that one gid; an unprivileged manager cannot `initgroups`),
//!   so a supplementary group would never reach reachd. Nothing to remove at cleanup: the group
//!   goes with the account.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::places::{hook_path, laptop_etc, pi_nix_dir, pi_socket, spool_dir, SPOOL_VAR};
use super::tools::nix_spawn;

use crate::lab::user::TestUser;
use crate::lab::{dir, io_err, Lab, T};

/// Copies the built hook where the daemon runs it (the build tree may be under /root).
pub(super) fn install_hook(built: &Path) -> Result<(), String> {
    let bin = hook_path();
    fs::create_dir_all(dir().join("bin")).map_err(|e| io_err("bin", e))?;
    fs::copy(built, &bin).map_err(|e| io_err(format!("copying {}", built.display()), e))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err(bin.display(), e))
}

/// The laptop's signing key laptop-1 (made on first use): its secret key file and public key.
pub(super) fn laptop_key() -> Result<(PathBuf, String), String> {
    let etc = laptop_etc();
    let (sec, public) = (etc.join("laptop-1.sec"), etc.join("laptop-1.pub"));
    if !public.exists() {
        let home = etc.with_file_name("home");
        for d in [&etc, &home] {
            fs::create_dir_all(d).map_err(|e| io_err(d.display(), e))?;
        }
        nix_spawn("nix-store", &etc, &home)
            .args(["--generate-binary-cache-key", "laptop-1"])
            .args([&sec, &public])
            .ok(T)
            .map_err(|e| e.to_string())?;
    }
    let key = fs::read_to_string(&public).map_err(|e| io_err(public.display(), e))?;
    Ok((sec, key.trim().to_string()))
}

/// The spool as tmpfiles.d/reachd.conf makes it: root:GROUP 0750, incoming/ and hosts/ 2770.
pub fn create_spool(gid: u32) -> Result<(), String> {
    let top = spool_dir();
    for (path, mode) in [
        (top.clone(), 0o750),
        (top.join("incoming"), 0o2770),
        (top.join("hosts"), 0o2770),
    ] {
        fs::create_dir_all(&path).map_err(|e| io_err(path.display(), e))?;
        chown(&path, Some(0), Some(gid)).map_err(|e| io_err(path.display(), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| io_err(path.display(), e))?;
    }
    Ok(())
}

/// What reachd says about the Pi's uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadView {
    pub pending: u64,
    pub last_upload: String,
    pub error: String,
}

impl TestUser {
    /// `uploads_pending`, `last_upload` and `upload_error` of `reachd status --json`, checked
    /// against the D-Bus properties (`UploadsPending`, `LastUpload`, `UploadError`).
    pub fn upload_status(&self) -> Result<UploadView, String> {
        let host = self.status_host()?;
        let json = UploadView {
            pending: host["uploads_pending"].as_u64().ok_or_else(|| {
                format!("no number \"uploads_pending\" in reachd status --json: {host}")
            })?,
            last_upload: host["last_upload"].as_str().unwrap_or_default().into(),
            error: host["upload_error"].as_str().unwrap_or_default().into(),
        };
        let vals = self.host_properties(&["UploadsPending", "LastUpload", "UploadError"])?;
        let s = |v: &Value| v["data"].as_str().unwrap_or_default().to_string();
        let bus = UploadView {
            pending: vals[0]["data"]
                .as_u64()
                .ok_or("UploadsPending is not a number")?,
            last_upload: s(&vals[1]),
            error: s(&vals[2]),
        };
        // Both read the same state; a change may fall between the two reads.
        if json.pending != bus.pending {
            return Err(format!("status --json {json:?} but D-Bus {bus:?}"));
        }
        Ok(json)
    }

    /// `reachd uploads ARGS` as the user, killed after `timeout`.
    pub fn uploads(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<crate::process::Output, String> {
        self.cmd(&dir().join("bin/reachd").to_string_lossy())
            .arg("uploads")
            .args(args)
            .run(timeout)
            .map_err(|e| e.to_string())
    }
}

impl Lab {
    /// Runs the hook as the laptop's nix-daemon does (root, nothing of the caller's environment
    /// but the spool), for `OUT_PATHS` into `spool`; how long it took.
    /// (A plain blocking `Command`, not [`crate::process::Spawn::run`], whose 10 ms polling would swamp a hook
    /// that takes a few milliseconds; the hook writes nothing but a file and cannot hang.)
    pub fn run_hook(&self, out_paths: &str, spool: &Path) -> Result<Duration, String> {
        let start = Instant::now();
        let out = Command::new(hook_path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env(SPOOL_VAR, spool)
            .env("DRV_PATH", "")
            .env("OUT_PATHS", out_paths)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io_err(hook_path().display(), e))?;
        let took = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !stderr.trim().is_empty() {
            return Err(format!(
                "the hook for {out_paths}: {} {}",
                out.status,
                stderr.trim()
            ));
        }
        Ok(took)
    }

    /// The given paths that the Pi's store does not hold, asked of the Pi's daemon inside the
    /// Pi's mount namespace (so it works whether or not the tunnel is up).
    pub fn pi_missing(&self, paths: &[String]) -> Result<Vec<String>, String> {
        let nix = pi_nix_dir();
        let mut missing = Vec::new();
        // Bounded argument lists: a thousand paths are ~70 kB.
        for chunk in paths.chunks(500) {
            let out = nix_spawn("nsenter", &nix, &nix.join("home"))
                .arg(format!("--mount={}", self.pi_mount_ns()?.display()))
                .args(["--", "nix-store", "--store"])
                .arg(format!("unix://{}", pi_socket().display()))
                .args(["--check-validity", "--print-invalid"])
                .args(chunk)
                .ok(T)
                .map_err(|e| io_err("asking the Pi's store", e))?;
            missing.extend(out.stdout.lines().map(str::to_string));
        }
        Ok(missing)
    }
}
