//! The laptop's user: an account (`reachd-lab`, uid 1500) with the repo's units installed in its
//! ~/.config/systemd/user, its own `systemd --user` (which runs the session bus through
//! dbus-user-session's dbus.socket) in the laptop namespace, and the commands the scenarios run
//! as that user (root cannot talk to another user's session bus).
//!
//! Facts (checked here): systemd --user refuses to start without /run/systemd/system; an
//! unprivileged one needs a delegated cgroup (user@UID.service in both the name=systemd and the
//! unified hierarchy, owned by the user, the process moved in before exec); it must keep the
//! machine's mount namespace (`ip netns exec` would remount /sys and hide the cgroup mounts), so
//! the lab only enters the network namespace. With no journald, units' output is lost unless a
//! drop-in sends it to a file. ssh finds ~/.ssh through the passwd entry, not $HOME.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::lab::nix::places::{self, laptop_socket, laptop_store_root};
use crate::lab::on_disk::{state, unmount_below};
use crate::lab::{chown_tree, dir, io_err, Lab, HOME_UUID, LAB_CGROUP, PI_ADDR, T};
use crate::process::{kill_cgroup_tree, wait_until, Daemon, Output, Spawn, Tracker};

pub const USER: &str = "reachd-lab";
pub const UID: u32 = 1500;
const RUN_SYSTEMD: &str = "/run/systemd/system";
const UNIT_FILES: &[&str] = &[
    "reachd.service",
    "rpi-accessible.target",
    "rpi-nix-tunnel.service",
    "rpi-mount.service",
];

/// The cgroups systemd --user is delegated, one per hierarchy.
fn user_cgroups() -> [PathBuf; 2] {
    ["systemd", "unified"].map(|h| {
        Path::new("/sys/fs/cgroup")
            .join(h)
            .join(format!("user.slice/user-{UID}.slice/user@{UID}.service"))
    })
}

pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    manager: Option<Daemon>,
    monitor: Option<Daemon>,
}

impl TestUser {
    /// Creates (or reuses) the account, installs the units and starts its systemd --user.
    pub fn create(tracker: &Tracker, reachd: &Path) -> Result<TestUser, String> {
        let home = dir().join("home");
        let gid = ensure_account(&home)?;
        let mut user = TestUser {
            uid: UID,
            gid,
            home,
            manager: None,
            monitor: None,
        };
        user.install_files(reachd)?;
        user.check_reachd_config()?;
        user.start_manager(tracker)?;
        // Like a user would: the [Install] sections hang the tunnel and mount off the target.
        user.systemctl(&["enable", "rpi-nix-tunnel.service", "rpi-mount.service"])?;
        let log = Lab::log("session-bus.jsonl");
        user.monitor = Some(
            user.cmd("busctl")
                .args(["--user", "monitor", "--json=short"])
                .cgroup(LAB_CGROUP)
                .start("busctl-monitor", &log, Some(tracker))
                .map_err(|e| io_err("busctl --user monitor", e))?,
        );
        // busctl prints nothing until the first message: make one, and wait for it.
        wait_until(T, "the session bus monitor", || {
            user.cmd("busctl")
                .args(["--user", "list", "--no-pager"])
                .ok(T)
                .map_err(|e| e.to_string())?;
            Ok((fs::metadata(&log).map(|m| m.len()).unwrap_or(0) > 0).then_some(()))
        })?;
        Ok(user)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        Path::new("/run/user").join(self.uid.to_string())
    }

    fn bus(&self) -> String {
        format!("unix:path={}/bus", self.runtime_dir().display())
    }

    /// A command run as the user, with a login-like environment, in the laptop namespace.
    pub fn cmd(&self, program: &str) -> Spawn {
        self.login_env(Spawn::new(program))
            .current_dir(&self.home)
            .netns(Lab::netns_path("laptop"))
            .user(self.uid, self.gid)
    }

    /// `spawn` with the user's login-like environment and nothing else of the caller's.
    pub(crate) fn login_env(&self, spawn: Spawn) -> Spawn {
        spawn
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", USER)
            .env("LOGNAME", USER)
            .env("SHELL", "/bin/sh")
            .env("LANG", "C.UTF-8")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("DBUS_SESSION_BUS_ADDRESS", self.bus())
    }

    fn install_files(&self, reachd: &Path) -> Result<(), String> {
        let repo = crate::repo();
        let units = self.home.join(".config/systemd/user");
        let w = |path: PathBuf, text: String| -> Result<(), String> {
            fs::create_dir_all(path.parent().expect("has a parent"))
                .map_err(|e| io_err(path.display(), e))?;
            fs::write(&path, text).map_err(|e| io_err(path.display(), e))
        };
        let read = |p: PathBuf| fs::read_to_string(&p).map_err(|e| io_err(p.display(), e));
        for f in UNIT_FILES {
            w(units.join(f), read(repo.join("systemd").join(f))?)?;
        }
        w(
            self.home
                .join(".local/share/dbus-1/services/org.reachd.Reachd1.service"),
            read(repo.join("systemd/org.reachd.Reachd1.service"))?,
        )?;
        // The binary under test, where the user can run it (the build tree may be under /root).
        let bin = dir().join("bin/reachd");
        fs::create_dir_all(dir().join("bin")).map_err(|e| io_err("bin", e))?;
        fs::copy(reachd, &bin).map_err(|e| io_err(format!("copying {}", reachd.display()), e))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err(bin.display(), e))?;
        let log = self.reachd_log_path();
        self.write_reachd_dropin("run --config %h/.config/reachd/config.toml")?;
        let pi = dir().join("pi");
        w(
            units.join("rpi-nix-tunnel.service.d/lab.conf"),
            format!(
                "[Service]\nEnvironment=RPI_NIX_SOCKET={}\n",
                places::pi_socket().display()
            ),
        )?;
        w(
            units.join("rpi-mount.service.d/lab.conf"),
            format!(
                "[Service]\nEnvironment=RPI_REMOTE_DIR={}\n",
                pi.join("files").display()
            ),
        )?;
        w(self.reachd_config_path(), reachd_config())?;
        w(self.home.join(".config/nix/nix.conf"), user_nix_conf(true))?;
        let host_key = read(pi.join("host_key.pub"))?;
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        w(
            self.home.join(".ssh/known_hosts"),
            // "rpi": the example units pin the key under that alias; the address for plain ssh.
            format!("rpi,{PI_ADDR} {}\n", host_key.join(" ")),
        )?;
        w(self.home.join(".ssh/id_lab"), read(pi.join("client_key"))?)?;
        w(
            self.home.join(".ssh/config"),
            "Host 192.0.2.*\n  IdentityFile ~/.ssh/id_lab\n  IdentitiesOnly yes\n  \
             StrictHostKeyChecking yes\n  UserKnownHostsFile ~/.ssh/known_hosts\n"
                .to_string(),
        )?;
        fs::write(&log, "").map_err(|e| io_err(log.display(), e))?;
        chown_tree(&self.home, self.uid, self.gid)?;
        for (p, mode) in [
            (".ssh", 0o700),
            (".ssh/id_lab", 0o600),
            (".ssh/config", 0o600),
        ] {
            let p = self.home.join(p);
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(p.display(), e))?;
        }
        Ok(())
    }

    fn reachd_config_path(&self) -> PathBuf {
        self.home.join(".config/reachd/config.toml")
    }

    /// Replaces reachd's config file with `text`, as the user's own file (for a reload; the
    /// lab's is [`reachd_config`]).
    pub fn write_reachd_config(&self, text: &str) -> Result<(), String> {
        let path = self.reachd_config_path();
        fs::write(&path, text).map_err(|e| io_err(path.display(), e))?;
        chown_tree(&path, self.uid, self.gid)
    }

    /// Fails the lab at once, with reachd's own words, if reachd refuses the lab's config.
    fn check_reachd_config(&self) -> Result<(), String> {
        let check = self
            .cmd(&dir().join("bin/reachd").to_string_lossy())
            .args(["run", "--check-config", "--config"])
            .arg(self.reachd_config_path())
            .run(T)
            .map_err(|e| e.to_string())?;
        if check.success() {
            Ok(())
        } else {
            Err(format!(
                "reachd refuses the lab's config: {}",
                check.stderr.trim()
            ))
        }
    }

    /// The drop-in that runs the lab's binary as `reachd RUN_ARGS` and reloads with its
    /// `reachd reload` (the repo's unit runs ~/.cargo/bin/reachd), its output appended to [`TestUser::reachd_log_path`] (no journald).
    /// Takes effect at the next `daemon-reload`.
    /// `REACHD_LAB_RUST_LOG`, if set, becomes reachd's `RUST_LOG` (e.g. `reachd=debug`).
    pub fn write_reachd_dropin(&self, run_args: &str) -> Result<(), String> {
        let log_filter = std::env::var("REACHD_LAB_RUST_LOG")
            .map(|filter| format!("Environment=RUST_LOG={filter}\n"))
            .unwrap_or_default();
        let path = self
            .home
            .join(".config/systemd/user/reachd.service.d/lab.conf");
        fs::create_dir_all(path.parent().expect("has a parent"))
            .map_err(|e| io_err(path.display(), e))?;
        fs::write(
            &path,
            format!(
                "# The lab's binary instead of ~/.cargo/bin/reachd; output to a file (no journald).\n\
                 [Service]\nExecStart=\nExecStart={bin} {run_args}\nExecReload=\nExecReload={bin} reload\n\
                 StandardOutput=append:{}\nStandardError=inherit\n{log_filter}",
                self.reachd_log_path().display(),
                bin = dir().join("bin/reachd").display(),
            ),
        )
        .map_err(|e| io_err(path.display(), e))
    }

    pub fn reachd_log_path(&self) -> PathBuf {
        self.home.join("reachd.log")
    }

    pub fn reachd_log(&self) -> String {
        fs::read_to_string(self.reachd_log_path()).unwrap_or_default()
    }

    fn start_manager(&mut self, tracker: &Tracker) -> Result<(), String> {
        let runtime = self.runtime_dir();
        let _ = fs::remove_dir_all(&runtime);
        fs::create_dir_all(&runtime).map_err(|e| io_err(runtime.display(), e))?;
        fs::write(state("runtime-dir"), "").map_err(|e| io_err("state", e))?;
        chown_tree(&runtime, self.uid, self.gid)?;
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(runtime.display(), e))?;
        if !Path::new(RUN_SYSTEMD).exists() {
            fs::create_dir_all(RUN_SYSTEMD).map_err(|e| io_err(RUN_SYSTEMD, e))?;
            fs::write(state("run-systemd"), "").map_err(|e| io_err("state", e))?;
        }
        fs::write(state("user-cgroups"), "").map_err(|e| io_err("state", e))?;
        let mut spawn = self.cmd("/usr/lib/systemd/systemd").arg("--user");
        for cg in user_cgroups() {
            fs::create_dir_all(&cg).map_err(|e| io_err(cg.display(), e))?;
            chown_tree(&cg, self.uid, self.gid)?;
            spawn = spawn.cgroup(cg);
        }
        let manager = spawn
            .start("systemd-user", &Lab::log("systemd-user.log"), Some(tracker))
            .map_err(|e| io_err("starting systemd --user", e))?;
        let pid = manager.pid();
        self.manager = Some(manager);
        let out = wait_until(T, "systemd --user to finish starting", || {
            self.manager_up().map(Some)
        })?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        if uid_line.split_whitespace().nth(1) != Some(&self.uid.to_string()) {
            return Err(format!(
                "systemd --user (pid {pid}) is not running as {USER}: {uid_line}"
            ));
        }
        if out == "degraded" {
            let failed = self.systemctl(&["--failed", "--no-legend", "--plain"])?;
            eprintln!(
                "lab: note: systemd --user is degraded: {}",
                failed.stdout.trim()
            );
        }
        Ok(())
    }

    /// The user manager's state once it has started up: `running`, or `degraded` (some unit
    /// failed, as one of the lab's may have). An error while it starts or re-executes.
    pub fn manager_up(&self) -> Result<String, String> {
        let o = self
            .systemctl_raw(&["is-system-running", "--wait"])
            .map_err(|e| e.to_string())?;
        let s = o.stdout.trim().to_string();
        if s == "running" || s == "degraded" {
            Ok(s)
        } else {
            Err(format!("{s} {}", o.stderr.trim()))
        }
    }

    fn systemctl_raw(&self, args: &[&str]) -> std::io::Result<Output> {
        self.cmd("systemctl")
            .arg("--user")
            .arg("--no-pager")
            .args(args)
            .run(T)
    }

    /// `systemctl --user ARGS`, which must succeed.
    pub fn systemctl(&self, args: &[&str]) -> Result<Output, String> {
        let out = self.systemctl_raw(args).map_err(|e| e.to_string())?;
        if out.success() {
            Ok(out)
        } else {
            Err(format!(
                "systemctl --user {} failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            ))
        }
    }

    /// Properties of units, by unit name (`ActiveState`, `SubState`, `MainPID`, `NRestarts`,
    /// `Result`, `ExecMainStatus`).
    pub fn units(
        &self,
        units: &[&str],
    ) -> Result<HashMap<String, HashMap<String, String>>, String> {
        let mut args = vec!["show"];
        for p in [
            "Id",
            "ActiveState",
            "SubState",
            "MainPID",
            "NRestarts",
            "Result",
            "ExecMainStatus",
        ] {
            args.extend(["-p", p]);
        }
        args.extend_from_slice(units);
        let out = self.systemctl(&args)?;
        let mut map = HashMap::new();
        for block in out.stdout.split("\n\n") {
            let props: HashMap<String, String> = block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if let Some(id) = props.get("Id") {
                map.insert(id.clone(), props);
            }
        }
        Ok(map)
    }

    pub fn active_state(&self, unit: &str) -> Result<String, String> {
        self.units(&[unit])?
            .get(unit)
            .and_then(|p| p.get("ActiveState").cloned())
            .ok_or_else(|| format!("no ActiveState for {unit}"))
    }

    /// The user manager's environment block, one `KEY=value` per line.
    pub fn manager_env(&self) -> Result<String, String> {
        Ok(self.systemctl(&["show-environment"])?.stdout)
    }

    /// Stops the user's units (so sshfs unmounts cleanly), the monitor and the manager.
    pub fn shut_down(&mut self) {
        if self.manager.is_some() {
            let _ = self.systemctl_raw(&["stop", "rpi-accessible.target", "reachd.service"]);
        }
        if let Some(mut m) = self.monitor.take() {
            m.stop();
        }
        if let Some(mut m) = self.manager.take() {
            m.stop();
        }
    }
}

/// reachd's config in the lab. Only ever reachable on "home": the café's impostor must not count
/// (scenario 6). No [probe] table: the defaults are under test. `[host.nix]` with the defaults
/// written out, where the Nix scenarios look, and uploads through the tunnel (the default
/// `upload_store`) from the lab's spool.
pub fn reachd_config() -> String {
    format!(
        "[nix]\nspool = \"{spool}\"\n\n\
         [[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n\
         target = \"rpi-accessible.target\"\nport = 22\nconnections = [\"{HOME_UUID}\"]\n\n\
         [host.nix]\ndaemon_socket = \"%t/rpi-nix-daemon.sock\"\nlisten = \"{listen}\"\n\
         upload = true\n",
        spool = places::spool_dir().display(),
        listen = places::CACHE_LISTEN,
    )
}

/// reachd's nix.conf fragment for the lab user.
pub fn fragment_path() -> PathBuf {
    Path::new("/run/user")
        .join(UID.to_string())
        .join("reachd/nix.conf")
}

/// The lab user's ~/.config/nix/nix.conf, with or without reachd's fragment. `store =` stands
/// for the default daemon socket of a real multi-user install; it is in nix.conf rather than
/// NIX_REMOTE in the user manager's environment because that is where a user's Nix settings
/// live: every shell, timer and unit reads the file, while the manager's environment reaches
/// only its units.
pub fn user_nix_conf(include: bool) -> String {
    let mut text = format!(
        "# The lab's laptop nix-daemon (a chroot store on a socket of its own; `root`: where\n\
         # `nix copy` reads the paths it uploads).\n\
         store = unix://{}?root={}\n",
        laptop_socket().display(),
        laptop_store_root().display()
    );
    if include {
        text.push_str(&format!(
            "# reachd's fragment: the Pi's cache while it can serve.\n!include {}\n",
            fragment_path().display()
        ));
    }
    text
}

/// Makes sure `reachd-lab` exists with uid 1500 and `home` as its home; returns its gid.
fn ensure_account(home: &Path) -> Result<u32, String> {
    let getent = |key: &str| -> Result<Option<Vec<String>>, String> {
        let out = Spawn::new("getent")
            .args(["passwd", key])
            .run(T)
            .map_err(|e| e.to_string())?;
        Ok(out
            .success()
            .then(|| out.stdout.trim().split(':').map(String::from).collect()))
    };
    let home_s = home.to_string_lossy().into_owned();
    match getent(USER)? {
        Some(entry) if entry.get(2).map(String::as_str) != Some(&UID.to_string()) => {
            return Err(format!(
                "user {USER} exists with uid {}, the lab needs uid {UID}: remove it (userdel {USER})",
                entry.get(2).cloned().unwrap_or_default()
            ))
        }
        Some(_) => {
            Spawn::new("usermod")
                .args(["--home", &home_s, USER])
                .ok(T)
                .map_err(|e| e.to_string())?;
        }
        None => {
            if let Some(other) = getent(&UID.to_string())? {
                return Err(format!(
                    "uid {UID} belongs to {:?}: the lab needs it for its test user {USER}",
                    other[0]
                ));
            }
            fs::write(state("user-created"), "").map_err(|e| io_err("state", e))?;
            Spawn::new("useradd")
                .args(["--no-create-home", "--home-dir", &home_s, "--uid", &UID.to_string()])
                .args(["--user-group", "--shell", "/bin/sh", USER])
                .ok(T)
                .map_err(|e| e.to_string())?;
        }
    }
    fs::create_dir_all(home).map_err(|e| io_err(home.display(), e))?;
    let entry = getent(USER)?.ok_or_else(|| format!("{USER} missing after useradd"))?;
    entry
        .get(3)
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("no gid for {USER}: {entry:?}"))
}

/// Undoes what [`TestUser`] set up, from the markers alone: kills whatever runs in the user's
/// delegated cgroups, removes its runtime dir, /run/systemd/system and the account if the lab
/// created them.
pub fn recover() {
    let marked = |name: &str| state(name).exists();
    if marked("user-cgroups") {
        for cg in user_cgroups() {
            // …/user.slice/user-UID.slice: the manager's tree and anything below it.
            if let Some(slice) = cg.parent() {
                kill_cgroup_tree(slice);
                if let Some(user_slice) = slice.parent() {
                    let _ = fs::remove_dir(user_slice);
                }
            }
        }
    }
    unmount_below(&dir().join("home"));
    if marked("runtime-dir") {
        let _ = fs::remove_dir_all(Path::new("/run/user").join(UID.to_string()));
    }
    if marked("run-systemd") {
        let _ = fs::remove_dir(RUN_SYSTEMD);
    }
    if marked("user-created") {
        let _ = Spawn::new("userdel").arg(USER).run(T);
    }
}
