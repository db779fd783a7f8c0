//! Nix: the binary cache reachd serves from a host's nix-daemon (reached through the tunnelled
//! socket, served to the laptop's Nix as an `http://` substituter on loopback), the nix.conf
//! fragment that points Nix at the caches reachable now and the checks that gate it; and the
//! builds Nix's post-build hook records in a durable spool ([`spool`], [`hook`]), uploaded to a
//! host's store while the host is there ([`upload`]). *When* to use a cache or upload is decided
//! in [`reconcile`](crate::reconcile); this is the I/O.

pub mod cache;
pub mod daemon;
pub mod drain;
pub mod fragment;
pub mod hash;
pub mod health;
pub mod hook;
pub mod listing;
pub mod nar;
pub mod pool;
pub mod spool;
pub mod upload;

#[cfg(test)]
mod fake_daemon;
