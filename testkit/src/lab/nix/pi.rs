//! The Pi's Nix: a nix-daemon on a chroot store in a tmpfs that only the Pi's mount namespace
//! sees (sshd joins that namespace), signing with its own key pi-1 what it builds.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::builds::nonce;
use super::laptop::NixRun;
use super::places::{laptop_etc, pi_nix_dir, pi_socket, pi_store_root};
use super::tools::{daemon_handshake, nix_spawn, write};
use super::upload::laptop_key;
use crate::lab::{dir, io_err, Lab, PREFIX, T};
use crate::process::wait_until;

/// What the Pi's small path holds (the laptop cannot build it: only the Pi has its derivation).
pub const SMALL_TEXT: &str = "small, from the pi\n";
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// What the Pi builds. `big` and `shared` only on demand, new paths for each nonce.
const PI_PATHS_NIX: &str = r#"# The lab Pi's store, built by its nix-daemon (which signs with pi-1).
{ nonce ? "" }:
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
in rec {
  small = mk "p-small" "echo 'small, from the pi' > $out";
  dep = mk "p-dep" "echo 'a dependency, from the pi' > $out";
  ref = mk "p-ref" "echo 'refers to ${dep}' > $out";
  other = mk "p-other" "echo 'another, from the pi' > $out";
  big = mk "p-big-${nonce}" "/usr/bin/head -c 104857600 /dev/urandom > $out";
  # The laptop can build this one too (builds.rs `derivation_expr`, same attributes).
  shared = mk "p-shared-${nonce}" "echo p-shared-${nonce} > $out";
}
"#;

/// A file only builds on the Pi see (the Pi's `extra-sandbox-paths`): a derivation that copies
/// it when it is there tells where it was built (builder.rs).
pub const PI_MARKER: &str = "/reachd-lab-pi";

/// The Pi's public key, `pi-1:…`.
pub(super) fn pi_key() -> Result<String, String> {
    let path = pi_nix_dir().join("pi-1.pub");
    let key = fs::read_to_string(&path).map_err(|e| io_err(path.display(), e))?;
    Ok(key.trim().to_string())
}

impl Lab {
    /// The Pi's nix-daemon PID, whose mount namespace is the Pi's.
    fn pi_nix_pid(&self) -> Result<u32, String> {
        self.pi_nix
            .as_ref()
            .map(|d| d.pid())
            .ok_or_else(|| "the Pi's nix-daemon is not running".to_string())
    }

    /// `/proc/PID/ns/mnt` of the Pi: sshd joins it, and so do the Pi's own nix commands.
    pub fn pi_mount_ns(&self) -> Result<PathBuf, String> {
        Ok(PathBuf::from(format!(
            "/proc/{}/ns/mnt",
            self.pi_nix_pid()?
        )))
    }

    /// Starts the Pi's nix-daemon on a fresh, empty chroot store in a private tmpfs, with a new
    /// key pi-1. (sshd joins its mount namespace; [`Lab::start_nix`] fills the store.)
    pub fn start_pi_nix(&mut self) -> Result<(), String> {
        let nix = pi_nix_dir();
        for d in [nix.join("home"), pi_store_root()] {
            fs::create_dir_all(&d).map_err(|e| io_err(d.display(), e))?;
        }
        let (sec, public) = (nix.join("pi-1.sec"), nix.join("pi-1.pub"));
        nix_spawn("nix-store", &nix, &nix.join("home"))
            .args(["--generate-binary-cache-key", "pi-1"])
            .args([&sec, &public])
            .ok(T)
            .map_err(|e| e.to_string())?;
        let key = pi_key()?;
        let (_, laptop_key) = laptop_key()?;
        write(
            &nix.join("nix.conf"),
            &format!(
                "# The lab Pi's nix-daemon: trusts root (sshd's sessions), signs what it builds,\n\
                 # takes the laptop's uploads signed by laptop-1.\n\
                 trusted-users = root\nsandbox = false\nbuild-users-group =\nsubstituters =\n\
                 trusted-public-keys = {key} {laptop_key}\nsecret-key-files = {}\n\
                 experimental-features = nix-command\nextra-sandbox-paths = /bin /usr /lib /lib64 {PI_MARKER}={}\n",
                sec.display(),
                nix.join("pi-marker").display()
            ),
        )?;
        write(&nix.join("pi-marker"), "pi\n")?;
        write(&nix.join("paths.nix"), PI_PATHS_NIX)?;
        // ip netns exec, unshare and sh all exec: the PID is nix-daemon's, in the Pi's namespaces.
        // unshare's mount namespace is private: the tmpfs never shows in the machine's.
        let root = pi_store_root();
        let home = nix.join("home");
        let daemon = nix_spawn("ip", &nix, &home)
            .args(["netns", "exec", &format!("{PREFIX}pi")])
            .args(["unshare", "-m", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o mode=0755 pi-store \"$1\" && mkdir -p \"$(dirname \"$2\")\" \
                 && exec nix-daemon --option store \"local?root=$1\"",
            )
            .arg("sh")
            .args([root.as_os_str(), pi_socket().as_os_str()])
            .env("NIX_DAEMON_SOCKET_PATH", pi_socket());
        let daemon = self.daemon("pi-nix-daemon", daemon)?;
        let pid = daemon.pid();
        self.pi_nix = Some(daemon);
        let through_proc = PathBuf::from(format!("/proc/{pid}/root")).join(
            pi_socket()
                .strip_prefix("/")
                .expect("the lab's paths are absolute"),
        );
        wait_until(T, "the Pi's nix-daemon", || {
            daemon_handshake(&through_proc).map(Some)
        })
        .map(drop)
    }

    /// Has the Pi's daemon build `attrs` of its expression; their store paths, in that order.
    pub fn pi_nix_build(&self, attrs: &[&str], nonce: &str) -> Result<Vec<String>, String> {
        let nix = pi_nix_dir();
        let mut spawn = nix_spawn("nsenter", &nix, &nix.join("home"))
            .arg(format!("--mount={}", self.pi_mount_ns()?.display()))
            .args(["--", "nix-build", "--no-out-link", "--store"])
            .arg(format!("unix://{}", pi_socket().display()))
            .arg(nix.join("paths.nix"))
            .args(["--argstr", "nonce", nonce]);
        for a in attrs {
            spawn = spawn.args(["-A", a]);
        }
        let out = spawn
            .ok(BUILD_TIMEOUT)
            .map_err(|e| io_err("building the Pi's paths", e))?;
        let paths: Vec<String> = out.stdout.lines().map(str::to_string).collect();
        // nix-build prints each output once, in its own order: match them by name.
        attrs
            .iter()
            .map(|a| {
                paths
                    .iter()
                    .find(|p| p.contains(&format!("-p-{a}")))
                    .cloned()
                    .ok_or_else(|| format!("no {a} among the Pi's paths: {paths:?}"))
            })
            .collect()
    }

    /// Builds a new path of the Pi's attribute `attr` (`big`: 100 MiB of random bytes, for
    /// measuring transfers; `shared`: one the laptop can build too); its store path and its
    /// derivation's name.
    pub fn pi_add_new(&self, attr: &str) -> Result<(String, String), String> {
        let nonce = nonce();
        let path = self
            .pi_nix_build(&[attr], &nonce)?
            .pop()
            .ok_or("the Pi built nothing")?;
        Ok((path, format!("p-{attr}-{nonce}")))
    }
}

impl Lab {
    /// `nix copy --from ssh://root@PI?remote-store=local?root=<the Pi's store>` of `path` into a
    /// fresh chroot store at `to`, as root in the laptop's namespace with the lab's ssh key: the
    /// plain-ssh way to fetch from the Pi (`nix-store --serve` on the Pi, in its mount
    /// namespace, opening its store directly), to compare reachd's cache with.
    pub fn ssh_copy_from_pi(&self, path: &str, to: &std::path::Path) -> Result<NixRun, String> {
        let nix = pi_nix_dir();
        let ssh = dir().join("home/.ssh");
        let remote = format!("local%3Froot%3D{}", pi_store_root().display());
        let spawn = nix_spawn("nix", &laptop_etc(), &nix.join("home"))
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--from",
            ])
            .arg(format!(
                "ssh://root@{}?remote-store={remote}",
                crate::lab::PI_ADDR
            ))
            .arg("--to")
            .arg(format!("local?root={}", to.display()))
            .arg(path)
            .env(
                "NIX_SSHOPTS",
                format!(
                    "-i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={}",
                    ssh.join("id_lab").display(),
                    ssh.join("known_hosts").display()
                ),
            )
            .netns(Lab::netns_path("laptop"));
        NixRun::of(spawn, BUILD_TIMEOUT)
    }
}
