//! reachd keeps a systemd user target started exactly while a LAN host is reachable: it follows
//! NetworkManager, finds the host by mDNS, checks that it answers, and starts or stops the
//! target through the user manager, publishing what it holds on the session bus.
//!
//! The shape: I/O at the edges ([`network`], [`probe`], [`units`], [`status`]), a pure core in
//! the middle ([`reconcile`]), and [`agent`] as the loop that joins them. The two Nix wings are
//! edges too: [`cache`] lets Nix use a host's store while it is there, [`upload`] uploads builds
//! to it.

pub mod address;
pub mod agent;
pub mod atomic_file;
pub mod cache;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod event;
pub mod logging;
pub mod network;
pub mod probe;
pub mod reconcile;
pub mod sleep;
pub mod status;
pub mod store_path;
pub mod units;
pub mod upload;
