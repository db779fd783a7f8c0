//! Starting and stopping the helper programs of root-only integration tests, by PID.
//!
//! Tests here start real daemons (NetworkManager, avahi, sshd, systemd --user). Each one is
//! started through [`Spawn`] (which can place it in a network namespace, a cgroup and a user
//! before `exec`), kept as a [`Daemon`] that stops it by PID when dropped, and recorded by a
//! [`Tracker`] on disk so that the next run can stop it if this run died halfway. Nothing is ever
//! killed by name. Every short command runs with a deadline ([`Spawn::run`]), so nothing hangs.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, or 128+signal as a shell would show it.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

/// A command with the setup root-only tests need, applied in the child between fork and exec:
/// join cgroups, enter a network namespace, then drop to a user. (`Command::uid` would drop
/// privileges before the pre-exec hooks run, too early for the first two.)
pub struct Spawn {
    cmd: Command,
    display: String,
    netns: Option<PathBuf>,
    cgroups: Vec<PathBuf>,
    user: Option<(u32, u32)>,
}

impl Spawn {
    pub fn new(program: impl AsRef<std::ffi::OsStr>) -> Spawn {
        let display = program.as_ref().to_string_lossy().into_owned();
        Spawn {
            cmd: Command::new(program),
            display,
            netns: None,
            cgroups: Vec::new(),
            user: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Spawn {
        self.display.push(' ');
        self.display.push_str(&arg.as_ref().to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Spawn
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Spawn {
        self.cmd.env(key, value);
        self
    }

    /// Start from an empty environment (then add with [`Spawn::env`]).
    pub fn env_clear(mut self) -> Spawn {
        self.cmd.env_clear();
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Spawn {
        self.cmd.current_dir(dir);
        self
    }

    /// Run inside the network namespace at `path` (e.g. `/run/netns/NAME`), without touching the
    /// mount namespace (unlike `ip netns exec`, which remounts /sys and hides the cgroup mounts).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Spawn {
        self.netns = Some(path.into());
        self
    }

    /// Join the cgroup directory `dir` (writes the child's PID into `dir/cgroup.procs`).
    pub fn cgroup(mut self, dir: impl Into<PathBuf>) -> Spawn {
        self.cgroups.push(dir.into());
        self
    }

    /// Run as this user and group (supplementary groups: only `gid`).
    pub fn user(mut self, uid: u32, gid: u32) -> Spawn {
        self.user = Some((uid, gid));
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn prepare(mut self, stdout: Stdio, stderr: Stdio) -> io::Result<(Command, String)> {
        let netns: Option<OwnedFd> = match &self.netns {
            Some(p) => Some(
                File::open(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?
                    .into(),
            ),
            None => None,
        };
        let procs: Vec<CString> = self
            .cgroups
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        let user = self.user;
        self.cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        // SAFETY: the closure only makes async-signal-safe libc calls on data prepared above.
        unsafe {
            self.cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0\n".as_ptr().cast(), 2) == 2;
                    let err = io::Error::last_os_error();
                    libc::close(fd);
                    if !ok {
                        return Err(err);
                    }
                }
                if let Some(fd) = &netns {
                    if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid)) = user {
                    if libc::setgroups(1, &gid) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok((self.cmd, self.display))
    }

    /// Run to completion, killing it (SIGKILL) if it is still running after `timeout`.
    pub fn run(self, timeout: Duration) -> io::Result<Output> {
        let (mut cmd, display) = self.prepare(Stdio::piped(), Stdio::piped())?;
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{display}: {e}")))?;
        let out = reader(child.stdout.take());
        let err = reader(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("`{display}` still running after {timeout:?}: killed"),
                ));
            }
            thread::sleep(Duration::from_millis(10));
        };
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// Run to completion and require exit code 0; the error carries the command and its stderr.
    pub fn ok(self, timeout: Duration) -> io::Result<Output> {
        let display = self.display.clone();
        let out = self.run(timeout)?;
        if out.success() {
            Ok(out)
        } else {
            Err(io::Error::other(format!(
                "`{display}` failed ({}): {}",
                out.status,
                out.stderr.trim()
            )))
        }
    }

    /// Start a long-running program, its output appended to `log`.
    pub fn start(self, name: &str, log: &Path, tracker: Option<&Tracker>) -> io::Result<Daemon> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", log.display())))?;
        let (mut cmd, display) = self.prepare(file.try_clone()?.into(), file.into())?;
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{display}: {e}")))?;
        let pid = child.id();
        let record = match tracker {
            Some(t) => Some(t.record(pid, name)?),
            None => None,
        };
        Ok(Daemon {
            name: name.to_string(),
            child,
            record,
            log: log.to_path_buf(),
        })
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// A long-running child process; dropping it stops it (SIGTERM, then SIGKILL after 10 s).
pub struct Daemon {
    name: String,
    child: Child,
    record: Option<PathBuf>,
    log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Send `signal` (e.g. `libc::SIGKILL`) and wait up to `timeout` for it to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> io::Result<ExitStatus> {
        if let Some(s) = self.exited() {
            return Ok(s);
        }
        // SAFETY: plain syscall on our own child's PID; it cannot have been reused while the
        // child is not reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} (pid {}) did not exit within {timeout:?}",
                        self.name,
                        self.pid()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it: SIGTERM, SIGKILL after 10 s. Idempotent.
    pub fn stop(&mut self) {
        if self
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
            .is_err()
        {
            let _ = self.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
        }
        if let Some(r) = self.record.take() {
            let _ = fs::remove_file(r);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A directory of pid records (`PID` file names holding the process start time and a name), so
/// that a later run can stop what an earlier, interrupted run started, and nothing else: a record
/// only matches a live process whose start time is the recorded one (PIDs get reused).
pub struct Tracker {
    dir: PathBuf,
}

impl Tracker {
    /// Opens (creates) `dir` and stops every still-running process recorded there.
    pub fn open(dir: &Path) -> io::Result<Tracker> {
        fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let t = Tracker {
            dir: dir.to_path_buf(),
        };
        t.stop_recorded();
        Ok(t)
    }

    fn record(&self, pid: u32, name: &str) -> io::Result<PathBuf> {
        let path = self.dir.join(pid.to_string());
        let start = start_time(pid).unwrap_or_default();
        fs::write(&path, format!("{start} {name}\n"))?;
        Ok(path)
    }

    /// Stops (SIGKILL) every recorded process that still runs, and forgets the records.
    pub fn stop_recorded(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let pid: Option<u32> = e.file_name().to_str().and_then(|s| s.parse().ok());
            let recorded = fs::read_to_string(&path).unwrap_or_default();
            let start = recorded.split_whitespace().next().unwrap_or("");
            if let Some(pid) = pid {
                if start_time(pid).as_deref() == Some(start) {
                    kill_pid(pid);
                }
            }
            let _ = fs::remove_file(path);
        }
    }
}

/// The start time of a process (field 22 of /proc/PID/stat), which with the PID identifies it.
pub fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// SIGKILL one process by PID.
pub fn kill_pid(pid: u32) {
    if pid > 1 {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Every descendant of `pid` (its children, theirs...), found by PID through
/// /proc/PID/task/*/children, never by name.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// A process and all its descendants stopped with SIGSTOP (a machine that hangs without dying),
/// resumed with SIGCONT when dropped, so a failing test cannot leave them frozen.
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    /// Stops `root` first, so that it forks no more, then its descendants, scanning again until a
    /// scan finds none that is not stopped yet (a child may have forked in between).
    pub fn tree(root: u32) -> Frozen {
        let mut frozen = Frozen { pids: Vec::new() };
        let mut next = vec![root];
        while !next.is_empty() {
            for pid in next {
                // SAFETY: plain syscall on a PID found in the tree just now.
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                frozen.pids.push(pid);
            }
            next = descendants(root)
                .into_iter()
                .filter(|p| !frozen.pids.contains(p))
                .collect();
        }
        frozen
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in self.pids.iter().rev() {
            // SAFETY: plain syscall; nothing kills these while they are frozen, so each PID is
            // still the process that was stopped.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }
}

/// Kills (SIGKILL) every process in the cgroup directory `dir` and its sub-cgroups, until they
/// are empty (or 10 s passed), then removes the directories. For what a test's daemons started
/// on their own (e.g. nm-dispatcher, activated by the bus and reparented to PID 1).
pub fn kill_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(dir, &mut dirs);
        let mut any = false;
        for d in &dirs {
            let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                any = true;
                kill_pid(pid);
            }
        }
        if !any || Instant::now() >= deadline {
            // Deepest first.
            for d in dirs.iter().rev() {
                let _ = fs::remove_dir(d);
            }
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Polls `check` every 100 ms until it returns `Ok(Some(v))`, or fails after `timeout` with
/// "timed out after …s waiting for WHAT" plus the last error or state `check` reported.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() >= timeout {
            let last = if last.is_empty() {
                String::new()
            } else {
                format!(" (last: {last})")
            };
            return Err(format!(
                "timed out after {:.0} s waiting for {what}{last}",
                timeout.as_secs_f64()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}
