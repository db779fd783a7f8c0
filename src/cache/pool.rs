//! A few idle connections to the daemon, kept for the next request. The daemon forks and opens
//! its store for every connection: on loopback with Nix 2.8, 8–12 ms, while the two queries of
//! a `.narinfo` take ~0.2 ms on an open connection (a `.narinfo` went from ~8.3 ms to ~1 ms);
//! through the tunnel it also costs two round trips; Nix asks for many `.narinfo` at once.
//! Every request starts with the same lookup (hash part to path info): the pool runs that.
//!
//! A connection goes back to the pool only after a complete exchange, and is dropped after
//! [`MAX_IDLE_TIME`] unused (each one is a process on the Pi). When a pooled connection turns
//! out to be closed (the tunnel or the daemon restarted), every idle one is from before that
//! too: the pool is emptied and the query runs once more on a new connection. Every connection
//! reports what it receives to the cache's [`Hearing`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use super::daemon::{Daemon, DaemonError, PathInfo};
use super::hearing::{Heard, Hearing};

/// A connection of the pool: to the daemon's socket, heard.
pub type Upstream = Daemon<Heard<UnixStream>>;

/// A new connection to the daemon at `socket`, heard by `hearing`, its handshake done within
/// `deadline`: the daemon's greeting alone ends a doubt about it.
pub async fn connect_heard(
    socket: &Path,
    deadline: Duration,
    hearing: Arc<Hearing>,
) -> Result<Upstream, DaemonError> {
    Daemon::connect_through(socket, deadline, |s| Heard::new(s, hearing)).await
}

/// The most idle connections kept.
pub const MAX_IDLE: usize = 8;
/// How long an idle connection is kept.
pub const MAX_IDLE_TIME: Duration = Duration::from_secs(30);

/// Connections to the daemon at one socket.
#[derive(Debug)]
pub struct Pool {
    socket: PathBuf,
    hearing: Arc<Hearing>,
    idle: Mutex<Vec<(Instant, Upstream)>>,
}

impl Pool {
    pub fn new(socket: PathBuf, hearing: Arc<Hearing>) -> Self {
        Pool {
            socket,
            hearing,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// What the pool's connections have heard.
    pub fn hearing(&self) -> &Arc<Hearing> {
        &self.hearing
    }

    /// A new connection to the daemon, its handshake done within `deadline`.
    pub async fn connect(&self, deadline: Duration) -> Result<Upstream, DaemonError> {
        connect_heard(&self.socket, deadline, self.hearing.clone()).await
    }

    /// The path info of the store path whose hash part is `hash` (`None` if the daemon has no
    /// such path), asked on an idle connection or a new one, each step within `deadline`. The
    /// connection comes back with the answer: to [`put_back`](Self::put_back), or to use for
    /// more. Asked once more on a new connection if a pooled one turns out to be closed.
    pub async fn path_info(
        &self,
        hash: &str,
        deadline: Duration,
    ) -> Result<(Option<PathInfo>, Upstream), DaemonError> {
        if let Some(mut daemon) = self.take() {
            match path_info(&mut daemon, hash, deadline).await {
                Ok(info) => return Ok((info, daemon)),
                Err(DaemonError::Closed | DaemonError::Io(_)) => self.clear(),
                Err(err) => return Err(err),
            }
        }
        let mut daemon = self.connect(deadline).await?;
        let info = path_info(&mut daemon, hash, deadline).await?;
        Ok((info, daemon))
    }

    /// Keeps `daemon` for the next request, if it finished its last exchange and there is room.
    pub fn put_back(&self, daemon: Upstream) {
        if !daemon.is_ready() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), daemon));
        }
    }

    /// Closes the connections idle for longer than [`MAX_IDLE_TIME`].
    pub fn prune(&self) {
        self.lock()
            .retain(|(since, _)| since.elapsed() < MAX_IDLE_TIME);
    }

    /// The most recently used idle connection that is not too old.
    fn take(&self) -> Option<Upstream> {
        let mut idle = self.lock();
        idle.retain(|(since, _)| since.elapsed() < MAX_IDLE_TIME);
        idle.pop().map(|(_, daemon)| daemon)
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Upstream)>> {
        // Nothing panics while holding the lock, but a poisoned list is still a valid one.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn path_info(
    daemon: &mut Upstream,
    hash: &str,
    deadline: Duration,
) -> Result<Option<PathInfo>, DaemonError> {
    match daemon.query_path_from_hash_part(hash, deadline).await? {
        Some(path) => daemon.query_path_info(&path, deadline).await,
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_daemon::{Wire, HASH_PART as HASH, PATH};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;
    use tokio::sync::oneshot;

    const DEADLINE: Duration = Duration::from_secs(5);

    /// What a Nix 2.8 daemon says on a new connection, then to `lookups` path lookups.
    fn script(lookups: usize) -> Vec<u8> {
        let mut wire = Wire::hello_2_8();
        for _ in 0..lookups {
            wire = wire.raw(&Wire::found().0).raw(&Wire::path_info(120).0);
        }
        wire.0
    }

    #[tokio::test]
    async fn connections_are_reused_and_a_closed_one_is_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("daemon.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (close_first, first_closed) = oneshot::channel::<()>();
        let fake = tokio::spawn(async move {
            // The first connection answers two lookups, then is closed (a restarted tunnel).
            let (mut first, _) = listener.accept().await.expect("accept");
            first.write_all(&script(2)).await.expect("write");
            let _ = first_closed.await;
            drop(first);
            // The second answers one.
            let (mut second, _) = listener.accept().await.expect("accept");
            second.write_all(&script(1)).await.expect("write");
            let _ = second.read_to_end(&mut Vec::new()).await;
        });

        let pool = Pool::new(socket, Arc::default());
        for _ in 0..2 {
            let (info, daemon) = pool.path_info(HASH, DEADLINE).await.expect("lookup");
            assert_eq!(info.expect("found").path, PATH);
            pool.put_back(daemon);
        }
        assert_eq!(pool.lock().len(), 1, "one connection served both");
        let _ = close_first.send(());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (info, daemon) = pool.path_info(HASH, DEADLINE).await.expect("retried");
        assert_eq!(info.expect("found").path, PATH);
        drop(daemon);
        drop(pool);
        tokio::time::timeout(DEADLINE, fake)
            .await
            .expect("the fake daemon did not see the second connection close")
            .expect("fake daemon");
    }
}
