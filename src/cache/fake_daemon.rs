//! Test support: what a Nix daemon says, put together byte by byte as the daemon would, and a
//! daemon on a unix socket that says it, for the tests of the client, the pool and the cache.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use super::daemon::{STDERR_LAST, WORKER_MAGIC_2};

/// A store path, its hash part, and a NAR hash in base16 as daemons send it.
pub const PATH: &str = "/nix/store/d6xhxnk87bzm95j6nka4wmvynsm61imz-small.txt";
pub const HASH_PART: &str = "d6xhxnk87bzm95j6nka4wmvynsm61imz";
pub const HEX: &str = "27883179b38a624df9b1285436d2414c63aeb9a9ee79a0bd3ec9454e35c4273c";

/// Bytes on the wire: numbers as little-endian u64, strings padded to 8.
#[derive(Debug, Default, Clone)]
pub struct Wire(pub Vec<u8>);

impl Wire {
    pub fn num(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }

    pub fn str(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    pub fn bytes(mut self, s: &[u8]) -> Self {
        self = self.num(s.len() as u64);
        self.0.extend_from_slice(s);
        self.0.resize(self.0.len().div_ceil(8) * 8, 0);
        self
    }

    pub fn strs(mut self, items: &[&str]) -> Self {
        self = self.num(items.len() as u64);
        for s in items {
            self = self.str(s);
        }
        self
    }

    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    /// Nix 2.8's greeting: 1.34, its version, no error.
    pub fn hello_2_8() -> Self {
        Wire::default()
            .num(WORKER_MAGIC_2)
            .num(0x122)
            .str("2.8.0")
            .num(STDERR_LAST)
    }

    /// `QueryPathFromHashPart`'s answer: [`PATH`].
    pub fn found() -> Self {
        Wire::default().num(STDERR_LAST).str(PATH)
    }

    /// `QueryPathInfo`'s answer for [`PATH`]: NAR hash [`HEX`] and `nar_size` bytes, a
    /// deriver, a reference, built here, one signature, no CA.
    pub fn path_info(nar_size: u64) -> Self {
        Wire::default()
            .num(STDERR_LAST)
            .num(1)
            .str("/nix/store/cz6kjqr7di3ycz8n71xc4k37q453zmci-withref.drv")
            .str(HEX)
            .strs(&["/nix/store/cc84x1xzmv1y70awlphx8w9zcjv530x4-dep"])
            .num(1_700_000_000)
            .num(nar_size)
            .num(1)
            .strs(&["pi-1:c2lnbmF0dXJl"])
            .str("")
    }
}

/// A daemon at `socket` that gives each new connection the next of `scripts` (then reads until
/// the client hangs up), and accepts no more after the last.
pub fn serve(socket: &Path, scripts: Vec<Wire>) -> JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("bind the fake daemon's socket");
    tokio::spawn(async move {
        for script in scripts {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(&script.0).await;
                let _ = stream.read_to_end(&mut Vec::new()).await;
            });
        }
    })
}
