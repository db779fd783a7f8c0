//! An impostor on the home LAN: a second machine (rl-imp, 192.0.2.66) on the Pi's bridge that
//! answers `rpi.local` with its own address and runs an sshd with another host key, which
//! accepts the test user's key. Only the host key pinned by the example units then tells it
//! from the Pi.
//!
//! Its mDNS side is a few lines here rather than a second avahi: avahi probes before it
//! claims a name and renames itself (`rpi-2`) when the Pi holds it. A hostile device does not
//! do that; this one answers every question for `rpi.local` and announces itself to the
//! laptop, always by unicast, so that the Pi's avahi hears no conflicting claim and keeps its
//! name (a multicast claim would make the Pi rename itself: another attack, not this one).

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::pi::{ssh_keygen, wait_sshd_listening, write_sshd_config};
use crate::lab::{dir, io_err, Lab};
use crate::netns::{self, Netns};
use crate::process::{Daemon, Spawn};

/// The impostor's address on the home LAN.
pub const HOME_IMPOSTOR_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
/// The laptop's address on the home LAN, where the impostor announces itself.
const LAPTOP_HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const MDNS_PORT: u16 = 5353;
/// The name the impostor claims, as DNS labels.
const CLAIMED: &[&str] = &["rpi", "local"];

/// The running impostor; dropping it stops it and unplugs it from the LAN.
pub struct Impostor {
    stop: Arc<AtomicBool>,
    responder: Option<JoinHandle<io::Result<()>>>,
    sshd: Daemon,
    /// Last: deleting the namespace removes its veth and its end on the bridge.
    _netns: Netns,
}

impl Impostor {
    /// What its sshd logged: who connected, and whether anyone got in.
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.sshd.log()).unwrap_or_default()
    }

    /// Stops answering and unplugs (no goodbye, as a device that leaves).
    pub fn stop(mut self) -> Result<(), String> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.sshd.stop();
        match self.responder.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Err(format!("the impostor's mDNS responder failed: {e}")),
            Some(Err(_)) => Err("the impostor's mDNS responder panicked".into()),
            _ => Ok(()),
        }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

impl Lab {
    /// Plugs the impostor into the home bridge and starts its sshd and mDNS responder.
    pub fn start_home_impostor(&self) -> Result<Impostor, String> {
        let e = |e| io_err("plugging the impostor into the home LAN", e);
        let ns = Netns::create(&format!("{}imp", crate::lab::PREFIX)).map_err(e)?;
        let lan = &self.namespaces[1];
        netns::veth(&ns, "imp0", lan, "lan-i").map_err(e)?;
        lan.ip(&["link", "set", "lan-i", "master", "br0"])
            .map_err(e)?;
        lan.ip(&["link", "set", "lan-i", "up"]).map_err(e)?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{HOME_IMPOSTOR_ADDR}/24"),
            "dev",
            "imp0",
        ])
        .map_err(e)?;
        ns.ip(&["link", "set", "imp0", "up"]).map_err(e)?;
        let sshd = self.start_impostor_sshd()?;
        let stop = Arc::new(AtomicBool::new(false));
        let responder = {
            let (stop, path) = (stop.clone(), ns.path());
            std::thread::spawn(move || {
                let ns = fs::File::open(path)?;
                enter_netns(&ns)?;
                respond(&stop)
            })
        };
        Ok(Impostor {
            stop,
            responder: Some(responder),
            sshd,
            _netns: ns,
        })
    }

    /// An sshd like the Pi's (the test user's key is authorised) with a host key of its own.
    fn start_impostor_sshd(&self) -> Result<Daemon, String> {
        let d = dir().join("impostor");
        fs::create_dir_all(&d).map_err(|e| io_err(d.display(), e))?;
        ssh_keygen(&d.join("host_key"))?;
        let conf = write_sshd_config(&d)?;
        let sshd_bin = crate::lab::preflight::which("sshd").ok_or("sshd not found")?;
        let sshd = self.daemon(
            "impostor-sshd",
            Spawn::new(sshd_bin)
                .args(["-D", "-e", "-f"])
                .arg(&conf)
                .netns(Lab::netns_path("imp")),
        )?;
        wait_sshd_listening(sshd.log(), "sshd on the impostor")?;
        Ok(sshd)
    }
}

fn enter_netns(ns: &fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on an fd we own; it moves only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Answers every question for `rpi.local` (A or ANY) with the impostor's address, by unicast to
/// whoever asked, and announces it to the laptop every second until `stop` (not only at first:
/// those might all go out before the laptop's side of the bridge passes them).
fn respond(stop: &AtomicBool) -> io::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, MDNS_PORT))?;
    socket.join_multicast_v4(&MDNS_GROUP, &HOME_IMPOSTOR_ADDR)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let laptop = SocketAddr::V4(SocketAddrV4::new(LAPTOP_HOME, MDNS_PORT));
    let mut next_announcement = Instant::now();
    let mut buffer = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_announcement {
            socket.send_to(&response(0, None), laptop)?;
            next_announcement += Duration::from_secs(1);
        }
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let Some(question) = asks_for_claimed_name(&buffer[..len]) else {
            continue;
        };
        // A question from port 5353 gets an mDNS response (id 0, no question); one from any
        // other port is a "legacy unicast" query and gets its id and question echoed.
        let reply = if from.port() == MDNS_PORT {
            response(0, None)
        } else {
            response(question.id, Some(&buffer[12..question.end]))
        };
        socket.send_to(&reply, from)?;
    }
    Ok(())
}

/// A query's id and where its first question ends, when that question is `rpi.local` A or ANY.
struct Question {
    id: u16,
    end: usize,
}

fn asks_for_claimed_name(packet: &[u8]) -> Option<Question> {
    let field = |at: usize| Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    let is_query = field(2)? & 0x8000 == 0;
    if !is_query || field(4)? == 0 {
        return None;
    }
    // The first question's name, uncompressed (nothing precedes it to point at).
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(packet.get(at..at + len)?);
        at += len;
    }
    let qtype = field(at)?;
    let named = labels.len() == CLAIMED.len()
        && labels
            .iter()
            .zip(CLAIMED)
            .all(|(l, c)| l.eq_ignore_ascii_case(c.as_bytes()));
    (named && (qtype == 1 || qtype == 255)).then_some(Question {
        id: field(0)?,
        end: at + 4,
    })
}

/// A response with one A record, `rpi.local` at the impostor's address (TTL 120, shared: no
/// cache-flush bit), echoing `question` when given.
fn response(id: u16, question: Option<&[u8]>) -> Vec<u8> {
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x84, 0]); // response, authoritative
    packet.extend_from_slice(&[0, u8::from(question.is_some()), 0, 1, 0, 0, 0, 0]);
    if let Some(question) = question {
        packet.extend_from_slice(question);
    }
    for label in CLAIMED {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 120, 0, 4]);
    packet.extend_from_slice(&HOME_IMPOSTOR_ADDR.octets());
    packet
}
