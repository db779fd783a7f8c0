//! reachd keeps a systemd user target started exactly while a LAN host is reachable: it follows
//! NetworkManager, finds the host by mDNS, checks that it answers, and starts or stops the
//! target through the user manager, publishing what it holds on the session bus.
//!
//! The shape: I/O at the edges ([`network`], [`probe`], [`units`], [`status`]), a pure core in
//! the middle ([`reconcile`]), and [`agent`] as the loop that joins them. [`nix`] lets Nix use a
//! host's store while it is there, and uploads builds to it.

pub mod address;
pub mod agent;
pub mod client;
pub mod config;
pub mod doctor;
pub mod event;
pub mod logging;
pub mod network;
pub mod nix;
pub mod probe;
pub mod reconcile;
pub mod sleep;
pub mod status;
pub mod units;
