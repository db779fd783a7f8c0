//! reachd keeps a systemd user target started exactly while a LAN host is reachable: it follows
//! NetworkManager, finds the host by mDNS, checks that it answers, and starts or stops the
//! target through the user manager, publishing what it holds on the session bus.
//!
//! The shape: I/O at the edges ([`network`], [`probe`], [`units`], [`status`]), a pure core in
//! the middle ([`reconcile`]), and [`agent`] as the loop that joins them. The two Nix wings are
//! edges too: [`cache`] lets Nix use a host's store while it is there, [`upload`] uploads builds
//! to it.
//!
//! # Layout
//!
//! ```text
//! src/config/          the TOML file, validated, located errors (host_nix.rs: `[host.nix]`;
//!                      host_builder.rs: `[host.builder]`)
//! src/reconcile/       every decision: pure functions, clock passed in
//!   reach.rs             is the host reachable, and when to check it
//!   target.rs            what to do about its target (start, stop, new address, nothing)
//!   cache_gate.rs        whether Nix may use the host's cache now
//!   upload_timing.rs     when to upload builds to it, and the backoff after a failure
//!   notice.rs            which desktop notifications to send (uploads failing, host changes)
//! src/event.rs         the one Event enum every source sends the loop, HostId, SleepLock
//! src/address.rs       a host's address (IPv6 link-local with its interface) and its kind
//! src/agent/           the loop that joins them (mod.rs: one screen; start and reload bring a
//!                      host up the same way), the hosts it holds (host_state.rs), the tasks it
//!                      owns and ends on shutdown (tasks.rs) and the edited configuration
//!                      applied on SIGHUP (reload.rs)
//! src/network/         NetworkManager (proxies generated from dbus-interfaces/, cut to use)
//! src/probe/           mdns-sd resolution and the unicast mDNS / TCP check
//! src/units.rs         the systemd user manager (systemd-zbus): jobs, environment, unit state
//! src/sleep.rs         logind's PrepareForSleep and the delay inhibitor
//! src/status.rs        the org.reachd.Reachd1 objects; the host record is declared once there
//! src/notify.rs        desktop notifications (`[notify]`): the queue and the one task that
//!                      shows them through org.freedesktop.Notifications
//! src/cache/           the Nix wing that serves: the binary cache served from a host's
//!                      nix-daemon (daemon.rs: the worker protocol; nar.rs: where a streamed NAR
//!                      ends; pool.rs: idle connections; server.rs: the HTTP side; hash.rs: the
//!                      NAR hash), the cache checks (health.rs) and the nix.conf fragment
//!                      (fragment.rs: the caches in use, remote builds off while no builder is)
//! src/upload/          the Nix wing that uploads: the spool (spool.rs), the post-build hook's
//!                      side (hook.rs, run by src/bin/reachd-nix-upload.rs), one batch of
//!                      `nix copy` (batch.rs) with the Nix found where installers put it
//!                      (nix_bin.rs), the agent's run over the spool (drain.rs) and
//!                      `reachd uploads` (listing.rs)
//! src/store_path.rs    what both Nix wings know of store paths: nix32, hash parts, StorePath
//! src/atomic_file.rs   the one atomic write (the fragment, the spool)
//! src/error.rs         the one error printer: each cause once
//! src/doctor/          `reachd doctor`: one small check per piece (session.rs: the buses,
//!                      targets; host.rs: the live check; files.rs: hooks root runs;
//!                      nix_setup.rs and nix_conf.rs: Nix's files read as Nix reads them;
//!                      builders.rs: root's remote builders; nix_bin.rs: the `nix` uploads
//!                      run), printed in mod.rs
//! src/client.rs        the CLI's reading of the agent (one GetAll per host)
//! src/status_text.rs   `reachd status` as a person reads it: the table, one host, a change
//! src/manual/          the man pages: the CLI's, with EXIT STATUS and FILES, and reachd.toml(5)
//!                      and reachd-nix-upload(8) kept as roff there
//! src/main.rs          the CLI: one run() -> Result<ExitCode>, one printer
//! dbus-interfaces/     NetworkManager's introspection XML and reachd's own contract
//! systemd/             reachd.service, D-Bus activation file, example target/tunnel/mount
//! dispatcher/          the NetworkManager hook
//! flake.nix, nix/      the Nix flake: package.nix, hm-module.nix, nixos-module.nix, and
//!                      units.nix (the texts of systemd/ and dispatcher/ with store paths)
//! packaging/           build-deb (the Debian package), deb-texts (its files made from
//!                      systemd/'s) and its maintainer scripts (debian/)
//! tests/               agent_bus/ (fakes on private buses, one file per topic), cli.rs,
//!                      mdns.rs, lab/ (scenarios), package.rs, install.rs, nix_files.rs,
//!                      nix_cache.rs, nix_spool.rs; run (the test command) and
//!                      debian-packages (what it installs)
//! testkit/             the test rigs as a crate (private buses, namespaces, processes
//!                      stopped by PID, the end-to-end lab), shared by tests/ and benches/
//! benches/lab/         the benchmark against the dispatcher script, and reachd's memory under
//!                      an mDNS flood (flood.rs)
//! ```
//!
//! No module imports one above it, and none imports another in a circle: config, address,
//! store_path, atomic_file, error and logging are the ground; reconcile and cache stand on
//! them; upload, event and notify on reconcile; the edges (network, probe, units, sleep, status) on
//! event; agent, doctor and client on the edges; main on them all.
//!
//! Adding an event source is one `Event` variant and one arm in `Agent::handle`; adding a host
//! property is one line in `status.rs`'s `host_record!` and one in the contract XML (a test
//! compares the two), plus where its value comes from in `agent/host_state.rs`.

pub mod address;
pub mod agent;
pub mod atomic_file;
pub mod cache;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod event;
pub mod logging;
pub mod manual;
pub mod network;
pub mod notify;
pub mod probe;
pub mod reconcile;
pub mod sleep;
pub mod status;
pub mod status_text;
pub mod store_path;
pub mod units;
pub mod upload;
