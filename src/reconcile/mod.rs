//! The decisions, and nothing else: plain functions on plain data, no I/O, no async, the clock
//! passed in. Every event only says "look again"; these functions compare what is with what
//! should be, so a burst of events costs one decision per host and a lost event is repaired by
//! the next one. The agent feeds them and carries out what they return.
//!
//! [`reach`] decides whether a host is reachable and when to check it; [`target`] what to do
//! about its systemd target; [`cache_gate`] whether Nix may use its cache; [`upload_timing`]
//! when to upload builds to it and how long to wait after a failure; [`notice`] which desktop
//! notifications to send about it.

pub mod cache_gate;
pub mod notice;
pub mod reach;
pub mod target;
pub mod upload_timing;

pub use cache_gate::{nix_eligibility, NixGate, NixPlan, NIX_CHECK_DEADLINE};
pub use notice::{Notice, NoticeKind, ReachNotices, UploadNotices};
pub use reach::{CheckOutcome, HostTracker, NetworkView, Plan, Reach, Transition};
pub use target::{JobKind, TargetAction, TargetView, UnitState};
pub use upload_timing::{BatchOutcome, Run, UploadGate, UploadPlan};
