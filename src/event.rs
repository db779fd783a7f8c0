//! What the agent's loop receives: one [`Event`] enum, fed by one channel, from every source
//! (NetworkManager, mDNS, the user manager, finished checks and jobs, `Refresh()` callers,
//! SIGHUP).
//! Every event only says "look again" about a host or all of them; the decisions are made in
//! [`reconcile`](crate::reconcile). Adding a source means one variant here and one match arm in
//! the agent.

use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::address::HostAddress;
use crate::reconcile::{BatchOutcome, CheckOutcome, JobKind, NetworkView, UnitState};

/// A host as the agent follows it: a number given when it starts following the host (at start
/// or at a reload) and never given again in the same run, so that an event from a task of a host
/// a reload removed is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub usize);

/// Something happened that may change what should be.
#[derive(Debug)]
pub enum Event {
    /// NetworkManager's view, read after a change (or for the first time).
    Network(NetworkView),
    /// mDNS found addresses of the host (an announcement, an answer).
    AddressesFound(HostId, Vec<HostAddress>),
    /// mDNS lost addresses of the host (a goodbye packet, the end of their TTL).
    AddressesRemoved(HostId, Vec<HostAddress>),
    /// The host's target changed state (or was read for the first time).
    UnitState(HostId, UnitState),
    /// A check of the host ended; `epoch` is the tracker's epoch when it started.
    CheckDone {
        host: HostId,
        epoch: u64,
        outcome: CheckOutcome,
        took: Duration,
    },
    /// A job for the host's target ended; `state` is the unit's state read right after.
    JobDone {
        host: HostId,
        kind: JobKind,
        result: Result<(), String>,
        state: Option<UnitState>,
    },
    /// The update of the host's address in the user manager's environment ended.
    AddressSet {
        host: HostId,
        address: HostAddress,
        result: Result<(), String>,
    },
    /// A check of the host's Nix cache ended; `epoch` is the gate's epoch when it started.
    NixChecked {
        host: HostId,
        epoch: u64,
        result: Result<(), String>,
    },
    /// The host's served cache heard nothing from the host's nix-daemon for a while: it answers
    /// "not here" until it hears from it again.
    CacheSilent(HostId),
    /// A run over the host's upload queue ended (a count, or a batch uploaded).
    UploadDone {
        host: HostId,
        epoch: u64,
        outcome: BatchOutcome,
    },
    /// The machine is about to sleep; dropping the lock lets it (once the targets stopped).
    Sleep(SleepLock),
    /// The machine woke up.
    Resume,
    /// Someone asked to look at every host again now (`reachd refresh`, the dispatcher hook).
    Refresh,
    /// Someone asked to read the configuration file again (SIGHUP, `systemctl --user reload`).
    Reload,
}

impl Event {
    /// The host the event is about, if it is about one.
    pub fn host(&self) -> Option<HostId> {
        match self {
            Event::AddressesFound(host, _)
            | Event::AddressesRemoved(host, _)
            | Event::UnitState(host, _)
            | Event::CacheSilent(host)
            | Event::CheckDone { host, .. }
            | Event::JobDone { host, .. }
            | Event::AddressSet { host, .. }
            | Event::NixChecked { host, .. }
            | Event::UploadDone { host, .. } => Some(*host),
            Event::Network(_)
            | Event::Sleep(_)
            | Event::Resume
            | Event::Refresh
            | Event::Reload => None,
        }
    }
}

/// A delay inhibitor that logind gave (none without logind), carried by [`Event::Sleep`]: logind
/// lets the machine sleep once every one is dropped (its file descriptor closed).
#[derive(Debug)]
pub struct SleepLock {
    _inhibitor: Option<OwnedFd>,
}

impl SleepLock {
    pub fn holding(inhibitor: Option<OwnedFd>) -> SleepLock {
        SleepLock {
            _inhibitor: inhibitor,
        }
    }
}

/// Where every source sends its events.
pub type Events = tokio::sync::mpsc::Sender<Event>;
