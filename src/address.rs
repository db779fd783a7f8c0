//! A host's address as mDNS reports it: an IP and, for an IPv6 link-local address, the interface
//! it is valid on. Kept apart so that the pure decision code and the I/O modules share one type.

use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

/// An address of a host, ordered so that IPv4 comes first (the one units are given).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddress {
    pub ip: IpAddr,
    /// Interface index and name, for IPv6 link-local addresses only.
    pub scope: Option<(u32, String)>,
}

impl HostAddress {
    pub fn v4(ip: std::net::Ipv4Addr) -> Self {
        HostAddress {
            ip: IpAddr::V4(ip),
            scope: None,
        }
    }

    /// The socket address of `port` on this host, with the scope for link-local IPv6.
    pub fn socket(&self, port: u16) -> SocketAddr {
        match (self.ip, &self.scope) {
            (IpAddr::V6(ip), Some((index, _))) => {
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, *index))
            }
            (ip, _) => SocketAddr::new(ip, port),
        }
    }
}

/// The kinds of address a machine has one of on a link (per interface): two addresses of one
/// kind that answer a host's name belong to two machines (or to one with two interfaces on the
/// LAN), while a dual-stack host answers at one address of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    V4,
    V6LinkLocal,
    V6,
}

impl HostAddress {
    fn kind(&self) -> Kind {
        match self.ip {
            IpAddr::V4(_) => Kind::V4,
            IpAddr::V6(ip) if ip.is_unicast_link_local() => Kind::V6LinkLocal,
            IpAddr::V6(_) => Kind::V6,
        }
    }

    /// Whether `other` is of this address's kind (IPv4, IPv6 link-local, other IPv6).
    pub fn same_kind(&self, other: &HostAddress) -> bool {
        self.kind() == other.kind()
    }
}

/// A check that succeeded: the address taken, and the other candidates that answered the same
/// question during the check (the host's other addresses, or another device claiming its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub address: HostAddress,
    pub also: Vec<HostAddress>,
}

impl From<HostAddress> for Answered {
    /// An answer at `address` alone.
    fn from(address: HostAddress) -> Self {
        Answered {
            address,
            also: Vec::new(),
        }
    }
}

/// `192.0.2.10`, `2001:db8::1` or `fe80::1%eth0`: what units get in `REACHD_<NAME>_ADDRESS`.
impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some((_, name)) => write!(f, "{}%{}", self.ip, name),
            None => write!(f, "{}", self.ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn link_local_v6_carries_its_interface() {
        let addr = HostAddress {
            ip: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
            scope: Some((3, "eth0".into())),
        };
        assert_eq!(addr.to_string(), "fe80::1%eth0");
        assert_eq!(addr.socket(5353).to_string(), "[fe80::1%3]:5353");
        let v4 = HostAddress::v4("192.0.2.10".parse().unwrap());
        assert_eq!(v4.to_string(), "192.0.2.10");
        assert!(v4 < addr, "IPv4 sorts first");
    }

    #[test]
    fn kinds_tell_a_dual_stack_host_from_two_machines() {
        let v4 = |s: &str| HostAddress::v4(s.parse().unwrap());
        let v6 = |s: &str| HostAddress {
            ip: s.parse().unwrap(),
            scope: None,
        };
        assert!(v4("192.0.2.10").same_kind(&v4("192.0.2.66")));
        assert!(!v4("192.0.2.10").same_kind(&v6("fe80::1")));
        assert!(v6("fe80::1").same_kind(&v6("fe80::2")));
        assert!(!v6("fe80::1").same_kind(&v6("2001:db8::1")));
    }
}
