//! A stand-in for the desktop's notification server (dunst, mako) on the private session bus:
//! it records every `Notify` call and answers with a new id, or with the id it was asked to
//! replace, as the Desktop Notifications Specification says; or, hung, never answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::zvariant::OwnedValue;
use zbus::{interface, Connection};

/// One `Notify` call as received, and the id it was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notified {
    pub app_name: String,
    pub replaces_id: u32,
    pub summary: String,
    pub body: String,
    pub id: u32,
}

struct Server {
    calls: Arc<Mutex<Vec<Notified>>>,
    last_id: u32,
    hung: bool,
}

#[interface(name = "org.freedesktop.Notifications")]
impl Server {
    #[allow(clippy::too_many_arguments)] // the specification's signature
    async fn notify(
        &mut self,
        app_name: String,
        replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        if self.hung {
            std::future::pending::<()>().await;
        }
        let id = if replaces_id == 0 {
            self.last_id += 1;
            self.last_id
        } else {
            replaces_id
        };
        self.calls.lock().unwrap().push(Notified {
            app_name,
            replaces_id,
            summary,
            body,
            id,
        });
        id
    }
}

pub struct FakeNotifications {
    _connection: Connection,
    calls: Arc<Mutex<Vec<Notified>>>,
}

impl FakeNotifications {
    pub async fn start(address: &str) -> zbus::Result<FakeNotifications> {
        FakeNotifications::start_with(address, false).await
    }

    /// A server that takes the name and never answers a call.
    pub async fn start_hung(address: &str) -> zbus::Result<FakeNotifications> {
        FakeNotifications::start_with(address, true).await
    }

    async fn start_with(address: &str, hung: bool) -> zbus::Result<FakeNotifications> {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let server = Server {
            calls: calls.clone(),
            last_id: 0,
            hung,
        };
        let connection = zbus::connection::Builder::address(address)?
            .serve_at("/org/freedesktop/Notifications", server)?
            .name("org.freedesktop.Notifications")?
            .build()
            .await?;
        Ok(FakeNotifications {
            _connection: connection,
            calls,
        })
    }

    /// Every `Notify` call so far, in order.
    pub fn calls(&self) -> Vec<Notified> {
        self.calls.lock().unwrap().clone()
    }
}
