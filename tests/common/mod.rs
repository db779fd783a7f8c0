//! Helpers shared by the root-only integration tests (the end-to-end lab, the mDNS test): real
//! daemons in network namespaces, started and stopped by PID.
// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

pub mod netns;
pub mod process;
