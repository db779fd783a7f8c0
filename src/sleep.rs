//! Sleep, as logind tells it on the system bus: `PrepareForSleep(true)` just before the machine
//! sleeps, `PrepareForSleep(false)` when it woke. reachd holds a "delay" inhibitor, so that
//! logind waits (at most its `InhibitDelayMaxSec`, 5 s by default) while reachd stops the
//! targets of reachable hosts: tunnels and mounts end cleanly instead of hanging, and a laptop
//! that wakes on another network never has the old target active. What to do is decided in
//! [`reconcile`](crate::reconcile); this module only turns logind's word into events.

use std::os::fd::OwnedFd;

use futures_util::StreamExt;
use tracing::{debug, info};
use zbus::{proxy, Connection};

use crate::event::{Event, Events, SleepLock};

#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login {
    fn inhibit(
        &self,
        what: &str,
        who: &str,
        why: &str,
        mode: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedFd>;

    #[zbus(signal)]
    fn prepare_for_sleep(&self, start: bool) -> zbus::Result<()>;
}

/// Follows logind on `system` until its signals end (the bus went away: an error), sending
/// [`Event::Sleep`] with the inhibitor to release once ready, and [`Event::Resume`]. Without
/// logind (no inhibitor to take) sleep is still followed, only without the delay.
pub async fn follow(system: &Connection, events: &Events) -> zbus::Result<()> {
    let login = LoginProxy::new(system).await?;
    let mut signals = login.receive_prepare_for_sleep().await?;
    let mut lock = inhibit(&login).await;
    while let Some(signal) = signals.next().await {
        let event = if signal.args()?.start {
            info!("the machine is going to sleep");
            Event::Sleep(SleepLock::holding(lock.take()))
        } else {
            info!("the machine woke up");
            lock = inhibit(&login).await;
            Event::Resume
        };
        if events.send(event).await.is_err() {
            return Ok(()); // The agent is gone.
        }
    }
    Err(zbus::Error::Failure("logind's signals ended".into()))
}

async fn inhibit(login: &LoginProxy<'_>) -> Option<OwnedFd> {
    let why = "Stop the units of reachable hosts before sleeping";
    match login.inhibit("sleep", "reachd", why, "delay").await {
        Ok(fd) => Some(fd.into()),
        Err(err) => {
            debug!("no sleep inhibitor from logind: {err}");
            None
        }
    }
}
