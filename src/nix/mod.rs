//! Nix: builds recorded by Nix's post-build hook in a durable spool ([`spool`], [`hook`]) and
//! uploaded to a host's store by the agent while the host is reachable ([`upload`]).

pub mod hook;
pub mod spool;
pub mod upload;
