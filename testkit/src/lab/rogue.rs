//! A rogue device on the home LAN: a namespace of its own (`rl-rogue`, 192.0.2.67) plugged
//! into the lab's bridge, which sends forged mDNS (forge.rs) at a bounded rate to the mDNS group
//! or straight to the laptop's port 5353 (see [`Dest`]), while a scenario or the bench watches
//! reachd. Its packets never leave the lab's namespaces: its only link is a port of the lab's bridge. Dropping it unplugs it (the
//! namespace and its link are deleted; a run that died leaves an `rl-` namespace that the lab's
//! recovery removes).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::forge::Dest;
use crate::lab::{io_err, Lab, PREFIX};
use crate::netns::{self, Netns};

const ADDRESS: &str = "192.0.2.67/24";
/// The laptop's address on the home LAN (NetworkManager's "home" connection).
const LAPTOP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const MDNS_PORT: u16 = 5353;
const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// How often the scenario's watch runs while packets go out.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// What a sending run did.
pub struct Sent {
    pub packets: u64,
    pub failed_sends: u64,
    pub took: Duration,
    /// How many times the watch ran (and found reachd right).
    pub watched: u32,
}

pub struct Rogue {
    ns: Netns,
}

impl Rogue {
    /// Plugs a new device into the home LAN's bridge.
    pub fn plug_in(lab: &Lab) -> Result<Rogue, String> {
        let e = |e| io_err("plugging the rogue device into the home LAN", e);
        let ns = Netns::create(&format!("{PREFIX}rogue")).map_err(e)?;
        let lan = &lab.namespaces[1];
        netns::veth(&ns, "rg0", lan, "lan-r").map_err(e)?;
        lan.ip(&["link", "set", "lan-r", "master", "br0"])
            .map_err(e)?;
        lan.ip(&["link", "set", "lan-r", "up"]).map_err(e)?;
        ns.ip(&["addr", "add", ADDRESS, "dev", "rg0"]).map_err(e)?;
        ns.ip(&["link", "set", "rg0", "up"]).map_err(e)?;
        // The mDNS group is reached through the LAN (the namespace has no default route).
        ns.ip(&["route", "add", "224.0.0.0/4", "dev", "rg0"])
            .map_err(e)?;
        Ok(Rogue { ns })
    }

    /// Sends packet after packet from `next` (given the packet's number: the packet and where it
    /// goes) at `rate` per second for `period`, from port 5353, while `watch` runs every 250 ms
    /// on this thread. Stops at the first error of `watch`, and returns it.
    pub fn send_while(
        &self,
        rate: u32,
        period: Duration,
        next: impl FnMut(u64) -> (Vec<u8>, Dest) + Send,
        mut watch: impl FnMut() -> Result<(), String>,
    ) -> Result<Sent, String> {
        let stop = AtomicBool::new(false);
        thread::scope(|scope| {
            let sender = scope.spawn(|| self.send(rate, period, next, &stop));
            let mut watched = 0;
            let mut outcome = Ok(());
            while !sender.is_finished() {
                if let Err(e) = watch() {
                    outcome = Err(e);
                    break;
                }
                watched += 1;
                thread::sleep(WATCH_EVERY);
            }
            stop.store(true, Ordering::Relaxed);
            let sent = sender
                .join()
                .map_err(|_| "the rogue device's sender panicked".to_string())??;
            outcome.map(|()| Sent { watched, ..sent })
        })
    }

    /// Sends every packet of `packets` once, to the laptop; returns how many sends failed.
    pub fn send_to_laptop(&self, packets: &[Vec<u8>]) -> Result<u64, String> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let socket = self.socket()?;
                    let laptop = SocketAddr::from((LAPTOP, MDNS_PORT));
                    Ok(packets
                        .iter()
                        .filter(|p| socket.send_to(p, laptop).is_err())
                        .count() as u64)
                })
                .join()
                .map_err(|_| "the rogue device's sender panicked".to_string())?
        })
    }

    /// Moves the calling thread into the rogue device and opens its mDNS socket there.
    fn socket(&self) -> Result<UdpSocket, String> {
        let e = |e| io_err("the rogue device's mDNS socket", e);
        self.ns.enter_current_thread().map_err(e)?;
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, MDNS_PORT)).map_err(e)?;
        socket.set_ttl(255).map_err(e)?;
        socket.set_multicast_ttl_v4(255).map_err(e)?;
        Ok(socket)
    }

    fn send(
        &self,
        rate: u32,
        period: Duration,
        mut next: impl FnMut(u64) -> (Vec<u8>, Dest),
        stop: &AtomicBool,
    ) -> Result<Sent, String> {
        let socket = self.socket()?;
        let laptop = SocketAddr::from((LAPTOP, MDNS_PORT));
        let group = SocketAddr::from((MDNS_GROUP, MDNS_PORT));
        let gap = Duration::from_secs(1) / rate;
        let start = Instant::now();
        let (mut packets, mut failed_sends) = (0u64, 0u64);
        while start.elapsed() < period && !stop.load(Ordering::Relaxed) {
            // Paced from the start, so the rate holds on average whatever a send costs.
            let due = start + gap * packets as u32;
            let now = Instant::now();
            if due > now + Duration::from_millis(2) {
                thread::sleep(due - now);
            }
            let (packet, dest) = next(packets);
            let to = match dest {
                Dest::Group => group,
                Dest::Laptop => laptop,
            };
            if socket.send_to(&packet, to).is_err() {
                failed_sends += 1;
            }
            packets += 1;
        }
        if packets > 0 && failed_sends == packets {
            return Err(format!(
                "the rogue device could send none of its {packets} packets"
            ));
        }
        Ok(Sent {
            packets,
            failed_sends,
            took: start.elapsed(),
            watched: 0,
        })
    }
}
