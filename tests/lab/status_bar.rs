//! The README's status bar example (issue 11), run as it is against the lab's agent: the
//! waybar module's `exec` command is read from README.md itself (so the two cannot drift) and
//! run as the lab user, and the JSON lines it prints must follow the Pi through a `con
//! down/up`; stopping the agent ends it, and a bare `reachd status --watch` exits 2 then.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use reachd_testkit::lab::expect::REACHD;
use reachd_testkit::lab::{dir, Lab, HOME_UUID, PI_ADDR, T};
use reachd_testkit::process::{descendants, kill_pid, wait_until, Daemon};

use crate::scenarios::{baseline, secs};

/// The README block holding the waybar module.
const MODULE: &str = "\"custom/rpi\": {";
/// How soon a change must be on the bar: the agent's decision plus one signal.
const ON_THE_BAR: Duration = Duration::from_secs(5);

/// The `exec` of the README's waybar module.
fn readme_command() -> Result<String, String> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .map_err(|e| format!("README.md: {e}"))?;
    let start = readme
        .find(MODULE)
        .ok_or("README.md has no waybar module (\"custom/rpi\")")?;
    let end = readme[start..]
        .find("\n}")
        .ok_or("README.md: the waybar module has no end")?;
    let block = format!("{{{}\n}}}}", &readme[start..start + end]);
    let module: Value = serde_json::from_str(&block)
        .map_err(|e| format!("README.md: the waybar module is not JSON ({e}): {block}"))?;
    module["custom/rpi"]["exec"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("README.md: the waybar module has no exec: {block}"))
}

/// A command run as the lab user with the lab's reachd first on PATH, its output in a log; on
/// drop it and everything it started are stopped by PID.
struct Running {
    daemon: Daemon,
}

impl Running {
    fn start(lab: &Lab, name: &str, command: &str) -> Result<Running, String> {
        let log = lab.user().home.join(format!("{name}.out"));
        let _ = fs::remove_file(&log);
        let path = format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            dir().join("bin").display()
        );
        let daemon = lab
            .user()
            .cmd("sh")
            .env("PATH", path)
            .args(["-c", command])
            .start(name, &log, None)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Running { daemon })
    }

    fn lines(&self) -> Vec<String> {
        let text = fs::read_to_string(self.daemon.log()).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    /// Waits for a line after the first `seen` whose JSON has `class`, returning it and the
    /// count of lines.
    fn expect_class(&self, seen: usize, class: &str) -> Result<(Value, usize), String> {
        wait_until(
            ON_THE_BAR,
            &format!("a bar line with class {class:?}"),
            || {
                let lines = self.lines();
                for line in lines.iter().skip(seen) {
                    let v: Value = serde_json::from_str(line)
                        .map_err(|e| format!("not a JSON line ({e}): {line:?}"))?;
                    if v["class"] == class {
                        return Ok(Some((v, lines.len())));
                    }
                }
                Err(format!("lines so far: {lines:?}"))
            },
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for pid in descendants(self.daemon.pid()) {
            kill_pid(pid);
        }
        self.daemon.stop();
    }
}

/// The README's waybar command against the lab's agent: a line per change, the right class,
/// text and tooltip; it ends when the agent does, and `reachd status --watch` exits 2.
pub fn status_bar(lab: &mut Lab) -> Result<String, String> {
    baseline(lab)?;
    let command = readme_command()?;
    let bar = Running::start(lab, "status-bar", &command)?;
    let watch = Running::start(lab, "status-watch", "exec reachd status --watch")?;
    let (first, seen) = bar.expect_class(0, "reachable")?;
    let expected = serde_json::json!({
        "text": "rpi reachable",
        "class": "reachable",
        "tooltip": format!("answered at {PI_ADDR}"),
    });
    if first != expected {
        return Err(format!("the bar's first line is {first}, not {expected}"));
    }
    let down = Instant::now();
    lab.nmcli_con("down", HOME_UUID)?;
    let (gone, seen) = bar.expect_class(seen, "unreachable")?;
    let down = down.elapsed();
    if gone["text"] != "rpi unreachable" || gone["tooltip"] != "network disconnected" {
        return Err(format!("after `con down` the bar says {gone}"));
    }
    let up = Instant::now();
    lab.nmcli_con("up", HOME_UUID)?;
    let (_, lines) = bar.expect_class(seen, "reachable")?;
    let up = up.elapsed();
    lab.user().systemctl(&["stop", REACHD])?;
    let stopped = Instant::now();
    let ended = (|| {
        let mut bar = bar;
        let mut watch = watch;
        let bar_end = wait_until(T, "the bar's command to end with the agent", || {
            Ok(bar.daemon.exited())
        })?;
        let watch_end = wait_until(T, "reachd status --watch to end with the agent", || {
            Ok(watch.daemon.exited())
        })?;
        if watch_end.code() != Some(2) {
            return Err(format!(
                "reachd status --watch ended with {watch_end}, not exit 2 (agent gone)"
            ));
        }
        Ok((bar_end, stopped.elapsed()))
    })();
    lab.user().systemctl(&["start", REACHD])?;
    let (bar_end, ended_after) = ended?;
    baseline(lab)?;
    Ok(format!(
        "the README's waybar command printed {lines} lines: {first} first; unreachable {} after \
         `con down`, reachable {} after `con up`; it ended ({bar_end}) {} after the agent \
         stopped, and `reachd status --watch` exited 2",
        secs(down),
        secs(up),
        secs(ended_after)
    ))
}
