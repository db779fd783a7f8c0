//! Nix support. For now the binary cache: the Pi's store, reached through its nix-daemon over
//! the tunnelled socket, served to the laptop's Nix as an `http://` substituter on loopback.

pub mod cache;
pub mod daemon;
pub mod hash;
pub mod nar;
pub mod pool;

#[cfg(test)]
mod fake_daemon;
