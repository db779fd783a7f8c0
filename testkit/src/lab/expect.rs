//! What the scenarios assert, in one place: "the Pi's units are up and reachd says reachable",
//! "they are down and reachd says not", the Pi's nix-daemon answering through the tunnel, files
//! through the mount, and that every view of reachd's state (`reachd check`, `reachd status
//! --json`, the D-Bus properties, the units) agrees.

use std::fs;
use std::time::{Duration, Instant};

use crate::lab::{Lab, GREETING, PI_ADDR, T};
use crate::process::wait_until;

pub const TARGET: &str = "rpi-accessible.target";
pub const TUNNEL: &str = "rpi-nix-tunnel.service";
pub const MOUNT: &str = "rpi-mount.service";
pub const REACHD: &str = "reachd.service";

impl Lab {
    fn unit_summary(&self) -> Result<(bool, bool, String), String> {
        let units = self.user().units(&[TARGET, TUNNEL, MOUNT])?;
        let st = |u: &str| {
            units
                .get(u)
                .and_then(|p| p.get("ActiveState").cloned())
                .unwrap_or_default()
        };
        let (t, n, m) = (st(TARGET), st(TUNNEL), st(MOUNT));
        let up = t == "active" && n == "active" && m == "active";
        let settled_down = |s: &str| s == "inactive" || s == "failed";
        let down = t == "inactive" && settled_down(&n) && settled_down(&m);
        // "failed (start-limit-hit)" says more than "failed".
        let show = |u: &str, s: &str| match units.get(u).and_then(|p| p.get("Result")) {
            Some(r) if s == "failed" => format!("{s} ({r})"),
            _ => s.to_string(),
        };
        Ok((
            up,
            down,
            format!(
                "target {t}, tunnel {}, mount {}",
                show(TUNNEL, &n),
                show(MOUNT, &m)
            ),
        ))
    }

    /// Waits until the target, tunnel and mount are active and reachd holds the Pi reachable at
    /// its address; then checks that all views agree. Returns how long it took.
    pub fn expect_up(&mut self, within: Duration, step: &str) -> Result<Duration, String> {
        let start = Instant::now();
        wait_until(
            within,
            "the Pi's units active and reachd saying reachable",
            || {
                let (up, _, units) = self.unit_summary()?;
                if !up {
                    return Err(units);
                }
                let s = self.user().status()?;
                if s.reachable && s.address == PI_ADDR {
                    Ok(Some(()))
                } else {
                    Err(format!("{units}; reachd status: {s:?}"))
                }
            },
        )?;
        let took = start.elapsed();
        self.agree(step);
        Ok(took)
    }

    /// Waits until the target is stopped, its units inactive, the tunnel socket and the mount
    /// gone, and reachd holds the Pi unreachable; then checks agreement.
    pub fn expect_down(&mut self, within: Duration, step: &str) -> Result<Duration, String> {
        let start = Instant::now();
        let sock = self.user().runtime_dir().join("rpi-nix-daemon.sock");
        let mount_point = self.user().home.join("rpi");
        wait_until(
            within,
            "the Pi's units stopped and reachd saying unreachable",
            || {
                let (_, down, units) = self.unit_summary()?;
                if !down {
                    return Err(units);
                }
                let s = self.user().status()?;
                if s.reachable {
                    return Err(format!("{units}; reachd status: {s:?}"));
                }
                if sock.exists() {
                    return Err(format!("{} still exists", sock.display()));
                }
                if is_mounted(&mount_point.to_string_lossy()) {
                    return Err(format!("{} still mounted", mount_point.display()));
                }
                Ok(Some(()))
            },
        )?;
        let took = start.elapsed();
        self.agree(step);
        Ok(took)
    }

    /// Watches for `period` that nothing gets started and reachd keeps saying unreachable.
    pub fn expect_stays_down(&mut self, period: Duration, step: &str) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < period {
            let state = self.user().active_state(TARGET)?;
            if state != "inactive" {
                return Err(format!(
                    "{TARGET} became {state} after {:.1} s",
                    start.elapsed().as_secs_f64()
                ));
            }
            let s = self.user().status()?;
            if s.reachable {
                return Err(format!("reachd says reachable: {s:?}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.agree(step);
        Ok(())
    }

    /// The Pi's nix-daemon answers through the tunnel: the worker protocol's greeting (retrying
    /// while ssh starts). Returns the daemon's protocol version.
    pub fn expect_tunnel(&self) -> Result<String, String> {
        wait_until(
            T,
            "the Pi's nix-daemon greeting through the ssh tunnel",
            || self.tunnel_handshake().map(Some),
        )
    }

    /// The Pi's file shows through the sshfs mount, read as the user.
    pub fn expect_mount(&self) -> Result<(), String> {
        wait_until(T, "the Pi's files in ~/rpi", || {
            self.mount_reads().map(Some)
        })
    }

    /// One read of the Pi's file through the sshfs mount, as the user, within 5 s.
    pub fn mount_reads(&self) -> Result<(), String> {
        let file = self.user().home.join("rpi/greeting.txt");
        let out = self
            .user()
            .cmd("cat")
            .arg(&file)
            .run(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        if out.stdout == GREETING {
            Ok(())
        } else {
            Err(format!("cat: {} {}", out.status, out.stderr.trim()))
        }
    }

    /// Checks that `reachd check rpi`, `reachd status --json`, the D-Bus properties and the
    /// target's ActiveState tell the same story (allowing 3 s for a change in flight). A
    /// disagreement is recorded for scenario 10 rather than failing the caller.
    pub fn agree(&mut self, step: &str) {
        self.agreement_checks += 1;
        let res = wait_until(Duration::from_secs(3), "agreement", || {
            let u = self.user();
            let unit = u.active_state(TARGET)?;
            let status = u.status()?;
            let check = u.check()?;
            let bus = u.dbus_view()?;
            let mut why = Vec::new();
            if status != bus {
                why.push(format!("status --json {status:?} but D-Bus {bus:?}"));
            }
            let expected_check = if status.reachable { 0 } else { 1 };
            if check != expected_check {
                why.push(format!(
                    "check exits {check} but status says reachable={}",
                    status.reachable
                ));
            }
            if status.target_state != unit {
                why.push(format!(
                    "target_state {:?} but {TARGET} is {unit}",
                    status.target_state
                ));
            }
            if status.reachable != (unit == "active") {
                why.push(format!(
                    "reachable={} but {TARGET} is {unit}",
                    status.reachable
                ));
            }
            if why.is_empty() {
                Ok(Some(()))
            } else {
                Err(why.join("; "))
            }
        });
        if let Err(e) = res {
            self.disagreements.push(format!("{step}: {e}"));
        }
    }
}

pub fn is_mounted(path: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path))
}
