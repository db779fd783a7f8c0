//! The decisions, and nothing else: plain functions on plain data, no I/O, no async, the clock
//! passed in. Every event only says "look again"; these functions compare what is with what
//! should be, so a burst of events costs one decision per host and a lost event is repaired by
//! the next one. The agent feeds them and carries out what they return.
//!
//! Two halves: [`reach`] decides whether a host is reachable and when to check it; [`target`]
//! decides what to do about its systemd target.

pub mod reach;
pub mod target;

pub use reach::{CheckOutcome, HostTracker, NetworkView, Plan, Reach, Transition};
pub use target::{JobKind, TargetAction, TargetView, UnitState};
