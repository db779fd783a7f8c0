//! A stand-in for logind on the private system bus: it hands out sleep inhibitors (one end of a
//! socket pair, the other kept here to see when the agent lets go) and says when the machine
//! is about to sleep and when it woke, as `PrepareForSleep`.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection};

const PATH: &str = "/org/freedesktop/login1";

struct Manager {
    held: Arc<Mutex<Vec<UnixStream>>>,
}

#[interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    fn inhibit(
        &self,
        what: String,
        _who: String,
        _why: String,
        mode: String,
    ) -> zbus::fdo::Result<zbus::zvariant::OwnedFd> {
        assert_eq!((what.as_str(), mode.as_str()), ("sleep", "delay"));
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        ours.set_nonblocking(true)
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        self.held.lock().unwrap().push(ours);
        Ok(std::os::fd::OwnedFd::from(theirs).into())
    }

    #[zbus(signal)]
    async fn prepare_for_sleep(emitter: &SignalEmitter<'_>, start: bool) -> zbus::Result<()>;
}

pub struct FakeLogind {
    connection: Connection,
    held: Arc<Mutex<Vec<UnixStream>>>,
}

impl FakeLogind {
    pub async fn start(address: &str) -> zbus::Result<FakeLogind> {
        let held = Arc::new(Mutex::new(Vec::new()));
        let connection = zbus::connection::Builder::address(address)?
            .serve_at(PATH, Manager { held: held.clone() })?
            .name("org.freedesktop.login1")?
            .build()
            .await?;
        Ok(FakeLogind { connection, held })
    }

    /// Says the machine is about to sleep (`true`) or woke (`false`).
    pub async fn prepare_for_sleep(&self, start: bool) -> zbus::Result<()> {
        let emitter = SignalEmitter::new(&self.connection, PATH)?;
        Manager::prepare_for_sleep(&emitter, start).await
    }

    /// Inhibitors the agent still holds (its end of the pair not closed).
    pub fn inhibitors_held(&self) -> usize {
        let mut held = self.held.lock().unwrap();
        held.retain(|ours| {
            let mut byte = [0u8; 1];
            matches!((&*ours).read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
        });
        held.len()
    }
}
