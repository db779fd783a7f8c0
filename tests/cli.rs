//! The `reachd` command as a user meets it: exit codes and messages for a bad configuration and
//! for an agent that is not running (the lab covers the answers of a running agent), the SIGHUP
//! `reachd reload` sends whoever holds the agent's name, and `reachd uploads`, which reads the
//! spool without the agent; `reachd doctor` without NetworkManager or a user manager, with
//! every file it reads in a temporary directory.

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
        &["reload"],
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

/// `reachd reload` (the unit's ExecReload=) signals the process that holds the agent's name:
/// here this test, which takes the name on a private bus and waits for the SIGHUP.
#[test]
fn reload_sends_sighup_to_the_owner_of_the_agent_s_name() {
    use tokio::signal::unix::{signal, SignalKind};
    let session = PrivateBus::start("session");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Before anything can send it: SIGHUP's default action would end the test binary.
        let mut hangups = signal(SignalKind::hangup()).expect("catch SIGHUP");
        let _agent = zbus::connection::Builder::address(session.address())
            .and_then(|b| b.name(reachd::status::BUS_NAME))
            .expect("a connection with the agent's name")
            .build()
            .await
            .expect("the agent's name taken");
        let address = session.address().to_string();
        let output = tokio::task::spawn_blocking(move || reachd(&["reload"], Some(&address)))
            .await
            .expect("reachd reload ran");
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        tokio::time::timeout(std::time::Duration::from_secs(10), hangups.recv())
            .await
            .expect("SIGHUP within 10 s");
    });
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
    let spool = reachd::upload::spool::Spool::open(&spool_dir).expect("opens");
    let out = "/nix/store/0c0ixk0gr8kqxzfh6m4zvrhl6wa4b1nq-hello";
    let entry = reachd::upload::spool::Entry::new(None, [out.parse().expect("a store path")])
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
        "reachd-reload",
        "reachd-uploads",
        "reachd-doctor",
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

/// `reachd doctor ARGS` with nothing of the machine's: no system bus, `session_bus` as the
/// session bus, and the hook, Nix's files and the runtime directory below `dir`.
fn doctor(args: &[&str], dir: &std::path::Path, session_bus: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reachd"))
        .arg("doctor")
        .args(args)
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/system_bus_socket",
        )
        .env("DBUS_SESSION_BUS_ADDRESS", session_bus)
        .env("REACHD_DISPATCHER_HOOK", dir.join("90-reachd"))
        .env("NIX_CONF_DIR", dir.join("etc-nix"))
        .env("NIX_USER_CONF_FILES", dir.join("user-nix.conf"))
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .output()
        .expect("run reachd doctor")
}

/// The line of `output` that contains every one of `words`.
fn line_with<'a>(stdout: &'a str, words: &[&str]) -> &'a str {
    stdout
        .lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no line with {words:?} in:\n{stdout}"))
}

#[test]
fn doctor_names_each_broken_piece_with_its_fix_and_exits_1() {
    use std::os::unix::fs::PermissionsExt;
    let session = PrivateBus::start("session");
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    // A host only reachable on one connection: without NetworkManager it is not checked, so the
    // test sends no mDNS.
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[nix]\nspool = \"{}\"\nbin_dir = \"{}\"\n[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n\
             connections = [\"3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a01\"]\n[host.nix]\nupload = true\n",
            d.join("spool").display(),
            d.join("no-nix").display()
        ),
    )
    .expect("write");
    let hook = d.join("90-reachd");
    std::fs::write(&hook, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    std::fs::create_dir(d.join("etc-nix")).expect("mkdir");
    std::fs::write(
        d.join("etc-nix/nix.conf"),
        "trusted-substituters = https://other\n",
    )
    .expect("write");
    std::fs::write(d.join("user-nix.conf"), "# no include\n").expect("write");

    let output = doctor(
        &["--config", config.to_str().expect("utf-8")],
        d,
        session.address(),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    line_with(
        &stdout,
        &[
            "FAIL NetworkManager: cannot connect to the system bus",
            "fix: ",
        ],
    );
    line_with(
        &stdout,
        &["FAIL no systemd user manager on the session bus", "fix: "],
    );
    line_with(
        &stdout,
        &[
            "warn reachd is not running",
            "systemctl --user enable --now reachd.service",
        ],
    );
    line_with(&stdout, &["ok   configuration: ", "host(s) rpi"]);
    line_with(&stdout, &["warn rpi: rpi.local not checked"]);
    line_with(
        &stdout,
        &[
            "FAIL dispatcher hook",
            &hook.display().to_string(),
            "fix: `sudo ch",
        ],
    );
    let fragment = d.join("run/reachd/nix.conf");
    line_with(
        &stdout,
        &[
            "FAIL no nix.conf of yours includes reachd's fragment",
            &format!("add the line `!include {}`", fragment.display()),
        ],
    );
    line_with(
        &stdout,
        &[
            "FAIL rpi: http://127.0.0.1:37515 is not in trusted-substituters",
            "(it lists https://other)",
        ],
    );
    line_with(
        &stdout,
        &["FAIL no post-build-hook in", "reachd-nix-upload"],
    );
    line_with(&stdout, &["FAIL upload spool", "systemd-tmpfiles --create"]);
    line_with(&stdout, &["warn no secret-key-files in"]);
    line_with(
        &stdout,
        &[
            &format!(
                "FAIL Nix for uploads: `[nix] bin_dir` {}: does not exist",
                d.join("no-nix").display()
            ),
            "command -v nix",
        ],
    );
    assert!(
        stdout
            .lines()
            .all(|l| ["ok   ", "warn ", "FAIL "].iter().any(|p| l.starts_with(p))),
        "one finding per line:\n{stdout}"
    );
}

#[test]
fn doctor_names_a_bad_config_and_its_own_usage_errors_exit_2() {
    let session = PrivateBus::start("session");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[host]]\nname = \"rpi\"\nhostnme = \"rpi.local\"\n",
    )
    .expect("write");
    let output = doctor(
        &["--config", config.to_str().expect("utf-8")],
        dir.path(),
        session.address(),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    line_with(
        &stdout,
        &[
            &format!("FAIL configuration: {}:3:1: ", config.display()),
            "hostnme",
            "reachd run --check-config",
        ],
    );
    // Without a configuration no host, target or Nix line follows; the hook is optional.
    line_with(
        &stdout,
        &["ok   dispatcher hook", "not installed (optional"],
    );
    assert!(!stdout.contains("rpi:"), "{stdout}");

    let output = doctor(&["--no-such-option"], dir.path(), session.address());
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}
