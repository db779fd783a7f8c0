//! Nix: the binary cache reachd serves from a host's nix-daemon (reached through the tunnelled
//! socket, served to the laptop's Nix as an `http://` substituter on loopback), the nix.conf
//! fragment that points Nix at the caches reachable now, and the checks that gate it. *When* Nix
//! may use a cache is decided in [`reconcile::nix`](crate::reconcile::nix); this is the I/O.

pub mod cache;
pub mod daemon;
pub mod fragment;
pub mod hash;
pub mod health;
pub mod nar;
