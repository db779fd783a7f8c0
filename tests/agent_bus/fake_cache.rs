//! A stand-in for an HTTP binary cache that someone else serves (nix-serve or harmonia on the
//! Pi, through a tunnel): it answers `GET /nix-cache-info` with 200, or, told to hang, accepts
//! connections and never answers, like a tunnel whose far end stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub struct FakeCache {
    address: SocketAddr,
    hang: Arc<AtomicBool>,
    /// The accepting task and every connection's; aborted on drop.
    _tasks: JoinSet<()>,
}

impl FakeCache {
    pub async fn start() -> FakeCache {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the fake cache");
        let address = listener.local_addr().expect("its address");
        let hang = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let hanging = hang.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let hang = hanging.load(Ordering::SeqCst);
                connections.spawn(async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let body = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        FakeCache {
            address,
            hang,
            _tasks: tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// From now on, new connections are accepted and never answered (or answered again).
    pub fn hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::SeqCst);
    }
}
