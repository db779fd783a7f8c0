//! reachd as the user sees it: the CLI (`reachd status --json`, `reachd check`), the host
//! object's D-Bus properties (the Nix ones apart, for the Nix scenarios), and a monitor of the
//! session bus (the Refresh calls the hook makes, the systemd jobs reachd starts), so the
//! scenarios compare all of them.
//!
//! Facts: `busctl monitor --json=short` prints one JSON object per message and flushes each, so
//! the log can be read while it grows; it also shows method calls to a name nobody owns (the
//! hook's Refresh before reachd runs, with --auto-start=no), which the lab's self-check uses.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::lab::user::TestUser;
use crate::lab::{dir, Lab, T};
use crate::process::Output;

/// What reachd says about one host, from `reachd status --json` or from D-Bus.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub reachable: bool,
    pub state: String,
    pub address: String,
    pub target_state: String,
}

/// What reachd says about the Pi's Nix cache: in use by the user's Nix, and why (not).
#[derive(Debug, Clone, PartialEq)]
pub struct NixView {
    pub in_use: bool,
    pub reason: String,
}

impl TestUser {
    /// `reachd ARGS` as the user (the CLI talks to the agent over the session bus).
    pub fn reachd(&self, args: &[&str]) -> Result<Output, String> {
        self.cmd(&dir().join("bin/reachd").to_string_lossy())
            .args(args)
            .run(Duration::from_secs(10))
            .map_err(|e| e.to_string())
    }

    /// `reachd status --json`, the `rpi` entry (with `reason`, `last_job`...).
    pub fn status_host(&self) -> Result<Value, String> {
        let out = self.reachd(&["status", "--json"])?;
        if !out.success() {
            return Err(format!(
                "reachd status --json: {} {}",
                out.status,
                out.stderr.trim()
            ));
        }
        let v: Value = serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("reachd status --json printed {:?}: {e}", out.stdout))?;
        v["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["name"] == "rpi"))
            .cloned()
            .ok_or_else(|| format!("no host \"rpi\" in reachd status --json: {v}"))
    }

    /// What `reachd status --json` says about the `rpi` host.
    pub fn status(&self) -> Result<HostView, String> {
        let host = self.status_host()?;
        let s = |k: &str| host[k].as_str().unwrap_or_default().to_string();
        Ok(HostView {
            reachable: host["reachable"]
                .as_bool()
                .ok_or_else(|| format!("no boolean \"reachable\" in {host}"))?,
            state: s("state"),
            address: s("address"),
            target_state: s("target_state"),
        })
    }

    /// `reachd check rpi`'s exit code (0 reachable, 1 not, other: can't tell).
    pub fn check(&self) -> Result<i32, String> {
        Ok(self.reachd(&["check", "rpi"])?.code())
    }

    /// Properties of the host object on the session bus, in the order asked.
    pub(crate) fn host_properties(&self, names: &[&str]) -> Result<Vec<Value>, String> {
        let out = self
            .cmd("busctl")
            .args([
                "--user",
                "--json=short",
                "--auto-start=no",
                "get-property",
                "org.reachd.Reachd1",
                "/org/reachd/Reachd1/host/rpi",
                "org.reachd.Reachd1.Host",
            ])
            .args(names)
            .run(T)
            .map_err(|e| e.to_string())?;
        if !out.success() {
            return Err(format!(
                "busctl get-property {}: {}",
                names.join(" "),
                out.stderr.trim()
            ));
        }
        let vals: Vec<Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if vals.len() != names.len() {
            return Err(format!("busctl get-property printed {:?}", out.stdout));
        }
        Ok(vals)
    }

    /// The host object's properties on the session bus.
    pub fn dbus_view(&self) -> Result<HostView, String> {
        let vals = self.host_properties(&["Reachable", "State", "Address", "TargetState"])?;
        let s = |i: usize| vals[i]["data"].as_str().unwrap_or_default().to_string();
        Ok(HostView {
            reachable: vals[0]["data"]
                .as_bool()
                .ok_or("Reachable is not a boolean")?,
            state: s(1),
            address: s(2),
            target_state: s(3),
        })
    }

    /// `nix_in_use` and `nix_reason` of the `rpi` host in `reachd status --json`.
    pub fn nix_status(&self) -> Result<NixView, String> {
        let host = self.status_host()?;
        Ok(NixView {
            in_use: host["nix_in_use"].as_bool().ok_or_else(|| {
                format!("no boolean \"nix_in_use\" in reachd status --json: {host}")
            })?,
            reason: host["nix_reason"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// `NixInUse` and `NixReason` of the host object on the session bus.
    pub fn nix_dbus(&self) -> Result<NixView, String> {
        let vals = self.host_properties(&["NixInUse", "NixReason"])?;
        Ok(NixView {
            in_use: vals[0]["data"]
                .as_bool()
                .ok_or("NixInUse is not a boolean")?,
            reason: vals[1]["data"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// A position in the session bus monitor's log.
    pub fn monitor_mark(&self) -> u64 {
        fs::metadata(Lab::log("session-bus.jsonl"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The session bus messages seen since `mark`.
    pub fn monitor_since(&self, mark: u64) -> Vec<Value> {
        let text = fs::read(Lab::log("session-bus.jsonl")).unwrap_or_default();
        let tail = text.get(mark as usize..).unwrap_or_default();
        String::from_utf8_lossy(tail)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
