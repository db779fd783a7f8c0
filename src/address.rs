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
}
