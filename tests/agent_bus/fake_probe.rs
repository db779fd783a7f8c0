//! A stand-in for mDNS and the network checks, given to the agent through its `Probe` seam
//! (`reachd::agent::run_with`): the test says where the host is, or that it is gone, and the
//! agent finds and checks it without a packet sent. This is what lets the bus tests make a host
//! reachable, and lose it, so that start jobs and their failures can be tested.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use reachd::address::HostAddress;
use reachd::probe::AddressEvent;
use reachd::probe::Probe;
use reachd::reconcile::CheckOutcome;
use tokio::sync::mpsc;

#[derive(Default)]
struct State {
    followers: Vec<(usize, mpsc::Sender<AddressEvent>)>,
    /// Where the host answers, if it does.
    present: Option<HostAddress>,
}

/// The fake: one host, present at one address or absent.
#[derive(Default)]
pub struct FakeProbe {
    state: Mutex<State>,
}

impl FakeProbe {
    /// A host that answers at `address` from the start (and is announced by "mDNS").
    pub fn present(address: HostAddress) -> Arc<FakeProbe> {
        let probe = FakeProbe::default();
        probe.state.lock().unwrap().present = Some(address);
        Arc::new(probe)
    }

    /// The host answers at `address` from now on and "mDNS" announces it (a new DHCP lease).
    pub fn move_to(&self, address: HostAddress) {
        let mut state = self.state.lock().unwrap();
        for (index, events) in &state.followers {
            events
                .try_send(AddressEvent::Found(*index, vec![address.clone()]))
                .expect("the agent's address queue has room");
        }
        state.present = Some(address);
    }

    /// The host stops answering without a goodbye, like a Pi losing power: mDNS still holds
    /// its address, the checks fail.
    pub fn vanish(&self) {
        self.state.lock().unwrap().present = None;
    }
}

impl Probe for FakeProbe {
    fn follow(&self, index: usize, _hostname: String, events: mpsc::Sender<AddressEvent>) {
        let mut state = self.state.lock().unwrap();
        if let Some(address) = &state.present {
            events
                .try_send(AddressEvent::Found(index, vec![address.clone()]))
                .expect("the agent's address queue has room");
        }
        state.followers.push((index, events));
    }

    fn interfaces_changed(&self) {}

    fn check(
        &self,
        hostname: String,
        candidates: Vec<HostAddress>,
        _port: Option<u16>,
        _limit: Duration,
        _via: Option<BTreeSet<IpAddr>>,
    ) -> BoxFuture<'static, CheckOutcome> {
        let present = self.state.lock().unwrap().present.clone();
        Box::pin(async move {
            match present {
                Some(address) if candidates.contains(&address) => Ok(address),
                _ => Err(format!("no mDNS answer for {hostname} (fake)")),
            }
        })
    }

    fn shutdown(&self) {}
}
