//! Reloading the configuration (SIGHUP) on private buses: a host added is followed and
//! published, a host removed is dropped without a job for its target, an unchanged host is not
//! touched, and a bad file is refused with the configuration in force kept.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::*;

const NAS_PATH: &str = "/org/reachd/Reachd1/host/nas";

/// A second host, `nas`, that the fake probe finds where it finds every host.
const NAS: &str = "[[host]]\nname = \"nas\"\nhostname = \"nas.local\"\n";

impl Rig {
    /// Writes `text` as the configuration file and sends the agent a SIGHUP.
    pub(super) fn reload(&self, text: &str) {
        std::fs::write(&self.config_file, text).expect("the configuration is written");
        self.reloads.send(()).expect("the agent takes reloads");
    }

    /// The root object's `Hosts`, as paths.
    async fn hosts(&self) -> Vec<String> {
        let root = self.properties_at(ROOT_PATH).await;
        let interface = InterfaceName::from_static_str_unchecked("org.reachd.Reachd1");
        let hosts: Vec<OwnedObjectPath> = root
            .get(interface, "Hosts")
            .await
            .expect("Hosts can be read")
            .try_into()
            .expect("Hosts is a list of paths");
        hosts.iter().map(|p| p.as_str().to_string()).collect()
    }

    /// Waits for the root object's PropertiesChanged saying `Hosts` is `wanted`.
    async fn wait_hosts(&self, wanted: &[&str]) {
        let root = self.properties_at(ROOT_PATH).await;
        let mut changes = root
            .receive_properties_changed()
            .await
            .expect("PropertiesChanged subscription");
        let signalled = tokio::time::timeout(WAIT, async {
            loop {
                if self.hosts().await == wanted {
                    return;
                }
                let change = changes
                    .next()
                    .await
                    .expect("the agent's signals keep coming");
                let args = change.args().expect("PropertiesChanged arguments");
                assert!(
                    args.changed_properties().contains_key("Hosts"),
                    "only Hosts changes on the root object"
                );
            }
        })
        .await;
        if signalled.is_err() {
            panic!(
                "Hosts never became {wanted:?} within {WAIT:?}; it is {:?}",
                self.hosts().await
            );
        }
    }
}

/// Watches a file for being read (inotify's IN_CLOSE_NOWRITE: opened without write access, then
/// closed): how a test knows the agent read its configuration again when the reload changes
/// nothing it publishes.
pub(super) struct ReadWatch {
    inotify: OwnedFd,
}

impl ReadWatch {
    pub(super) fn on(path: &Path) -> Self {
        // SAFETY: plain system calls; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by inotify_init1 and nothing else owns it.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
        // SAFETY: a live descriptor and a NUL-terminated path that outlives the call.
        let watch = unsafe {
            libc::inotify_add_watch(inotify.as_raw_fd(), path.as_ptr(), libc::IN_CLOSE_NOWRITE)
        };
        assert!(
            watch >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        ReadWatch { inotify }
    }

    /// Waits until the file was read since the watch began (or since the last wait).
    pub(super) async fn wait_read(&self) {
        let mut events = [0u8; 4096];
        let read = tokio::time::timeout(WAIT, async {
            loop {
                // SAFETY: reads into a buffer of the length given.
                let n = unsafe {
                    libc::read(
                        self.inotify.as_raw_fd(),
                        events.as_mut_ptr().cast(),
                        events.len(),
                    )
                };
                if n > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        read.unwrap_or_else(|_| panic!("the agent did not read its configuration within {WAIT:?}"));
    }
}

fn job_for(call: &Call, unit: &str) -> bool {
    matches!(call, Call::Start { unit: u, .. } | Call::Stop { unit: u, .. } | Call::Restart { unit: u, .. } if u == unit)
}

#[test]
fn a_host_added_is_followed_and_the_unchanged_one_is_not_touched() {
    on_buses(async {
        let (rig, _probe) = started_with_fake_probe("").await;
        let before = rig.host().await;
        let calls_before = rig.systemd.calls().len();

        rig.reload(&format!("{}{NAS}", rig.config_text));
        rig.wait_hosts(&[HOST_PATH, NAS_PATH]).await;
        let nas = rig
            .wait_host_at(NAS_PATH, "started", |h| h.last_job == "start: done")
            .await;
        assert_eq!(nas.target, NAS_TARGET);
        assert_eq!(nas.state, "reachable");
        assert_eq!(nas.jobs_sent, 1);
        let calls = rig.systemd.calls();
        assert_eq!(
            calls[calls_before..],
            [
                Call::SetEnvironment(vec!["REACHD_NAS_ADDRESS=192.0.2.10".into()]),
                Call::Start {
                    unit: NAS_TARGET.into(),
                    mode: "replace".into()
                }
            ],
            "only the new host's address and target"
        );
        // The unchanged host kept its state (nothing published anew, no job).
        assert_eq!(rig.host().await, before);
        rig.assert_agent_running();
    });
}

#[test]
fn a_host_removed_is_dropped_and_its_target_left_as_it_is() {
    on_buses(async {
        let (mut rig, _cache, probe) = using_a_fake_cache().await;

        rig.reload(NAS);
        rig.wait_hosts(&[NAS_PATH]).await;
        rig.wait_host_at(NAS_PATH, "started", |h| h.last_job == "start: done")
            .await;
        let gone = rig
            .host_properties()
            .await
            .get_all(InterfaceName::from_static_str_unchecked(HOST_INTERFACE))
            .await;
        assert!(gone.is_err(), "the removed host's object is gone: {gone:?}");
        assert_eq!(
            probe.following(),
            ["nas.local."],
            "the removed host's tasks ended"
        );
        assert_eq!(
            rig.fragment_substituters(),
            Vec::<String>::new(),
            "its cache left the fragment"
        );

        // Nothing follows it any more: its target stopped by someone else is not started
        // again, the network going does not stop it.
        rig.systemd
            .set_active_state(TARGET, "inactive")
            .await
            .unwrap();
        rig.nm().set(&Network::disconnected()).await.unwrap();
        rig.wait_host_at(NAS_PATH, "stopped", |h| h.last_job == "stop: done")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rpi_jobs: Vec<Call> = rig
            .systemd
            .jobs()
            .into_iter()
            .filter(|c| job_for(c, TARGET))
            .collect();
        assert_eq!(
            rpi_jobs,
            [start_job()],
            "no job for the removed host's target"
        );
        rig.assert_agent_running();
    });
}

#[test]
fn a_bad_configuration_is_refused_and_the_one_in_force_kept() {
    on_buses(async {
        let (rig, _probe) = started_with_fake_probe("").await;
        let before = rig.host().await;
        let calls_before = rig.systemd.calls();
        let watch = ReadWatch::on(&rig.config_file);

        // Without rpi and with a misspelt key: applied, it would drop rpi.
        rig.reload(&format!("{NAS}hostnme = \"x\"\n"));
        watch.wait_read().await;
        // A good file after it: applied, while the bad one changed nothing (rpi would have
        // been removed, then added afresh, with a new `Since` and no job sent).
        rig.reload(&format!("{}{NAS}", rig.config_text));
        rig.wait_hosts(&[HOST_PATH, NAS_PATH]).await;
        rig.wait_host_at(NAS_PATH, "started", |h| h.last_job == "start: done")
            .await;
        assert_eq!(rig.host().await, before, "rpi never removed nor touched");
        let rpi_jobs: Vec<Call> = rig.systemd.jobs();
        assert_eq!(
            rpi_jobs.iter().filter(|c| job_for(c, TARGET)).count(),
            calls_before.iter().filter(|c| job_for(c, TARGET)).count(),
            "no job for rpi's target"
        );
        rig.assert_agent_running();
    });
}

#[test]
fn a_changed_host_starts_afresh_and_its_target_is_adopted_not_restarted() {
    on_buses(async {
        let (rig, _probe) = started_with_fake_probe("").await;
        let before = rig.host().await;
        let jobs_before = rig.systemd.jobs();

        // A key added to rpi's table: rpi is removed and added again.
        rig.reload(&format!("{}port = 22\n", rig.config_text));
        let host = rig
            .wait_host("followed afresh and reachable again", |h| {
                h.jobs_sent == 0 && h.reachable && h.target_state == "active"
            })
            .await;
        assert_ne!(host.since, before.since, "a fresh start: {host:#?}");
        assert_eq!(rig.hosts().await, [HOST_PATH]);
        // Its target, already active, is adopted: its address set again, no job.
        rig.wait_calls("the address set again", |calls| {
            calls
                .iter()
                .filter(|c| matches!(c, Call::SetEnvironment(_)))
                .count()
                == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            rig.systemd.jobs(),
            jobs_before,
            "no job for the changed host"
        );
        rig.assert_agent_running();
    });
}
