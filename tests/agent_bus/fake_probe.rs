//! A stand-in for mDNS and the network checks, given to the agent through its `Probe` seam
//! (`reachd::agent::run_with`): the test says where the host is, or that it is gone, and the
//! agent finds and checks it without a packet sent. This is what lets the bus tests make a host
//! reachable, and lose it, so that start jobs and their failures can be tested.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use reachd::address::HostAddress;
use reachd::event::{Event, Events, HostId};
use reachd::probe::{CheckRequest, Probe};
use reachd::reconcile::CheckOutcome;

#[derive(Default)]
struct State {
    followers: Vec<(HostId, Events)>,
    /// The hostnames whose following future the agent still holds.
    following: Vec<String>,
    /// Where the host answers, if it does.
    present: Option<HostAddress>,
    /// How often the agent had "mDNS" ask its questions again.
    asked_again: usize,
}

/// The fake: one host, present at one address or absent.
#[derive(Default)]
pub struct FakeProbe {
    state: Arc<Mutex<State>>,
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
        for (host, events) in &state.followers {
            events
                .try_send(Event::AddressesFound(*host, vec![address.clone()]))
                .expect("the agent's event queue has room");
        }
        state.present = Some(address);
    }

    /// The host stops answering without a goodbye, like a Pi losing power: mDNS still holds
    /// its address, the checks fail.
    pub fn vanish(&self) {
        self.state.lock().unwrap().present = None;
    }

    /// How often the agent had "mDNS" look at the interfaces and ask its questions again.
    pub fn asked_again(&self) -> usize {
        self.state.lock().unwrap().asked_again
    }

    /// The hostnames the agent follows now (their futures not dropped).
    pub fn following(&self) -> Vec<String> {
        self.state.lock().unwrap().following.clone()
    }
}

/// Takes its hostname out of [`State::following`] when the agent drops the following future.
struct Following {
    state: Arc<Mutex<State>>,
    hostname: String,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap();
        if let Some(at) = state.following.iter().position(|h| *h == self.hostname) {
            state.following.remove(at);
        }
    }
}

impl Probe for FakeProbe {
    fn follow(&self, host: HostId, hostname: String, events: Events) -> BoxFuture<'static, ()> {
        let mut state = self.state.lock().unwrap();
        if let Some(address) = &state.present {
            events
                .try_send(Event::AddressesFound(host, vec![address.clone()]))
                .expect("the agent's event queue has room");
        }
        state.followers.push((host, events));
        state.following.push(hostname.clone());
        let following = Following {
            state: self.state.clone(),
            hostname,
        };
        Box::pin(async move {
            let _following = following;
            std::future::pending().await
        })
    }

    fn interfaces_changed(&self) {
        self.state.lock().unwrap().asked_again += 1;
    }

    fn check(&self, request: CheckRequest) -> BoxFuture<'static, CheckOutcome> {
        let CheckRequest {
            hostname,
            candidates,
            ..
        } = request;
        let present = self.state.lock().unwrap().present.clone();
        Box::pin(async move {
            match present {
                Some(address) if candidates.contains(&address) => Ok(address.into()),
                _ => Err(format!("no mDNS answer for {hostname} (fake)")),
            }
        })
    }

    fn shutdown(&self) {}
}
