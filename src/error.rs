//! How an error is shown: its own message, then each cause once (`a: b: c`), the way anyhow's
//! `{:#}` shows it. Every error type here says only what it adds and leaves its cause to
//! `source()`, so that the chain never repeats itself; [`Chain`] is the one printer for where an
//! error becomes text in the library (a log line, a status property, a spool's retry state, an
//! HTTP answer) and for the binary's one error message. Some errors of other crates do put their
//! cause in their message too (zbus's `I/O error: {e}`): the printer leaves out a cause that the
//! text already ends with, so that it is shown once there as well.

use std::error::Error;
use std::fmt;

/// An error and every cause under it, each once: `a: b: c`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            let text = err.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = err.source();
        }
        Ok(())
    }
}

/// The error and its causes as one string (see [`Chain`]).
pub fn chain(err: &(dyn Error + 'static)) -> String {
    Chain(err).to_string()
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;
    use crate::cache::daemon::{DaemonError, ProtocolError};
    use crate::client::ClientError;
    use crate::config::ConfigError;
    use crate::upload::batch::UploadError;
    use crate::upload::spool::{EntryError, SpoolError};

    const CAUSE: &str = "the-one-cause";

    fn io_cause() -> io::Error {
        io::Error::other(CAUSE)
    }

    fn zbus_cause() -> zbus::Error {
        zbus::Error::Failure(CAUSE.into())
    }

    /// Every error that has a cause, as the library makes them, and the text of its cause.
    fn errors() -> Vec<(Box<dyn Error + Send + Sync + 'static>, &'static str)> {
        let path = PathBuf::from("/some/where");
        let spool_io = || SpoolError::Io {
            action: "read",
            path: path.clone(),
            source: io_cause(),
        };
        vec![
            (
                Box::new(ConfigError::Read {
                    path: path.clone(),
                    source: io_cause(),
                }),
                CAUSE,
            ),
            (
                Box::new(DaemonError::Connect {
                    path: path.clone(),
                    source: io_cause(),
                }),
                CAUSE,
            ),
            (Box::new(DaemonError::Io(io_cause())), CAUSE),
            (
                Box::new(DaemonError::Protocol(ProtocolError::Padding)),
                "non-zero padding",
            ),
            (Box::new(ClientError::Bus(zbus_cause())), CAUSE),
            (Box::new(ClientError::Read(zbus_cause())), CAUSE),
            (
                Box::new(ClientError::Bus(zbus::Error::InputOutput(
                    io_cause().into(),
                ))),
                CAUSE,
            ),
            (Box::new(spool_io()), CAUSE),
            (
                Box::new(SpoolError::BadEntry {
                    path: path.clone(),
                    source: EntryError::NotUtf8,
                }),
                "not UTF-8",
            ),
            (
                Box::new(UploadError::Spawn {
                    command: "nix copy".into(),
                    source: io_cause(),
                }),
                CAUSE,
            ),
            (Box::new(UploadError::Spool(spool_io())), CAUSE),
            (
                Box::new(crate::atomic_file::WriteError {
                    action: "create",
                    path,
                    source: io_cause(),
                }),
                CAUSE,
            ),
        ]
    }

    #[test]
    fn each_cause_is_shown_once() {
        for (err, cause) in errors() {
            let debug = format!("{err:?}");
            let chained = chain(err.as_ref());
            assert_eq!(chained.matches(cause).count(), 1, "{chained:?} ({debug})");
            let wrapped = anyhow::anyhow!(err).context("while testing");
            let alternate = format!("{wrapped:#}");
            // anyhow's own printer repeats what an error of another crate repeats (zbus's
            // `I/O error: {e}`); ours show their cause only as their source.
            if !debug.contains("InputOutput") {
                assert_eq!(alternate.matches(cause).count(), 1, "{alternate:?}");
            }
            let shown = Chain(wrapped.as_ref()).to_string();
            assert_eq!(shown.matches(cause).count(), 1, "{shown:?}");
            assert!(shown.starts_with("while testing: "), "{shown:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_task_is_shown_with_its_cause_once() {
        let join = tokio::spawn(async { panic!("{CAUSE}") }).await.unwrap_err();
        let err = anyhow::Error::from(UploadError::Task(join));
        let shown = format!("{err:#}");
        assert_eq!(shown.matches(CAUSE).count(), 1, "{shown:?}");
        assert_eq!(Chain(err.as_ref()).to_string(), shown);
    }

    #[test]
    fn a_cause_that_the_message_already_ends_with_is_left_out() {
        let err = zbus::Error::InputOutput(io_cause().into());
        assert_eq!(chain(&err), format!("I/O error: {CAUSE}"));
    }
}
