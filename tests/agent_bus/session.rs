//! The agent on the session bus: one agent per bus, its objects against the contract XML, callers
//! with wrong arguments, `reachd status` as a person reads it and `--watch`, and how `run` ends (the bus lost, the shutdown
//! future, nothing left running).

use super::*;

#[test]
fn losing_the_session_bus_ends_run_with_an_error() {
    on_buses(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        rig.session.kill();
        let ended = rig.join().await;
        assert!(
            ended.is_err(),
            "run must fail so that systemd restarts the agent: {ended:?}"
        );
    });
}

#[test]
fn a_second_agent_refuses_to_start_and_the_first_keeps_the_name() {
    on_buses(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        let dbus = DBusProxy::new(&rig.client).await.expect("the bus answers");
        let name = zbus::names::BusName::try_from(BUS_NAME).unwrap();
        let first = dbus.get_name_owner(name.clone()).await.expect("owned");
        let environment = reachd::agent::Environment {
            system_bus: Some(rig.system.address().to_string()),
            session_bus: Some(rig.session.address().to_string()),
            runtime_dir: Some(rig.runtime.path().to_path_buf()),
            config_file: None,
        };
        let control = reachd::agent::Control {
            shutdown: std::future::pending(),
            reloads: futures_util::stream::pending(),
        };
        let second = reachd::agent::run(config_with("", ""), environment, control);
        let refused = tokio::time::timeout(WAIT, second)
            .await
            .expect("the second agent returns at once")
            .expect_err("the second agent refuses to run");
        let message = format!("{refused:#}");
        assert!(
            message.contains("reachd is already running on this session bus (pid "),
            "{message}"
        );
        assert!(
            message.contains(first.as_str()),
            "names the first: {message}"
        );
        assert_eq!(dbus.get_name_owner(name).await.expect("owned"), first);
        rig.assert_agent_running();
        rig.shutdown()
            .await
            .expect("the first agent stops normally");
    });
}

/// `reachd status [HOST]` run against the agent, its stdout and stderr.
async fn status_output(rig: &Rig, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_reachd"))
        .arg("status")
        .args(args)
        .env("DBUS_SESSION_BUS_ADDRESS", rig.session.address())
        .output()
        .await
        .expect("reachd status runs");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

#[test]
fn status_prints_a_table_and_one_host_in_detail() {
    on_buses(async {
        let (mut rig, _probe) = started_with_fake_probe("").await;
        let (code, table, _) = status_output(&rig, &[]).await;
        assert_eq!(code, Some(0));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "a header and the one host: {table}");
        assert!(lines[0].starts_with("HOST  STATE  "), "{table}");
        let row: Vec<&str> = lines[1]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(&row[..2], ["rpi", "reachable"], "{table}");
        assert!(row[2].ends_with(" s ago"), "since, in words: {table}");
        assert_eq!(row[4], "active", "the target's state: {table}");

        let (code, detail, _) = status_output(&rig, &["rpi"]).await;
        assert_eq!(code, Some(0));
        let title = detail.lines().next().unwrap_or_default();
        assert!(
            title.starts_with("rpi (") && title.contains("): reachable since "),
            "{detail}"
        );
        assert!(
            detail.contains(&format!(
                "  target       {TARGET} active (last job start: done, 1 sent)"
            )),
            "{detail}"
        );
        let (code, json, _) = status_output(&rig, &["rpi", "--json"]).await;
        assert_eq!(code, Some(0));
        let host: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
        assert_eq!(host["name"], "rpi", "{json}");

        let (code, _, stderr) = status_output(&rig, &["nas"]).await;
        assert_eq!(code, Some(2), "an unknown host cannot be told: {stderr}");
        assert!(stderr.contains(r#"no host named "nas""#), "{stderr}");
        assert!(stderr.contains("(hosts: rpi)"), "{stderr}");
        rig.shutdown().await.expect("the agent stops");
    });
}

#[test]
fn status_watch_prints_each_change_and_ends_with_the_agent() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    on_buses(async {
        let (mut rig, _probe) = started_with_fake_probe("").await;
        let mut watcher = tokio::process::Command::new(env!("CARGO_BIN_EXE_reachd"))
            .args(["status", "--watch", "--json"])
            .env("DBUS_SESSION_BUS_ADDRESS", rig.session.address())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("reachd status --watch starts");
        let mut lines = BufReader::new(watcher.stdout.take().expect("its stdout")).lines();
        let mut next = async || -> serde_json::Value {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a line within the wait")
                .expect("stdout reads")
                .expect("a line, not the end");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("JSON per line: {e}: {line}"))
        };
        let first = next().await;
        assert_eq!(
            (first["name"].as_str(), first["reachable"].as_bool()),
            (Some("rpi"), Some(true))
        );
        rig.nm().set(&Network::disconnected()).await.unwrap();
        loop {
            let host = next().await;
            if host["state"] == "unreachable" {
                assert_eq!(host["reason"], "network disconnected");
                break;
            }
        }
        rig.shutdown().await.expect("the agent stops");
        let status = tokio::time::timeout(WAIT, watcher.wait())
            .await
            .expect("the watch ends with the agent")
            .expect("it exits");
        assert_eq!(status.code(), Some(2));
    });
}

#[test]
fn callers_with_wrong_arguments_get_errors_and_the_agent_goes_on() {
    on_buses(async {
        let rig = Rig::offline().await;
        let client = &rig.client;
        let attempts: Vec<zbus::Result<zbus::Message>> = vec![
            client
                .call_method(
                    Some(BUS_NAME),
                    ROOT_PATH,
                    Some("org.reachd.Reachd1"),
                    "Refresh",
                    &("now",),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    ROOT_PATH,
                    Some("org.reachd.Reachd1"),
                    "Reboot",
                    &(),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "Get",
                    &(HOST_INTERFACE, "Password"),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "Set",
                    &(
                        HOST_INTERFACE,
                        "Reachable",
                        zbus::zvariant::Value::from(true),
                    ),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    "/org/reachd/Reachd1/host/nobody",
                    Some(HOST_INTERFACE),
                    "Get",
                    &(),
                )
                .await,
            client
                .call_method(
                    Some(BUS_NAME),
                    HOST_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "GetAll",
                    &(42u32,),
                )
                .await,
        ];
        for (n, attempt) in attempts.into_iter().enumerate() {
            assert!(
                matches!(attempt, Err(zbus::Error::MethodError(..))),
                "call {n} gets a D-Bus error: {attempt:?}"
            );
        }
        rig.assert_agent_running();
        let host = rig.host().await;
        assert!(!host.reachable, "the host state is untouched: {host:#?}");
        rig.refresh().await;
    });
}

#[test]
fn shutdown_future_ends_run_with_ok() {
    on_buses(async {
        let mut rig = Rig::offline().await;
        rig.wait_host("unreachable", |h| h.state == "unreachable")
            .await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        assert_eq!(
            rig.systemd.jobs(),
            [],
            "stopping the agent leaves the target as it is"
        );
    });
}

#[test]
fn nothing_of_the_agent_runs_after_run_returned() {
    on_buses(async {
        let (mut rig, probe) = started_with_fake_probe("").await;
        rig.shutdown().await.expect("run returns Ok on shutdown");
        let dbus = DBusProxy::new(&rig.client).await.expect("the bus answers");
        assert!(
            !dbus
                .name_has_owner(BUS_NAME.try_into().unwrap())
                .await
                .expect("the bus answers"),
            "{BUS_NAME} is free as soon as run returned"
        );
        let (calls, reads) = (rig.systemd.calls(), rig.nm().reads());
        // Everything a running agent would act on: the network goes, the host vanishes, the
        // target is stopped by someone else.
        rig.nm().set(&Network::disconnected()).await.unwrap();
        probe.vanish();
        rig.systemd
            .set_active_state(TARGET, "inactive")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rig.systemd.calls(), calls, "no call after run returned");
        assert_eq!(rig.nm().reads(), reads, "NetworkManager not read again");
    });
}

/// The members of one interface, comparable: methods with their argument types and
/// directions, properties with type and access, signals with their argument types.
#[derive(Debug, PartialEq, Eq)]
struct Members {
    methods: BTreeSet<String>,
    properties: BTreeSet<String>,
    signals: BTreeSet<String>,
}

/// The `org.reachd.*` interfaces of an introspection document.
fn reachd_interfaces(xml: &str) -> BTreeMap<String, Members> {
    let node = zbus_xml::Node::from_reader(xml.as_bytes()).expect("introspection XML parses");
    let args = |args: &[zbus_xml::Arg]| {
        args.iter()
            .map(|a| {
                format!(
                    "{}{}",
                    match a.direction() {
                        Some(zbus_xml::ArgDirection::Out) => "out:",
                        _ => "in:",
                    },
                    a.ty().inner()
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    node.interfaces()
        .iter()
        .filter(|i| i.name().starts_with("org.reachd."))
        .map(|i| {
            let members = Members {
                methods: i
                    .methods()
                    .iter()
                    .map(|m| format!("{}({})", m.name(), args(m.args())))
                    .collect(),
                properties: i
                    .properties()
                    .iter()
                    .map(|p| format!("{} {} {:?}", p.name(), p.ty().inner(), p.access()))
                    .collect(),
                signals: i
                    .signals()
                    .iter()
                    .map(|s| format!("{}({})", s.name(), args(s.args())))
                    .collect(),
            };
            (i.name().to_string(), members)
        })
        .collect()
}

#[test]
fn live_introspection_matches_the_contract_xml() {
    on_buses(async {
        let rig = Rig::offline().await;
        let contract_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dbus-interfaces/org.reachd.Reachd1.xml"
        );
        let contract_xml =
            std::fs::read_to_string(contract_path).expect("the contract XML is readable");
        let contract = reachd_interfaces(&contract_xml);
        assert_eq!(
            contract.keys().collect::<Vec<_>>(),
            ["org.reachd.Reachd1", "org.reachd.Reachd1.Host"],
            "the contract defines the root and host interfaces"
        );

        let mut live = BTreeMap::new();
        for (path, expected) in [
            (ROOT_PATH, "org.reachd.Reachd1"),
            (HOST_PATH, HOST_INTERFACE),
        ] {
            let introspectable = IntrospectableProxy::builder(&rig.client)
                .destination(BUS_NAME)
                .unwrap()
                .path(path)
                .unwrap()
                .build()
                .await
                .unwrap();
            let xml = introspectable
                .introspect()
                .await
                .expect("Introspect() answers");
            let found = reachd_interfaces(&xml);
            assert_eq!(
                found.keys().collect::<Vec<_>>(),
                [expected],
                "interfaces at {path}"
            );
            live.extend(found);
        }
        for (name, members) in &contract {
            let live = &live[name];
            assert_eq!(
                live.methods, members.methods,
                "methods of {name} (live, contract)"
            );
            assert_eq!(
                live.properties, members.properties,
                "properties of {name} (live, contract)"
            );
            assert_eq!(
                live.signals, members.signals,
                "signals of {name} (live, contract)"
            );
        }
        assert_eq!(live, contract);
    });
}
