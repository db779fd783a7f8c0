//! The lab as a whole: its constants, the namespaces and links between them, the order in which
//! the pieces (network.rs, pi.rs, user.rs) are started, and the teardown.
//!
//! Topology:
//!     rl-laptop (NetworkManager, systemd --user, reachd, the laptop's nix-daemon)
//!        lh0 192.0.2.2/24 ("home") --veth-- rl-lan: br0 --veth-- rl-pi: pi0 192.0.2.10/24
//!                                        (avahi; sshd and nix-daemon in the Pi's mount namespace)
//!        lc0 192.0.2.130/25 ("cafe") --veth-- rl-cafe: c0 192.0.2.140/25 (another avahi "rpi")
//! Home is dual-stack as a real LAN is: NetworkManager gives lh0 an IPv6 link-local address and
//! the Pi's avahi publishes its own (AAAA) besides 192.0.2.10. Scenario 27 plugs a third machine
//! into br0 for a while (impostor.rs: rl-imp, 192.0.2.66, claiming `rpi.local`).
//! The bridge matters: taking the Pi's switch port (`lan-p` in rl-lan) down is a power loss that
//! leaves the laptop's carrier up.
//!
//! Everything lives under [`DIR`], namespaces are named `rl-*`, every process is recorded by the
//! tracker (DIR/state/pids) and joins the cgroup [`LAB_CGROUP`], so `cleanup::recover` can stop it by
//! PID even after a crash. Facts learnt here are in comments where they bite.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod bench;
pub mod cleanup;
pub mod expect;
pub mod flood;
pub mod forge;
pub mod impostor;
pub mod network;
pub mod nix;
pub mod on_disk;
pub mod pi;
pub mod preflight;
pub mod rogue;
pub mod user;
pub mod views;

use crate::netns::{self, Avahi, Netns};
use crate::process::{Daemon, Spawn, Tracker};

use self::cleanup::{marked, recover};
use self::network::install_hook;
use self::nix::{LaptopNix, NixPaths};
use self::on_disk::state;
use self::user::TestUser;

/// All the lab's files; removed at the end (and at the start, if a run died halfway).
pub const DIR: &str = "/var/tmp/reachd-lab";
/// Prefix of the lab's namespaces.
pub const PREFIX: &str = "rl-";
/// A name=systemd (v1) cgroup holding every daemon the lab starts and their children, including
/// those that escape the process tree (nm-dispatcher is bus-activated and reparented to PID 1).
pub const LAB_CGROUP: &str = "/sys/fs/cgroup/systemd/reachd-lab";
pub const PI_ADDR: &str = "192.0.2.10";
pub const IMPOSTOR_ADDR: &str = "192.0.2.140";
pub const HOME_UUID: &str = "3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a01";
pub const CAFE_UUID: &str = "3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a02";
/// Our dispatcher hook, installed for the run.
pub const HOOK: &str = "/etc/NetworkManager/dispatcher.d/90-reachd";
/// The dispatcher script reachd replaces, as its users have it (installed by the benchmark).
pub const OLD_SCRIPT: &str = "/etc/NetworkManager/dispatcher.d/50-rpi-accessible";
pub const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// What the Pi serves under its exported directory, read back through the sshfs mount.
pub const GREETING: &str = "hello from the lab's pi\n";
pub const T: Duration = Duration::from_secs(20);

pub fn dir() -> &'static Path {
    Path::new(DIR)
}

/// "1.23 s", for reports.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The programs under test, as Cargo built them: the agent and Nix's post-build hook.
#[derive(Debug, Clone, Copy)]
pub struct Binaries<'a> {
    pub reachd: &'a Path,
    pub upload_hook: &'a Path,
}

/// The running lab. Dropping it tears everything down.
pub struct Lab {
    pub tracker: Tracker,
    pub namespaces: Vec<Netns>,
    pub sysbus: Option<Daemon>,
    pub nm: Option<Daemon>,
    pub pi_avahi: Option<Avahi>,
    pub cafe_avahi: Option<Avahi>,
    pub sshd: Option<Daemon>,
    /// The Pi's nix-daemon; its mount namespace is the Pi's (sshd's too).
    pub pi_nix: Option<Daemon>,
    pub laptop_nix: Option<Daemon>,
    /// Which Nix the laptop runs (the machine's at first).
    pub laptop_nix_install: LaptopNix,
    pub nix_paths: Option<NixPaths>,
    pub user: Option<TestUser>,
    /// `reachd status` & co. mismatches seen by any scenario (scenario 10 reports them).
    pub disagreements: Vec<String>,
    pub agreement_checks: usize,
}

impl Lab {
    /// Builds the whole lab, cleaning up leftovers first. On error, dropping the partial lab
    /// cleans up what was built.
    pub fn build(bins: Binaries) -> Result<Lab, String> {
        Lab::build_with(bins, true)
    }

    /// [`Lab::build`], with or without our dispatcher hook (the benchmark measures reachd
    /// without it). reachd itself is not started: D-Bus activation or the unit start it.
    pub fn build_with(bins: Binaries, hook: bool) -> Result<Lab, String> {
        recover();
        fs::create_dir_all(dir().join("state")).map_err(|e| io_err(DIR, e))?;
        fs::create_dir_all(dir().join("logs")).map_err(|e| io_err(DIR, e))?;
        // The test user must reach its home, the binary and the logs below DIR.
        fs::set_permissions(dir(), fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err(DIR, e))?;
        fs::create_dir_all(LAB_CGROUP).map_err(|e| io_err(LAB_CGROUP, e))?;
        let tracker = Tracker::open(&state("pids")).map_err(|e| io_err("pid records", e))?;
        let mut lab = Lab {
            tracker,
            namespaces: Vec::new(),
            sysbus: None,
            nm: None,
            pi_avahi: None,
            cafe_avahi: None,
            sshd: None,
            pi_nix: None,
            laptop_nix: None,
            laptop_nix_install: LaptopNix::machine()?,
            nix_paths: None,
            user: None,
            disagreements: Vec::new(),
            agreement_checks: 0,
        };
        lab.build_network()?;
        lab.start_system_bus()?;
        lab.start_pi()?;
        lab.start_cafe()?;
        lab.write_nm_config()?;
        lab.start_nm()?;
        lab.start_nix(bins.upload_hook)?;
        lab.wait_home_up()?;
        if hook {
            install_hook()?;
        }
        lab.user = Some(TestUser::create(&lab.tracker, bins.reachd)?);
        nix::create_spool(lab.user().gid)?;
        Ok(lab)
    }

    pub fn user(&self) -> &TestUser {
        self.user
            .as_ref()
            .expect("the lab has its test user once built")
    }

    pub fn log(name: &str) -> PathBuf {
        dir().join("logs").join(name)
    }

    /// Starts a lab daemon in the lab cgroup, recorded by the tracker.
    pub fn daemon(&self, name: &str, spawn: Spawn) -> Result<Daemon, String> {
        spawn
            .cgroup(LAB_CGROUP)
            .start(name, &Lab::log(&format!("{name}.log")), Some(&self.tracker))
            .map_err(|e| io_err(format!("starting {name}"), e))
    }

    fn build_network(&mut self) -> Result<(), String> {
        let ns = |n: &str| Netns::create(&format!("{PREFIX}{n}")).map_err(|e| io_err(n, e));
        let (laptop, lan, pi, cafe) = (ns("laptop")?, ns("lan")?, ns("pi")?, ns("cafe")?);
        let e = |e| io_err("building the network", e);
        netns::veth(&laptop, "lh0", &lan, "lan-l").map_err(e)?;
        netns::veth(&pi, "pi0", &lan, "lan-p").map_err(e)?;
        netns::veth(&laptop, "lc0", &cafe, "c0").map_err(e)?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])
            .map_err(e)?;
        for port in ["lan-l", "lan-p"] {
            lan.ip(&["link", "set", port, "master", "br0"]).map_err(e)?;
        }
        for link in ["br0", "lan-l", "lan-p"] {
            lan.ip(&["link", "set", link, "up"]).map_err(e)?;
        }
        pi.ip(&["addr", "add", &format!("{PI_ADDR}/24"), "dev", "pi0"])
            .map_err(e)?;
        pi.ip(&["link", "set", "pi0", "up"]).map_err(e)?;
        cafe.ip(&["addr", "add", &format!("{IMPOSTOR_ADDR}/25"), "dev", "c0"])
            .map_err(e)?;
        cafe.ip(&["link", "set", "c0", "up"]).map_err(e)?;
        // The laptop's links are NetworkManager's; it sets them up itself.
        self.namespaces = vec![laptop, lan, pi, cafe];
        Ok(())
    }

    pub fn netns_path(name: &str) -> PathBuf {
        Path::new("/run/netns").join(format!("{PREFIX}{name}"))
    }

    /// Stops what was started, in order, then removes everything ([`recover`]).
    fn teardown(&mut self) {
        if let Some(mut user) = self.user.take() {
            user.shut_down();
        }
        if marked("hook").is_some() {
            let _ = fs::remove_file(HOOK);
            let _ = fs::remove_file(state("hook"));
        }
        for d in [
            &mut self.nm,
            &mut self.sshd,
            &mut self.pi_nix,
            &mut self.laptop_nix,
            &mut self.sysbus,
        ]
        .into_iter()
        .flatten()
        {
            d.stop();
        }
        for a in [&mut self.pi_avahi, &mut self.cafe_avahi]
            .into_iter()
            .flatten()
        {
            a.stop();
        }
        recover();
        self.namespaces.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Makes `path` (and what it contains) belong to the test user.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    chown(path, Some(uid), Some(gid)).map_err(|e| io_err(path.display(), e))?;
    if path.is_dir() && !path.is_symlink() {
        for e in fs::read_dir(path)
            .map_err(|e| io_err(path.display(), e))?
            .flatten()
        {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}
