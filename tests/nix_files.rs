//! The Nix files (flake.nix, nix/) checked with Nix alone, because nixpkgs cannot be fetched
//! where the tests run: every .nix file in the repository parses; the unit and hook texts that
//! nix/units.nix derives from systemd/ and dispatcher/ differ from those files only where a
//! store path must replace an FHS one; a patch that no longer matches fails the evaluation; the
//! flake has its outputs and modules. Nothing here builds the package or evaluates a module
//! against nixpkgs or Home Manager (docs/nixos.md).

use std::path::{Path, PathBuf};

use reachd_testkit::nix::{eval, instantiate as nix_instantiate};
use serde_json::Value;

fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read directory") {
        let entry = entry.expect("directory entry");
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Symbolic links are not followed: a `result` of nix-build points into the store.
        if entry.file_type().expect("file type").is_dir() {
            // Build output and git's own files hold no Nix of the project's.
            if name != "target" && name != ".git" {
                nix_files(&path, found);
            }
        } else if name.ends_with(".nix") {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_in_the_repository_parses() {
    let repo = reachd_testkit::repo();
    let mut files = Vec::new();
    nix_files(&repo, &mut files);
    for known in ["flake.nix", "nix/package.nix", "nix/units.nix"] {
        assert!(
            files.contains(&repo.join(known)),
            "the walk missed {known}: found {files:?}"
        );
    }
    for file in &files {
        let output = nix_instantiate(&["--parse", file.to_str().expect("utf-8 path")]);
        assert!(
            output.status.success(),
            "{} does not parse: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(reachd_testkit::repo().join(path)).expect("read repository file")
}

/// The lines that differ between two texts of the same number of lines, as (before, after).
fn changed_lines(before: &str, after: &str) -> Vec<(String, String)> {
    assert_eq!(
        before.lines().count(),
        after.lines().count(),
        "a patch added or removed lines:\n{after}"
    );
    before
        .lines()
        .zip(after.lines())
        .filter(|(b, a)| b != a)
        .map(|(b, a)| (b.to_string(), a.to_string()))
        .collect()
}

fn string(value: &Value) -> &str {
    value.as_str().expect("a string")
}

const REACHD: &str = "/nix/store/00000000000000000000000000000000-reachd";

#[test]
fn the_user_unit_is_systemd_s_with_reachd_from_the_package() {
    let patched = eval(&format!(
        r#"(import ./nix/units.nix).reachdService "{REACHD}""#
    ));
    let changed = changed_lines(&repo_file("systemd/reachd.service"), string(&patched));
    let keys: Vec<&str> = changed
        .iter()
        .map(|(before, _)| before.split_once('=').map_or("", |(key, _)| key))
        .collect();
    assert_eq!(keys, ["ExecStart", "ExecReload"], "{changed:?}");
    for (before, after) in &changed {
        assert_eq!(
            *after,
            before.replace("%h/.cargo/bin/reachd", &format!("{REACHD}/bin/reachd"))
        );
    }
}

/// The programs the example units run, each with the store path the test gives it.
const PROGRAMS: &[(&str, &str)] = &[
    ("ssh", "/usr/bin/ssh"),
    ("sshfs", "/usr/bin/sshfs"),
    ("mkdir", "/bin/mkdir"),
    ("rm", "/bin/rm"),
    ("fusermount", "/usr/bin/fusermount3"),
];

fn store_path(program: &str) -> String {
    format!("/nix/store/00000000000000000000000000000000-{program}/bin/{program}")
}

#[test]
fn the_example_units_are_systemd_s_with_programs_from_the_store() {
    let arguments: Vec<String> = PROGRAMS
        .iter()
        .map(|(name, _)| format!(r#"{name} = "{}";"#, store_path(name)))
        .collect();
    let units = eval(&format!(
        "(import ./nix/units.nix).exampleUnits {{ {} }}",
        arguments.join(" ")
    ));
    let units = units.as_object().expect("an attribute set");
    let mut names: Vec<&str> = units.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "rpi-accessible.target",
            "rpi-mount.service",
            "rpi-nix-tunnel.service"
        ]
    );
    for (name, text) in units {
        let text = string(text);
        for (before, after) in changed_lines(&repo_file(&format!("systemd/{name}")), text) {
            assert!(before.starts_with("Exec"), "{name}: {before} changed");
            assert!(
                PROGRAMS.iter().any(|(program, fhs)| before.contains(fhs)
                    && after == before.replacen(fhs, &store_path(program), 1)),
                "{name}: {before} became {after}"
            );
        }
        for line in text.lines().filter(|l| l.starts_with("Exec")) {
            let command = line.split_once('=').expect("Exec*=").1;
            assert!(
                command.trim_start_matches('-').starts_with("/nix/store/"),
                "{name} still runs a program outside the store: {line}"
            );
        }
    }
}

#[test]
fn the_dispatcher_hook_is_dispatcher_s_with_its_path_from_the_store() {
    let path = "/nix/store/00000000000000000000000000000000-systemd/bin";
    let patched = eval(&format!(
        r#"(import ./nix/units.nix).dispatcherHook "{path}""#
    ));
    let changed = changed_lines(&repo_file("dispatcher/90-reachd"), string(&patched));
    assert_eq!(changed.len(), 1, "only PATH may change: {changed:?}");
    assert!(changed[0].0.starts_with("PATH=/"), "{:?}", changed[0]);
    assert_eq!(changed[0].1, format!("PATH={path}"));
}

#[test]
fn install_sections_and_groups_are_read_from_systemd() {
    let read = eval(
        r#"let u = import ./nix/units.nix; wanted = f: u.wantedBy (builtins.readFile f); in {
             reachd = wanted ./systemd/reachd.service;
             mount = wanted ./systemd/rpi-mount.service;
             tunnel = wanted ./systemd/rpi-nix-tunnel.service;
             target = wanted ./systemd/rpi-accessible.target;
             several = u.wantedBy "[Install]\nWantedBy=a.target  b.target\nWantedBy=c.target\n# WantedBy=d.target";
             groups = u.sysusersGroups;
           }"#,
    );
    let expected = serde_json::json!({
        "reachd": ["default.target"],
        "mount": ["rpi-accessible.target"],
        "tunnel": ["rpi-accessible.target"],
        "target": [],
        "several": ["a.target", "b.target", "c.target"],
        "groups": ["reachd"],
    });
    assert_eq!(read, expected);
}

#[test]
fn a_patch_that_no_longer_matches_fails_the_evaluation() {
    let output = nix_instantiate(&[
        "--readonly-mode",
        "--eval",
        "--strict",
        "--expr",
        r#"(import ./nix/units.nix).patch "systemd/x.service" { "ExecStart=/usr/bin/gone " = "ExecStart=/nix/store/x "; } "ExecStart=/usr/bin/other\n""#,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "evaluated: {stderr}");
    assert!(
        stderr.contains("`ExecStart=/usr/bin/gone ` is no longer in systemd/x.service"),
        "{stderr}"
    );
}

#[test]
fn the_flake_has_the_package_both_modules_an_overlay_checks_and_a_shell() {
    // nixpkgs is never forced: listing the outputs and the modules' arguments needs none.
    let flake = eval(
        r#"let
             flake = import ./flake.nix;
             outputs = flake.outputs {
               self = outputs;
               nixpkgs.legacyPackages = throw "nixpkgs is not available here";
             };
             args = f: builtins.attrNames (builtins.functionArgs (import f));
           in {
             inputs = builtins.attrNames flake.inputs;
             outputs = builtins.attrNames outputs;
             packages = builtins.mapAttrs (_: builtins.attrNames) outputs.packages;
             overlay = builtins.attrNames (builtins.functionArgs outputs.overlays.default);
             hm = args outputs.homeModules.default;
             hmAlias = outputs.homeManagerModules.default == outputs.homeModules.default;
             checks = builtins.mapAttrs (_: builtins.attrNames) outputs.checks;
             shells = builtins.mapAttrs (_: builtins.attrNames) outputs.devShells;
             nixos = args outputs.nixosModules.default;
             package = args ./nix/package.nix;
           }"#,
    );
    let modules = ["config", "lib", "pkgs"];
    let expected = serde_json::json!({
        "inputs": ["nixpkgs"],
        "outputs": ["checks", "devShells", "homeManagerModules", "homeModules", "nixosModules", "overlays", "packages"],
        "packages": {"aarch64-linux": ["default"], "x86_64-linux": ["default"]},
        "checks": {"aarch64-linux": ["nixos-module", "package"], "x86_64-linux": ["nixos-module", "package"]},
        "shells": {"aarch64-linux": ["default"], "x86_64-linux": ["default"]},
        "hmAlias": true,
        "overlay": [],
        "hm": modules,
        "nixos": modules,
        "package": ["installShellFiles", "lib", "rustPlatform", "stdenv"],
    });
    assert_eq!(flake, expected);
}
