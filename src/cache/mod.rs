//! The Nix binary cache reachd serves while a host is there: the host's nix-daemon, reached
//! through the tunnelled socket ([`daemon`], [`nar`], [`pool`]; [`hearing`] tells a slow host
//! from a gone one), served to the laptop's Nix as an `http://` substituter on loopback
//! ([`server`]); the check that says whether a cache answers ([`health`]); and the nix.conf
//! fragment that names the caches Nix may use now ([`fragment`]).
//! *Whether* Nix may use a cache is decided in [`reconcile`](crate::reconcile); this is the I/O.
//! The uploads to a host's store are the other Nix wing, [`upload`](crate::upload).

pub mod daemon;
pub mod fragment;
pub mod hash;
pub mod health;
pub mod hearing;
pub mod nar;
pub mod pool;
pub mod server;

#[cfg(test)]
mod fake_daemon;
