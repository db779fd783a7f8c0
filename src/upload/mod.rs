//! The uploads: the builds Nix's post-build hook records in a durable spool ([`hook`],
//! [`spool`]), uploaded in batches to a host's store while the host is there ([`batch`], run
//! for the agent by [`drain`], with the Nix that [`nix_bin`] finds), and listed for `reachd
//! uploads` ([`listing`]). *When* to upload
//! and how long to wait after a failure is decided in [`reconcile`](crate::reconcile); this is
//! the I/O. The served cache is the other Nix wing, [`cache`](crate::cache).

pub mod batch;
pub mod drain;
pub mod hook;
pub mod listing;
pub mod nix_bin;
pub mod spool;
