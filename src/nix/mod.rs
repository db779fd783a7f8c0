//! Nix: builds recorded by Nix's post-build hook in a durable spool ([`spool`], [`hook`]), for
//! the agent to upload to a host's store while the host is reachable.

pub mod hook;
pub mod spool;
