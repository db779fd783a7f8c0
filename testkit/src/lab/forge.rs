//! Forged mDNS packets: what a misbehaving or hostile device on the LAN sends (malformed and
//! forged answers for `rpi.local`; a flood of answers and questions for names nobody asked
//! about). Bytes are built by hand, so that nothing here refuses to build what a parser must
//! survive. Shared by the lab's stress scenarios and the bench's flood.

use std::net::Ipv4Addr;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_PTR: u16 = 12;
const TYPE_TXT: u16 = 16;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
/// The class field's top bit in an answer: "flush the other records of this name and type".
const CACHE_FLUSH: u16 = 0x8000;
/// QR (a response) and AA (authoritative), as responders send.
const RESPONSE_FLAGS: u16 = 0x8400;
/// The TTL the lab's avahi gives its A record.
pub const TTL: u32 = 120;
/// The name whose answers are forged: the lab's Pi.
pub const PI_NAME: &str = "rpi.local";

/// Where a forged packet goes: the mDNS group on the home LAN (everyone hears it), or straight
/// to the laptop's port 5353 (answers about `rpi.local`: on the group they would make the Pi's
/// avahi see a conflict and rename itself, as it should).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Group,
    Laptop,
}

/// A small PRNG (xorshift64*): the noise needs variety, not good randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A random DNS label, `h` and up to 10 hex digits.
    fn label(&mut self) -> String {
        format!("h{:x}", self.next() & 0xff_ffff_ffff)
    }
}

/// `host` as DNS labels (no compression).
fn name(host: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(host.len() + 2);
    for label in host.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// One resource record: `name` already encoded, the class IN (with the cache-flush bit if
/// `flush`).
fn record(name: &[u8], rtype: u16, flush: bool, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let class = CLASS_IN | if flush { CACHE_FLUSH } else { 0 };
    let mut out = name.to_vec();
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// A header: ID 0 (as mDNS sends), `flags`, and the four section counts.
fn header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut out = vec![0, 0];
    out.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out
}

/// A response with these answer records.
fn response(answers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = header(RESPONSE_FLAGS, [0, answers.len() as u16, 0, 0]);
    for a in answers {
        out.extend_from_slice(a);
    }
    out
}

/// An announcement: `host` is at `ip` (unique record, cache-flush set), for `ttl` seconds.
pub fn a_answer(host: &str, ip: Ipv4Addr, ttl: u32) -> Vec<u8> {
    response(&[record(&name(host), TYPE_A, true, ttl, &ip.octets())])
}

/// A question for `host`'s address.
fn question(host: &str) -> Vec<u8> {
    let mut out = header(0, [1, 0, 0, 0]);
    out.extend_from_slice(&name(host));
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// The addresses on the home link, held by nobody, at which the flood announces `rpi.local`.
const FLOOD_PI_ADDRS: std::ops::RangeInclusive<u8> = 100..=249;

/// What a flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// In turn: an answer for a random name at a random address, a random service (PTR, SRV,
    /// TXT), a question for a random name (these three to the group), and an answer for
    /// `rpi.local` at an address of the home link that nobody holds (to the laptop).
    Full,
    /// Only the first kind, answers for random names: what mdns-sd keeps (see docs/security.md, Known
    /// limitations).
    RandomNames,
}

/// Packet `n` of a flood of `mix`.
pub fn flood_packet(rng: &mut Rng, n: u64, mix: Mix) -> (Vec<u8>, Dest) {
    let random_ip = |rng: &mut Rng| Ipv4Addr::from(rng.next() as u32);
    let kind = match mix {
        Mix::Full => n % 4,
        Mix::RandomNames => 0,
    };
    match kind {
        0 => (
            a_answer(&format!("{}.local", rng.label()), random_ip(rng), TTL),
            Dest::Group,
        ),
        1 => {
            let service = format!("_{}._tcp.local", rng.label());
            let instance = format!("{}.{service}", rng.label());
            let target = name(&format!("{}.local", rng.label()));
            let mut srv = vec![0, 0, 0, 0, 0x1f, 0x90]; // priority, weight, port 8080
            srv.extend_from_slice(&target);
            let packet = response(&[
                record(&name(&service), TYPE_PTR, false, TTL, &name(&instance)),
                record(&name(&instance), TYPE_SRV, true, TTL, &srv),
                record(&name(&instance), TYPE_TXT, true, TTL, b"\x07k=value"),
            ]);
            (packet, Dest::Group)
        }
        2 => (question(&format!("{}.local", rng.label())), Dest::Group),
        _ => {
            let span = u64::from(FLOOD_PI_ADDRS.end() - FLOOD_PI_ADDRS.start()) + 1;
            let last = FLOOD_PI_ADDRS.start() + rng.below(span) as u8;
            (
                a_answer(PI_NAME, Ipv4Addr::new(192, 0, 2, last), TTL),
                Dest::Laptop,
            )
        }
    }
}

/// Goodbyes (TTL 0) for every address the flood announced for `rpi.local`.
pub fn flood_goodbyes() -> Vec<Vec<u8>> {
    FLOOD_PI_ADDRS
        .map(|last| a_answer(PI_NAME, Ipv4Addr::new(192, 0, 2, last), 0))
        .collect()
}

/// An answer: the (already encoded, possibly broken) `name` is at 192.0.2.`last`.
fn a_at(name: &[u8], last: u8) -> Vec<u8> {
    response(&[record(name, TYPE_A, true, TTL, &[192, 0, 2, last])])
}

/// On-link addresses the malformed set announces for `rpi.local`, held by nobody: one with an
/// ordinary TTL (the proof that forged answers reach reachd) and one with the largest TTL.
pub const FORGED_ON_LINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 78);
pub const FORGED_HUGE_TTL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// Addresses off the link (or not a host's at all) the malformed set announces for `rpi.local`.
pub const OFF_LINK: [Ipv4Addr; 5] = [
    Ipv4Addr::new(10, 9, 9, 9),
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(0, 0, 0, 0),
    Ipv4Addr::new(255, 255, 255, 255),
    Ipv4Addr::new(224, 0, 0, 251),
];

/// Answers for `rpi.local` that a parser and reachd's decisions must survive: forged
/// addresses (on the link, off it, with the largest TTLs), wrong types and lengths, counts that
/// lie, compression loops, bad labels, every truncation of a valid answer, and noise.
pub fn malformed_answers(rng: &mut Rng) -> Vec<Vec<u8>> {
    let pi = name(PI_NAME);
    let mut out = vec![
        a_answer(PI_NAME, FORGED_ON_LINK, TTL),
        a_answer(PI_NAME, FORGED_HUGE_TTL, u32::MAX),
        a_answer(PI_NAME, FORGED_HUGE_TTL, 0x8000_0000),
    ];
    out.extend(OFF_LINK.iter().map(|ip| a_answer(PI_NAME, *ip, TTL)));
    let wrong_records = [
        record(&pi, TYPE_A, true, TTL, &[192, 0, 2, 79, 0, 0, 0, 0]), // A of 8 bytes
        record(&pi, TYPE_A, true, TTL, &[192, 0]),                    // A of 2 bytes
        record(&pi, TYPE_AAAA, true, TTL, &[192, 0, 2, 80]),          // AAAA of 4 bytes
        record(
            &pi,
            TYPE_AAAA,
            true,
            TTL,
            &std::net::Ipv6Addr::LOCALHOST.octets(),
        ),
        record(&pi, TYPE_TXT, true, u32::MAX, b"\xffnot a length"),
        record(&pi, TYPE_CNAME, true, TTL, &name("elsewhere.local")),
        record(&pi, TYPE_PTR, true, TTL, &[0xc0, 0x0c]), // points at itself
        record(&pi, TYPE_SRV, true, TTL, &[0, 0]),       // SRV cut short
        record(&pi, 0xffff, true, TTL, &[1, 2, 3]),
        record(&pi, TYPE_A, true, TTL, &[]), // rdlength 0
    ];
    out.extend(
        wrong_records
            .iter()
            .map(|r| response(std::slice::from_ref(r))),
    );
    // An rdlength running past the end of the packet.
    let mut long = response(&[record(&pi, TYPE_A, true, TTL, &[192, 0, 2, 81])]);
    let at = long.len() - 6;
    long[at..at + 2].copy_from_slice(&600u16.to_be_bytes());
    out.push(long);
    // Counts that lie: 5 answers announced, 1 present; 65535 of each section.
    let one = record(&pi, TYPE_A, true, TTL, &[192, 0, 2, 82]);
    let mut lying = header(RESPONSE_FLAGS, [0, 5, 0, 0]);
    lying.extend_from_slice(&one);
    out.push(lying);
    let mut lying = header(RESPONSE_FLAGS, [u16::MAX; 4]);
    lying.extend_from_slice(&one);
    out.push(lying);
    // A name that is a compression pointer to itself, and one pointing past the end.
    out.push(a_at(&[0xc0, 0x0c], 83));
    out.push(a_at(&[0xff, 0xff], 83));
    // A label length with the reserved top bits (0x40), and a name of 300 bytes.
    let mut reserved = vec![0x43];
    reserved.extend_from_slice(b"rpi\x05local\x00");
    out.push(a_at(&reserved, 84));
    let long_name: Vec<u8> = (0..5)
        .flat_map(|_| std::iter::once(59u8).chain([b'x'; 59]))
        .chain(pi.iter().copied())
        .collect();
    out.push(a_at(&long_name, 85));
    // Every truncation of a valid answer for an on-link address.
    let valid = a_answer(PI_NAME, Ipv4Addr::new(192, 0, 2, 86), TTL);
    out.extend((0..valid.len()).map(|len| valid[..len].to_vec()));
    // A datagram larger than mDNS allows (9000 bytes), full of answers.
    let big: Vec<Vec<u8>> = (0..400)
        .map(|i| record(&pi, TYPE_A, true, TTL, &[192, 0, 2, 87 + (i % 8) as u8]))
        .collect();
    out.push(response(&big));
    // Noise: random bytes after a plausible response header.
    for _ in 0..32 {
        let mut p = header(RESPONSE_FLAGS, [0, 1 + rng.below(4) as u16, 0, 0]);
        let len = rng.below(200) as usize;
        p.extend((0..len).map(|_| rng.next() as u8));
        out.push(p);
    }
    out
}

/// Goodbyes (TTL 0) for every address the malformed set announced for `rpi.local` that
/// mdns-sd may have kept, so the laptop's cache holds none of them after the scenario.
pub fn goodbyes() -> Vec<Vec<u8>> {
    let mut forged = vec![FORGED_ON_LINK, FORGED_HUGE_TTL];
    forged.extend(OFF_LINK);
    forged.extend((79..=95).map(|last| Ipv4Addr::new(192, 0, 2, last)));
    forged.iter().map(|ip| a_answer(PI_NAME, *ip, 0)).collect()
}
