//! The `reachd` command as a user meets it: exit codes and messages for a bad configuration and
//! for an agent that is not running (the lab covers the answers of a running agent), and
//! `reachd uploads`, which reads the spool without the agent.

use std::process::{Command, Output};

use reachd_testkit::bus::PrivateBus;

fn reachd(args: &[&str], session_bus: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reachd"));
    command.args(args).env_remove("DBUS_SESSION_BUS_ADDRESS");
    if let Some(address) = session_bus {
        command.env("DBUS_SESSION_BUS_ADDRESS", address);
    }
    command.output().expect("run reachd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_config_is_one_line_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[[host]]\nname = \"rpi\"\nhostnme = \"rpi.local\"\n").expect("write");
    let output = reachd(
        &["run", "--config", path.to_str().expect("utf-8 path")],
        None,
    );
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    assert!(
        message.starts_with(&format!("reachd: {}:3:1: ", path.display())),
        "{message}"
    );
    assert!(message.contains("hostnme"), "{message}");
}

#[test]
fn missing_config_file_is_named() {
    let output = reachd(&["run", "--config", "/nonexistent/reachd.toml"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).starts_with("reachd: cannot read /nonexistent/reachd.toml"));
}

#[test]
fn check_config_prints_what_it_understood() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[[host]]\nname = \"nas\"\nhostname = \"nas.local\"\nport = 22\n",
    )
    .expect("write");
    let output = reachd(
        &[
            "run",
            "--check-config",
            "--config",
            path.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("host nas: nas.local -> nas-accessible.target, TCP port 22"),
        "{stdout}"
    );
}

#[test]
fn without_a_running_agent_the_cli_cannot_tell() {
    let session = PrivateBus::start("session");
    for args in [
        &["check", "rpi"][..],
        &["status"],
        &["status", "--json"],
        &["refresh"],
    ] {
        let output = reachd(args, Some(session.address()));
        assert_eq!(output.status.code(), Some(2), "reachd {args:?}: {output:?}");
        assert!(
            stderr(&output).contains("reachd is not running on the session bus"),
            "reachd {args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn without_a_session_bus_the_cli_says_so() {
    let output = reachd(&["check", "rpi"], Some("unix:path=/nonexistent/bus"));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with("reachd: cannot connect to the session bus"),
        "{}",
        stderr(&output)
    );
}

/// A configuration with host `rpi` uploading, its spool at `spool`, written into `dir`.
fn upload_config(dir: &std::path::Path, spool: &std::path::Path) -> String {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[nix]\nspool = \"{}\"\n[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\nupload = true\n",
            spool.display()
        ),
    )
    .expect("write");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn uploads_lists_the_spool_and_waits_for_it_without_an_agent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spool_dir = dir.path().join("spool");
    let config = upload_config(dir.path(), &spool_dir);
    let output = reachd(&["uploads", "--config", &config], None);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("does not exist"),
        "{}",
        stderr(&output)
    );

    std::fs::create_dir(&spool_dir).expect("the spool");
    let spool = reachd::nix::spool::Spool::open(&spool_dir).expect("opens");
    let out = "/nix/store/0c0ixk0gr8kqxzfh6m4zvrhl6wa4b1nq-hello";
    let entry = reachd::nix::spool::Entry::new(None, [out.parse().expect("a store path")])
        .expect("an entry");
    spool.record(&entry).expect("recorded");
    let output = reachd(&["uploads", "--config", &config], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        listed.contains("1 build(s) recorded, not yet taken"),
        "{listed}"
    );

    let output = reachd(
        &["uploads", "--config", &config, "--wait", "--timeout", "1"],
        None,
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr(&output).contains("1 build(s) still waiting"),
        "{}",
        stderr(&output)
    );
    std::fs::remove_dir_all(spool_dir.join("incoming")).expect("emptied");
    let output = reachd(&["uploads", "--config", &config, "--wait"], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

#[test]
fn uploads_needs_a_host_that_uploads() {
    let output = reachd(&["uploads", "--config", "/nonexistent/reachd.toml"], None);
    assert_eq!(output.status.code(), Some(2));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n",
    )
    .expect("write");
    let output = reachd(
        &["uploads", "--config", path.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no host has `upload = true`"));
}

#[test]
fn completions_and_man_pages_come_from_the_command_itself() {
    let output = reachd(&["completions", "bash"], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let script = String::from_utf8_lossy(&output.stdout);
    for word in ["status", "uploads", "--watch", "--json"] {
        assert!(script.contains(word), "bash completion knows {word}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let output = reachd(&["man", dir.path().to_str().expect("utf-8")], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    for page in [
        "reachd",
        "reachd-run",
        "reachd-status",
        "reachd-check",
        "reachd-uploads",
    ] {
        let text = std::fs::read_to_string(dir.path().join(format!("{page}.1")))
            .unwrap_or_else(|e| panic!("{page}.1 written: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}.1 is roff"
        );
    }
    let output = reachd(&["man", "/nonexistent/dir"], None);
    assert_eq!(output.status.code(), Some(2));
}
