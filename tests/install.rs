//! What each way of installing reachd ships, checked from the files that make it, without
//! installing anything: from source (`cargo install`, and systemd/ as it is), the Debian package
//! (what packaging/deb-texts makes of systemd/) and Nix (what nix/units.nix makes of it,
//! evaluated with nix-instantiate alone, as in tests/nix_files.rs); the licences in the Debian
//! package; and that the Rust the README asks for builds the locked dependencies.

use std::collections::BTreeMap;
use std::process::Command;

/// A unit's name and its text.
type Units = BTreeMap<String, String>;

/// Every `.service` file in systemd/: the user unit, the D-Bus activation file, the examples.
fn shipped_units() -> Units {
    let dir = reachd_testkit::repo().join("systemd");
    let mut units = Units::new();
    for entry in std::fs::read_dir(&dir).expect("read systemd/") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".service") {
            let text = std::fs::read_to_string(&path).expect("read unit");
            units.insert(name.to_string(), text);
        }
    }
    for known in ["reachd.service", "org.reachd.Reachd1.service"] {
        assert!(units.contains_key(known), "no systemd/{known}: {units:?}");
    }
    units
}

/// The file `name` as packaging/deb-texts writes it.
fn debian_text(name: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(reachd_testkit::repo().join("packaging/deb-texts"))
        .arg(dir.path())
        .output()
        .expect("run packaging/deb-texts");
    assert!(output.status.success(), "packaging/deb-texts: {output:?}");
    std::fs::read_to_string(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The Debian package's: reachd.service as packaging/deb-texts writes it, the rest as they are
/// (the D-Bus file is copied, the examples go to /usr/share/doc/reachd/examples/).
fn debian_units(shipped: &Units) -> Units {
    let mut units = shipped.clone();
    units.insert("reachd.service".into(), debian_text("reachd.service"));
    units
}

const STORE: &str = "/nix/store/00000000000000000000000000000000";

/// Nix's: reachd.service and the examples as nix/units.nix patches them (the package's unit,
/// the Home Manager module's examples), the rest as they are (nix/package.nix copies the D-Bus
/// file).
fn nix_units(shipped: &Units) -> Units {
    let programs: Vec<String> = ["ssh", "sshfs", "mkdir", "rm", "fusermount"]
        .iter()
        .map(|p| format!(r#"{p} = "{STORE}-{p}/bin/{p}";"#))
        .collect();
    let patched = reachd_testkit::nix::eval(&format!(
        r#"let u = import ./nix/units.nix; in
           {{ "reachd.service" = u.reachdService "{STORE}-reachd"; }}
           // u.exampleUnits {{ {} }}"#,
        programs.join(" ")
    ));
    let mut units = shipped.clone();
    let patched = patched.as_object().expect("an attribute set");
    for (name, text) in patched
        .iter()
        .filter(|(name, _)| name.ends_with(".service"))
    {
        let text = text.as_str().expect("a unit's text").to_string();
        assert!(
            units.insert(name.clone(), text).is_some(),
            "nix/units.nix makes {name}, which is not in systemd/"
        );
    }
    units
}

/// The problems of every `Exec*=` line of `units`: the program must be an absolute path
/// (`%h/`, the home directory, is one), and in the store where `in_store`. A D-Bus activation
/// file (`[D-BUS Service]`) is not a systemd unit: its `Exec=`, unused when systemd activates
/// the service, need only be absolute.
fn exec_problems(route: &str, units: &Units, in_store: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, text) in units {
        let systemd_unit = !text.lines().any(|l| l.trim() == "[D-BUS Service]");
        let mut execs = 0;
        for line in text.lines() {
            let Some((key, command)) = line.split_once('=') else {
                continue;
            };
            if !key.starts_with("Exec") || key.contains(char::is_whitespace) {
                continue;
            }
            execs += 1;
            // systemd's prefixes: @ (argv[0]), - (failure ignored), :, +, ! and !! (privileges).
            let program = command.trim_start_matches(['@', '-', ':', '+', '!']);
            let absolute = program.starts_with('/') || program.starts_with("%h/");
            if !absolute {
                problems.push(format!("{route}: {name}: {line}: not an absolute path"));
            } else if in_store && systemd_unit && !program.starts_with("/nix/store/") {
                problems.push(format!("{route}: {name}: {line}: not in the Nix store"));
            }
        }
        if execs == 0 {
            problems.push(format!("{route}: {name}: no Exec*= line found"));
        }
    }
    problems
}

/// systemd looks a bare program name up in its own PATH, which on NixOS holds none of them:
/// every unit must name its programs by absolute path, on every route.
#[test]
fn every_program_a_unit_runs_is_an_absolute_path_on_every_route() {
    let shipped = shipped_units();
    let mut problems = exec_problems("from source", &shipped, false);
    problems.extend(exec_problems(
        "Debian package",
        &debian_units(&shipped),
        false,
    ));
    problems.extend(exec_problems("Nix", &nix_units(&shipped), true));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Enabled for every user, the agent must not start for system users (a display manager's
/// greeter), on any route.
#[test]
fn the_agent_starts_for_no_system_user_on_any_route() {
    let shipped = shipped_units();
    for (route, units) in [
        ("from source", shipped.clone()),
        ("Debian package", debian_units(&shipped)),
        ("Nix", nix_units(&shipped)),
    ] {
        let unit = &units["reachd.service"];
        assert!(
            unit.lines().any(|l| l.trim() == "ConditionUser=!@system"),
            "{route}: reachd.service lacks ConditionUser=!@system:\n{unit}"
        );
    }
}

#[test]
fn the_check_catches_a_program_left_to_systemd_s_path() {
    let units = Units::from([(
        "x.service".to_string(),
        "[Service]\nExecStart=/usr/bin/x\nExecReload=kill -HUP $MAINPID\nExecStop=-%h/bin/x\n"
            .to_string(),
    )]);
    assert_eq!(
        exec_problems("test", &units, false),
        ["test: x.service: ExecReload=kill -HUP $MAINPID: not an absolute path"]
    );
    assert_eq!(exec_problems("test", &units, true).len(), 3);
}

/// A `rust-version` as numbers (`1.89` and `1.89.0` alike).
fn rust_version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text
        .split('.')
        .map(|p| p.parse().expect("a rust-version of numbers"))
        .collect();
    parts.resize(3, 0);
    parts
}

/// `rust-version` is what `cargo install --locked` needs: no locked dependency that a build
/// compiles on this platform asks for a newer Rust (cargo refuses to build it otherwise), and
/// the README's install-from-source part asks for that Rust.
#[test]
fn rust_version_covers_every_locked_dependency_and_the_readme_says_it() {
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let rustc = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", host])
        .current_dir(reachd_testkit::repo())
        .output()
        .expect("cargo metadata");
    assert!(output.status.success(), "cargo metadata: {output:?}");
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let packages: BTreeMap<&str, &serde_json::Value> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().expect("an id"), p))
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("the resolved graph")
        .iter()
        .map(|n| (n["id"].as_str().expect("an id"), n))
        .collect();
    let root = metadata["resolve"]["root"]
        .as_str()
        .expect("reachd is the root");
    // What a build of reachd compiles: its normal and build dependencies, transitively.
    let (mut built, mut next) = (std::collections::BTreeSet::new(), vec![root]);
    while let Some(id) = next.pop() {
        if !built.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            let kinds = dep["dep_kinds"].as_array().expect("dep_kinds");
            if kinds.iter().any(|k| k["kind"].as_str() != Some("dev")) {
                next.push(dep["pkg"].as_str().expect("a package id"));
            }
        }
    }
    let declared = packages[root]["rust_version"]
        .as_str()
        .expect("reachd's rust-version");
    let needed = built
        .iter()
        .filter(|id| **id != root)
        .filter_map(|id| {
            let package = packages[id];
            let version = package["rust_version"].as_str()?;
            Some((
                rust_version(version),
                package["name"].as_str().unwrap_or("?"),
            ))
        })
        .max()
        .expect("dependencies that name their Rust");
    assert!(
        rust_version(declared) >= needed.0,
        "rust-version {declared} in Cargo.toml, but {} needs Rust {:?}",
        needed.1,
        needed.0
    );
    let readme = std::fs::read_to_string(reachd_testkit::repo().join("README.md")).expect("README");
    let from_source = &readme[readme.find("### From source").expect("From source")..];
    assert!(
        from_source.contains(&format!("needs Rust {declared} or later")),
        "README's From source does not ask for Rust {declared}"
    );
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(reachd_testkit::repo().join(path)).expect("read repository file")
}

/// Debian wants the licences in /usr/share/doc/reachd/copyright, in its machine-readable format,
/// with the full text of any licence it has no copy of: the Expat (MIT) text is LICENSE-MIT's,
/// Apache-2.0 points at Debian's own copy; and the package ships that file, by its full path
/// (given a directory, cargo-deb's own generated copyright would win over it).
#[test]
fn the_debian_package_carries_the_licences_as_debian_asks() {
    let copyright = debian_text("copyright");
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    for field in [
        "\nFiles: *\nCopyright: the reachd developers\nLicense: Expat or Apache-2.0\n",
        "\nLicense: Apache-2.0\n On Debian systems, the full text of the Apache License, Version 2.0 is in\n /usr/share/common-licenses/Apache-2.0",
    ] {
        assert!(copyright.contains(field), "no {field:?} in:\n{copyright}");
    }
    let mit = repo_file("LICENSE-MIT");
    let notice = &mit[mit
        .find("Permission is hereby granted")
        .expect("MIT's notice")..];
    let folded: String = notice
        .lines()
        .map(|l| {
            if l.is_empty() {
                " .\n".to_string()
            } else {
                format!(" {l}\n")
            }
        })
        .collect();
    assert!(
        copyright.contains(&format!("\nLicense: Expat\n{folded}")),
        "LICENSE-MIT's text is not the Expat paragraph:\n{copyright}"
    );
    assert!(repo_file("LICENSE-MIT").contains("Copyright (c) the reachd developers"));
    assert!(repo_file("LICENSE-APACHE").contains("Version 2.0, January 2004"));

    let manifest: toml::Table = toml::from_str(&repo_file("Cargo.toml")).expect("Cargo.toml");
    assert_eq!(
        manifest["package"]["license"].as_str(),
        Some("MIT OR Apache-2.0")
    );
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("the package's assets");
    let shipped = assets.iter().any(|asset| {
        let asset: Vec<&str> = asset
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        asset[..]
            == [
                "target/debian-files/copyright",
                "usr/share/doc/reachd/copyright",
                "644",
            ]
    });
    assert!(
        shipped,
        "[package.metadata.deb] assets lack the copyright file"
    );
}
