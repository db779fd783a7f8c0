//! What every part of the lab's Nix does alike: start a Nix program with the lab's environment
//! only, write a file, greet a nix-daemon.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::lab::io_err;
use crate::process::Spawn;

/// The worker protocol's greeting: the client's magic, then the daemon's.
const WORKER_MAGIC_1: u64 = 0x6e69_7863;

const WORKER_MAGIC_2: u64 = 0x6478_696f;

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `program` (for a root nix command or daemon of the lab) with nothing of the caller's
/// environment but PATH, Nix's configuration in `etc`, and its state and logs below `home`:
/// whatever is not configured explicitly (a daemon's socket, a plain `local` store) must never
/// fall back to the machine's /nix/var.
pub(super) fn nix_spawn(program: &str, etc: &Path, home: &Path) -> Spawn {
    Spawn::new(program)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", home)
        .env("NIX_CONF_DIR", etc)
        .env("NIX_STATE_DIR", home.join("state"))
        .env("NIX_LOG_DIR", home.join("log"))
}

pub(super) fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| io_err(path.display(), e))
}

/// The worker protocol's greeting with the nix-daemon at `socket`: sends the client's magic,
/// expects the daemon's and returns its protocol version ("1.34").
pub fn daemon_handshake(socket: &Path) -> Result<String, String> {
    let e = |what: &str, err: std::io::Error| io_err(format!("{what} {}", socket.display()), err);
    let mut s = UnixStream::connect(socket).map_err(|err| e("connecting to", err))?;
    let timeout = Some(Duration::from_secs(5));
    s.set_read_timeout(timeout)
        .and_then(|()| s.set_write_timeout(timeout))
        .map_err(|err| e("setting timeouts on", err))?;
    s.write_all(&WORKER_MAGIC_1.to_le_bytes())
        .map_err(|err| e("writing to", err))?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf)
        .map_err(|err| e("reading the nix-daemon's answer from", err))?;
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != WORKER_MAGIC_2 {
        return Err(format!(
            "{} answered {:#x}, not the nix-daemon's magic",
            socket.display(),
            word(0)
        ));
    }
    Ok(format!("{}.{}", word(8) >> 8, word(8) & 0xff))
}
