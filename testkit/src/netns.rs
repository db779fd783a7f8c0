//! Network namespaces and mDNS responders for root-only tests, so that no test traffic (mDNS,
//! TCP probes, ssh) ever leaves the machine's loopback or the test's own namespaces.
//!
//! The small API, for a test that needs "a host answering `NAME.local` over mDNS":
//!
//! ```ignore
//! mod common;
//! use common::netns::{MdnsPair, SERVER_ADDR};
//!
//! let mut pair = MdnsPair::start("rm-", "rpi")?;   // namespaces rm-client and rm-server
//! // Resolve from inside the client namespace (a fresh thread that setns()es into it):
//! let addr = pair.client.run_in(|| my_resolver("rpi.local."))?;
//! assert_eq!(addr, SERVER_ADDR);
//! pair.stop_avahi();           // clean shutdown: avahi sends goodbye packets
//! pair.unplug_server()?;       // or: the server "loses power" (link down, no goodbye)
//! drop(pair);                  // stops avahi by PID, deletes both namespaces
//! ```
//!
//! `prefix` names everything the pair creates; `start` first removes leftovers with that prefix
//! (namespaces, and avahi processes recorded by an earlier run that died halfway). Use a prefix of
//! your own (the end-to-end lab uses `rl-`). Requires root, `ip` (iproute2), `unshare`
//! (util-linux) and `avahi-daemon`.
//!
//! Facts that bite (checked on the project's VM kind): avahi needs its own `/run/avahi-daemon`
//! per namespace (a tmpfs in a private mount namespace), `enable-dbus=no` when no system bus
//! runs, and `--no-drop-root --no-chroot`. Taking the server's link *down* sends no goodbye; a
//! SIGTERM to avahi does. A bare veth pair drops the client's carrier together with the server's
//! (the lab puts a bridge in between when that matters).

use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{Daemon, Spawn, Tracker};

/// Client side address of an [`MdnsPair`].
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Server side address of an [`MdnsPair`], the address `NAME.local` resolves to.
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// A network namespace this test created (`ip netns add`), deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` (deleting a leftover of that name first) with `lo` up.
    pub fn create(name: &str) -> io::Result<Netns> {
        delete_netns(name);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `setns`, `nsenter --net=` or [`Spawn::netns`].
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Moves the calling thread into this namespace, for good: use a thread of its own (see
    /// [`Netns::run_in`]). Sockets opened afterwards by this thread belong to the namespace.
    pub fn enter_current_thread(&self) -> io::Result<()> {
        let f = fs::File::open(self.path())?;
        // SAFETY: setns on an fd we own; only affects the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace and returns its result. A tokio runtime
    /// built inside `f` (current-thread flavour) keeps all its sockets in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                self.enter_current_thread()?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    Spawn::new("ip").args(args).ok(CMD_TIMEOUT).map(drop)
}

/// Runs `tc -netns NETNS ARGS...`.
pub fn tc(netns: &str, args: &[&str]) -> io::Result<()> {
    let mut all = vec!["-netns", netns];
    all.extend_from_slice(args);
    Spawn::new("tc").args(all).ok(CMD_TIMEOUT).map(drop)
}

fn delete_netns(name: &str) {
    if Path::new("/run/netns").join(name).exists() {
        let _ = ip(&["netns", "delete", name]);
    }
}

/// Deletes every namespace whose name starts with `prefix` (leftovers of an interrupted run).
pub fn remove_stale(prefix: &str) {
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if name.starts_with(prefix) {
                    delete_netns(name);
                }
            }
        }
    }
}

/// Creates a veth pair: `a_if` in `a`, `b_if` in `b`, both down. It never exists in the
/// machine's own namespace under a name that could clash.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> io::Result<()> {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])
}

/// An avahi-daemon publishing `HOST.local` on one interface of a namespace.
pub struct Avahi {
    daemon: Daemon,
}

/// What an [`Avahi`] needs beyond its host name and interface; the default is the plain daemon
/// (a private /run, no D-Bus).
#[derive(Clone, Copy, Default)]
pub struct AvahiOptions<'a> {
    /// Use the machine's /run, so that its socket is /run/avahi-daemon/socket in the machine's
    /// mount namespace, where nss-mdns (`getent ahosts NAME.local`) looks for it. Only one such
    /// avahi can run on a machine.
    pub machine_run: bool,
    /// Register on the D-Bus bus listening at this socket (as its system bus), so that
    /// `avahi-publish` can add records; without it, `enable-dbus=no`.
    pub bus: Option<&'a Path>,
    /// Record the daemon here, so that a cleanup after a crash stops it by PID.
    pub tracker: Option<&'a Tracker>,
    /// Also publish the host's IPv6 addresses (AAAA) and answer over IPv6, as avahi does by
    /// default on Raspberry Pi OS and most laptops; without it, IPv4 only.
    pub ipv6: bool,
}

impl Avahi {
    /// Starts avahi in `ns`, announcing `host_name` on `iface` only; `dir` holds its config and
    /// log. Returns once the daemon reports startup complete (or fails after 20 s).
    pub fn start(
        ns: &Netns,
        host_name: &str,
        iface: &str,
        dir: &Path,
        tracker: Option<&Tracker>,
    ) -> io::Result<Avahi> {
        let options = AvahiOptions {
            tracker,
            ..AvahiOptions::default()
        };
        Avahi::start_with(ns, host_name, iface, dir, options)
    }

    /// [`Avahi::start`] with [`AvahiOptions`].
    pub fn start_with(
        ns: &Netns,
        host_name: &str,
        iface: &str,
        dir: &Path,
        options: AvahiOptions,
    ) -> io::Result<Avahi> {
        fs::create_dir_all(dir)?;
        let conf = dir.join("avahi-daemon.conf");
        let dbus = if options.bus.is_some() { "yes" } else { "no" };
        let ipv6 = if options.ipv6 { "yes" } else { "no" };
        fs::write(
            &conf,
            format!(
                "[server]\nhost-name={host_name}\ndomain-name=local\nuse-ipv4=yes\nuse-ipv6={ipv6}\n\
                 allow-interfaces={iface}\nenable-dbus={dbus}\nratelimit-interval-usec=1000000\n\
                 ratelimit-burst=1000\n[wide-area]\nenable-wide-area=no\n[publish]\n\
                 publish-hinfo=no\npublish-workstation=no\n[reflector]\n[rlimits]\n"
            ),
        )?;
        let log = dir.join("avahi.log");
        let _ = fs::remove_file(&log);
        // `ip netns exec` gives the daemon a /sys of the namespace; `unshare -m` a private /run
        // for its /run/avahi-daemon (pid file, socket), so several avahis can run and nothing is
        // left in the machine's /run (with enable-dbus=no avahi needs nothing else there). Both
        // exec, so the PID is avahi's. With `machine_run` the files land in the machine's /run
        // (`ip netns exec` only remounts /sys).
        let script = if options.machine_run {
            "mkdir -p /run/avahi-daemon && exec avahi-daemon --no-drop-root --no-chroot -f \"$1\""
        } else {
            "mount -t tmpfs tmpfs /run && mkdir /run/avahi-daemon && \
             exec avahi-daemon --no-drop-root --no-chroot -f \"$1\""
        };
        let unshare: &[&str] = if options.machine_run {
            &[]
        } else {
            &["unshare", "-m"]
        };
        let mut spawn = Spawn::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(unshare)
            .args(["sh", "-c", script, "sh"])
            .arg(&conf);
        if let Some(bus) = options.bus {
            let address = format!("unix:path={}", bus.display());
            spawn = spawn.env("DBUS_SYSTEM_BUS_ADDRESS", address);
        }
        let daemon = spawn.start(&format!("avahi-{}", ns.name()), &log, options.tracker)?;
        let mut avahi = Avahi { daemon };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server startup complete") {
                return Ok(avahi);
            }
            if let Some(status) = avahi.daemon.exited() {
                return Err(io::Error::other(format!(
                    "avahi-daemon in {} exited ({status}): {}",
                    ns.name(),
                    text.trim()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "avahi-daemon in {} not ready after 20 s: {}",
                    ns.name(),
                    text.trim()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Clean shutdown (SIGTERM): avahi sends goodbye packets for its records.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }
}

/// Two namespaces `PREFIXclient` (192.0.2.1, `mc0`) and `PREFIXserver` (192.0.2.2, `ms0`) joined
/// by a veth, with avahi in the server publishing `HOST.local`. Dropping it cleans up.
pub struct MdnsPair {
    // Field order is drop order: avahi first, then the namespaces, then the files.
    avahi: Avahi,
    pub server: Netns,
    pub client: Netns,
    host: String,
    /// Whether the server's avahi publishes and answers over IPv6 too.
    ipv6: bool,
    tracker: Tracker,
    dir: tempfile::TempDir,
    pids: PathBuf,
}

impl Drop for MdnsPair {
    fn drop(&mut self) {
        // Avahi first, so that the pid records are gone; then their (empty) directory.
        self.avahi.stop();
        let _ = fs::remove_dir(&self.pids);
    }
}

impl MdnsPair {
    /// Builds the pair and waits until `HOST.local` answers from the client namespace.
    pub fn start(prefix: &str, host: &str) -> io::Result<MdnsPair> {
        MdnsPair::start_with(prefix, host, false)
    }

    /// [`MdnsPair::start`] with IPv6 link-local on both sides and avahi publishing AAAA too,
    /// as a Raspberry Pi and a laptop have it by default. Returns once both ends' link-local
    /// addresses are usable (duplicate address detection done).
    pub fn start_dual_stack(prefix: &str, host: &str) -> io::Result<MdnsPair> {
        let pair = MdnsPair::start_with(prefix, host, true)?;
        pair.server_link_local()?;
        link_local(&pair.client, "mc0")?;
        Ok(pair)
    }

    fn start_with(prefix: &str, host: &str, ipv6: bool) -> io::Result<MdnsPair> {
        let pids = Path::new("/run").join(format!("{prefix}mdns-pids"));
        let tracker = Tracker::open(&pids)?;
        remove_stale(prefix);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let client = Netns::create(&format!("{prefix}client"))?;
        let server = Netns::create(&format!("{prefix}server"))?;
        if !ipv6 {
            // IPv4 only: otherwise a link-local address appears on each side a second or two
            // after the link, and avahi, which publishes AAAA records over IPv4 by default,
            // announces it while a test waits for something else.
            for ns in [&client, &server] {
                for key in ["all", "default"] {
                    let key = format!("net.ipv6.conf.{key}.disable_ipv6=1");
                    Spawn::new("ip")
                        .args(["netns", "exec", ns.name(), "sysctl", "-q", "-w", &key])
                        .ok(CMD_TIMEOUT)?;
                }
            }
        }
        veth(&client, "mc0", &server, "ms0")?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "mc0"])?;
        server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "ms0"])?;
        client.ip(&["link", "set", "mc0", "up"])?;
        server.ip(&["link", "set", "ms0", "up"])?;
        let options = AvahiOptions {
            tracker: Some(&tracker),
            ipv6,
            ..AvahiOptions::default()
        };
        let avahi = Avahi::start_with(&server, host, "ms0", dir.path(), options)?;
        let name = format!("{host}.local");
        let got = client
            .run_in(|| resolve_once(&name, CLIENT_ADDR, Duration::from_secs(5)))?
            .map_err(|e| io::Error::new(e.kind(), format!("{name} from the client: {e}")))?;
        if got != SERVER_ADDR {
            return Err(io::Error::other(format!("{name} resolved to {got}")));
        }
        Ok(MdnsPair {
            avahi,
            server,
            client,
            host: host.to_string(),
            ipv6,
            tracker,
            dir,
            pids,
        })
    }

    /// Stops the server's avahi cleanly (goodbye packets).
    pub fn stop_avahi(&mut self) {
        self.avahi.stop();
    }

    /// Starts the server's avahi again after [`MdnsPair::stop_avahi`]; it announces
    /// `HOST.local` as it starts.
    pub fn start_avahi(&mut self) -> io::Result<()> {
        let options = AvahiOptions {
            tracker: Some(&self.tracker),
            ipv6: self.ipv6,
            ..AvahiOptions::default()
        };
        self.avahi = Avahi::start_with(&self.server, &self.host, "ms0", self.dir.path(), options)?;
        Ok(())
    }

    /// The server's IPv6 link-local address, once duplicate address detection is done.
    pub fn server_link_local(&self) -> io::Result<Ipv6Addr> {
        link_local(&self.server, "ms0")
    }

    /// Takes the client's link down or up (its carrier, as when a laptop leaves the LAN).
    pub fn client_link(&self, up: bool) -> io::Result<()> {
        self.client
            .ip(&["link", "set", "mc0", if up { "up" } else { "down" }])
    }

    /// The server "loses power": its link goes down, nothing is said on the wire. (With a bare
    /// veth this also drops the client's carrier.)
    pub fn unplug_server(&self) -> io::Result<()> {
        self.server.ip(&["link", "set", "ms0", "down"])
    }
}

/// The IPv6 link-local address of `iface` in `ns`, waiting (up to 20 s) until duplicate address
/// detection is done: before that the kernel neither sends from nor answers on it.
pub fn link_local(ns: &Netns, iface: &str) -> io::Result<Ipv6Addr> {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let out = Spawn::new("ip")
            .args([
                "-n",
                ns.name(),
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                iface,
                "scope",
                "link",
            ])
            .ok(CMD_TIMEOUT)?;
        let ready = out
            .stdout
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| {
                let word = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                word.split('/').next()?.parse::<Ipv6Addr>().ok()
            });
        match ready {
            Some(address) => return Ok(address),
            None if Instant::now() >= deadline => {
                return Err(io::Error::other(format!(
                    "no usable IPv6 link-local address on {iface} in {} after 20 s: {}",
                    ns.name(),
                    out.stdout.trim()
                )))
            }
            None => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Asks once for `name`'s IPv4 address with an mDNS "legacy unicast" query (from an ephemeral
/// port, so the responder answers us directly) sent out of the interface that has `via`. Call it
/// inside a namespace ([`Netns::run_in`]). A check of the lab itself, not a resolver under test.
pub fn resolve_once(name: &str, via: Ipv4Addr, timeout: Duration) -> io::Result<Ipv4Addr> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let ifaddr = libc::in_addr {
        s_addr: u32::from(via).to_be(),
    };
    // SAFETY: setsockopt with a correctly sized in_addr on our socket.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            (&ifaddr as *const libc::in_addr).cast(),
            std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let id: u16 = 0x5eed;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no mDNS answer for {name} within {timeout:?}"),
            ));
        }
        if now >= next_send {
            sock.send_to(&q, ("224.0.0.251", 5353))?;
            next_send = now + Duration::from_millis(500);
        }
        sock.set_read_timeout(Some((deadline - now).min(Duration::from_millis(200))))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some(a) = parse_a_answer(&buf[..n], id) {
                    return Ok(a);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The first A record in the answers of DNS message `m` with id `id`.
fn parse_a_answer(m: &[u8], id: u16) -> Option<Ipv4Addr> {
    let be16 = |i: usize| Some(u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]));
    if be16(0)? != id {
        return None;
    }
    let (qd, an) = (be16(4)?, be16(6)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    for _ in 0..an {
        i = skip_name(m, i)?;
        let (rtype, len) = (be16(i)?, usize::from(be16(i + 8)?));
        let data = m.get(i + 10..i + 10 + len)?;
        if rtype == 1 && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    None
}

fn skip_name(m: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *m.get(i)?;
        match len {
            0 => return Some(i + 1),
            l if l & 0xc0 == 0xc0 => return Some(i + 2),
            l => i += 1 + usize::from(l),
        }
    }
}
