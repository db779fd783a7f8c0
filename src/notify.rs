//! Desktop notifications (`[notify]`): the notices [`reconcile::notice`](crate::reconcile::notice)
//! decides are shown by the session bus's notification server (org.freedesktop.Notifications:
//! dunst, mako, the desktop's own). They are a courtesy: the agent hands them to a queue and
//! never waits; one task sends them one at a time, each call bounded by [`CALL_TIMEOUT`], and a
//! missing or hung server only costs the notice (logged at warn once, until one is shown again).
//! Each host's notices of one kind replace each other on screen (`replaces_id`) instead of
//! piling up.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, warn};
use zbus::zvariant::Value;
use zbus::Connection;

use crate::reconcile::{Notice, NoticeKind};

/// Notices waiting for the sender; more are dropped, never waited for.
pub const QUEUE: usize = 32;
/// The longest one notification may take to be shown.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The application the notifications are from.
pub const APP_NAME: &str = "reachd";
/// The well-known name of the notification server.
pub const SERVER_NAME: &str = "org.freedesktop.Notifications";

/// The member of the Desktop Notifications Specification (1.2) that reachd calls.
#[zbus::proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications"
)]
pub trait Notifications {
    /// Shows a notification (replacing `replaces_id`'s if not 0) and returns its id;
    /// `expire_timeout` -1 leaves it to the server.
    #[allow(clippy::too_many_arguments)] // the specification's signature
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Value<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;
}

/// The agent's end of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Notice>,
}

impl Notifier {
    /// A notifier, and the task that shows its notices through `session`: run it until the
    /// agent stops.
    pub fn new(session: Connection) -> (Notifier, impl Future<Output = ()> + Send + 'static) {
        let (queue, notices) = mpsc::channel(QUEUE);
        (Notifier { queue }, show_all(session, notices))
    }

    /// Queues `notices` for the sender; a notice that finds the queue full is dropped.
    pub fn send(&self, notices: impl IntoIterator<Item = Notice>) {
        for notice in notices {
            if let Err(err) = self.queue.try_send(notice) {
                let summary = &err.into_inner().summary;
                debug!("notification dropped, the queue is full or closed: {summary}");
            }
        }
    }
}

/// Shows each notice as it comes, until the queue closes.
async fn show_all(session: Connection, mut notices: mpsc::Receiver<Notice>) {
    let proxy = NotificationsProxy::builder(&session)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await;
    let proxy = match proxy {
        Ok(proxy) => proxy,
        Err(err) => {
            warn!("desktop notifications are off: {err}");
            return;
        }
    };
    // The id the server gave the last notice of each host and kind.
    let mut shown: HashMap<(String, NoticeKind), u32> = HashMap::new();
    let mut warned = false;
    while let Some(notice) = notices.recv().await {
        let key = (notice.host.clone(), notice.kind);
        let replaces = shown.get(&key).copied().unwrap_or(0);
        let body = escape_markup(&notice.body);
        let call = proxy.notify(
            APP_NAME,
            replaces,
            "",
            &notice.summary,
            &body,
            &[],
            HashMap::new(),
            -1,
        );
        let failure = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(id)) => {
                shown.insert(key, id);
                warned = false;
                continue;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        };
        let summary = &notice.summary;
        if std::mem::replace(&mut warned, true) {
            debug!("notification not shown ({failure}): {summary}");
        } else {
            warn!(
                "notification not shown ({failure}): {summary}; is a notification server running? `reachd doctor` checks (further failures are logged at debug)"
            );
        }
    }
}

/// `text` with `&`, `<` and `>` escaped: most servers read a body as markup.
fn escape_markup(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_escaped_for_servers_that_read_markup() {
        assert_eq!(
            escape_markup("error: <path> & more"),
            "error: &lt;path&gt; &amp; more"
        );
        assert_eq!(escape_markup("12 builds waiting"), "12 builds waiting");
    }

    #[test]
    fn a_full_queue_drops_notices_instead_of_waiting() {
        let (queue, mut notices) = mpsc::channel(QUEUE);
        let notifier = Notifier { queue };
        let notice = |n: usize| Notice {
            host: "rpi".into(),
            kind: NoticeKind::Reach,
            summary: format!("notice {n}"),
            body: String::new(),
        };
        notifier.send((0..QUEUE + 5).map(notice));
        let mut queued = Vec::new();
        while let Ok(notice) = notices.try_recv() {
            queued.push(notice.summary);
        }
        assert_eq!(queued.len(), QUEUE, "the first {QUEUE} are kept");
        assert_eq!(queued.last().map(String::as_str), Some("notice 31"));
        drop(notices);
        notifier.send(Some(notice(99))); // closed: dropped, no panic
    }
}
