//! Telling a host that is slow from a host that is gone, in under a second. When the Pi loses
//! power or its sshd stalls while the laptop's link stays up, the tunnel's socket still accepts
//! and nothing ever answers; a Nix command that meets an error from the cache then retries for
//! seconds and fails (docs/nix-vanish-window.md). So the cache listens to everything its
//! daemon connections receive: a request waits for the daemon only while the daemon was heard
//! within [`SILENCE`]; once a request gives up for silence the host is *in doubt*, and every
//! request is answered "not here" at once until a byte arrives again (the agent's check of the
//! cache, which runs before Nix is pointed at it again, connects through the same hearing:
//! [`super::health`]). Any byte counts, a NAR's too: ssh carries all channels on one
//! connection, so a lookup may queue behind a download on a slow link, and the download's
//! bytes show that the host is there.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// A request gives up on the daemon when nothing arrived from it for this long (since the
/// request started or the daemon was last heard, whichever is later). The first build after
/// the Pi went waits this long, plus its own time: it must stay well under a second. A Pi
/// that is there answers a lookup in milliseconds (a new connection: a fork on the Pi and two
/// round trips); one that stalls longer only costs that one path a 404 (Nix builds it, or
/// takes it from its next cache) and the cache a check before Nix is pointed at it again.
pub const SILENCE: Duration = Duration::from_millis(500);

/// What the cache has heard from its daemon, shared by every connection to it.
#[derive(Debug)]
pub struct Hearing {
    last_heard: Mutex<Instant>,
    in_doubt: watch::Sender<bool>,
}

impl Default for Hearing {
    fn default() -> Self {
        Hearing {
            last_heard: Mutex::new(Instant::now()),
            in_doubt: watch::channel(false).0,
        }
    }
}

impl Hearing {
    /// Bytes arrived from the daemon: it is there. Called for every read (a NAR's too): the
    /// doubt is only written when there is one.
    pub fn heard(&self) {
        *self.lock() = Instant::now();
        if self.in_doubt() && self.in_doubt.send_if_modified(std::mem::take) {
            info!("binary cache: the host's nix-daemon answers again");
        }
    }

    /// Whether a request gave up for silence and nothing was heard since.
    pub fn in_doubt(&self) -> bool {
        *self.in_doubt.borrow()
    }

    /// Follows [`in_doubt`](Self::in_doubt) as it changes.
    pub fn doubts(&self) -> watch::Receiver<bool> {
        self.in_doubt.subscribe()
    }

    /// Completes when the daemon has been silent for [`SILENCE`] since `since` and since it
    /// was last heard, or at once when the host is (or becomes) in doubt; the host is in doubt
    /// from then on.
    pub async fn silence(&self, since: Instant) {
        let mut doubt = self.in_doubt.subscribe();
        loop {
            if *doubt.borrow_and_update() {
                return;
            }
            let until = since.max(*self.lock()) + SILENCE;
            if Instant::now() >= until {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                changed = doubt.changed() => if changed.is_err() { break },
            }
        }
        let doubted = self
            .in_doubt
            .send_if_modified(|doubt| !std::mem::replace(doubt, true));
        if doubted {
            warn!(
                "binary cache: nothing from the host's nix-daemon for {} ms: answering \
                 \"not here\" until it is heard again",
                SILENCE.as_millis()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        // Nothing panics while holding the lock, but a poisoned instant is still an instant.
        self.last_heard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection to the daemon whose every read that brings bytes counts as hearing it.
#[derive(Debug)]
pub struct Heard<S> {
    inner: S,
    hearing: Arc<Hearing>,
}

impl<S> Heard<S> {
    pub fn new(inner: S, hearing: Arc<Hearing>) -> Self {
        Heard { inner, hearing }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.hearing.heard();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn silence_counts_from_the_later_of_start_and_last_heard() {
        let hearing = Hearing::default();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        hearing.heard();
        hearing.silence(start).await;
        assert_eq!(start.elapsed(), Duration::from_millis(500) + SILENCE);
        assert!(hearing.in_doubt());
        // In doubt: the next request does not wait at all.
        let now = Instant::now();
        hearing.silence(now).await;
        assert_eq!(now.elapsed(), Duration::ZERO);
        hearing.heard();
        assert!(!hearing.in_doubt(), "a byte clears the doubt");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_ends_when_another_gives_up() {
        let hearing = Arc::new(Hearing::default());
        let first = Instant::now();
        let giving_up = tokio::spawn({
            let hearing = hearing.clone();
            async move { hearing.silence(first).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let second = Instant::now();
        hearing.silence(second).await;
        assert_eq!(first.elapsed(), SILENCE, "not SILENCE after its own start");
        giving_up.await.expect("the first request");
    }

    #[tokio::test]
    async fn reads_that_bring_bytes_are_heard() {
        let hearing = Arc::new(Hearing::default());
        let _ = hearing.in_doubt.send_replace(true);
        let (near, mut far) = duplex(64);
        let mut heard = Heard::new(near, hearing.clone());
        heard.write_all(b"ping").await.expect("write");
        let mut got = [0; 4];
        far.read_exact(&mut got).await.expect("read");
        assert!(hearing.in_doubt(), "writing is not hearing");
        far.write_all(b"pong").await.expect("write");
        heard.read_exact(&mut got).await.expect("read");
        assert!(!hearing.in_doubt());
    }
}
