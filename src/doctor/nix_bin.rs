//! Which `nix` the agent's uploads would run: found as the agent finds it
//! ([`nix_bin::find`]: `[nix] bin_dir`, else PATH, then where the installers put Nix), with the
//! PATH the agent gets from the user manager rather than the shell's, and asked its version.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::Finding;
use crate::config::Config;
use crate::error::Chain;
use crate::upload::nix_bin::{self, NixNotFound, Places};

/// The longest `nix --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// How to find the directory that holds `nix`, for the fixes.
const WHERE_IS_NIX: &str = "`dirname \"$(command -v nix)\"` in a shell where `nix` works";

/// The `nix` uploads would run and its version, or where it was looked for and how to fix that.
/// `places`: the agent's PATH, `whose` it is (e.g. "the user manager's PATH"), and the
/// installers' directories.
pub async fn check(config: &Config, places: &Places, whose: &str) -> Finding {
    let dir = match nix_bin::find(config.nix_bin_dir.as_deref(), places) {
        Ok(dir) => dir,
        Err(err) => return not_found(&err, whose),
    };
    let how = if config.nix_bin_dir.is_some() {
        "from `[nix] bin_dir`".to_string()
    } else if in_path(places, &dir) {
        format!("found in {whose}")
    } else {
        format!("not in {whose}, found where the Nix installers put it")
    };
    let nix = dir.join("nix");
    match version(&nix).await {
        Ok(version) => Finding::ok(format!(
            "Nix for uploads: {} ({version}), {how}",
            nix.display()
        )),
        Err(why) => Finding::fail(
            format!("Nix for uploads: `{} --version` {why}", nix.display()),
            format!(
                "repair that Nix, or set `[nix] bin_dir` in reachd's configuration to the directory of one that works ({WHERE_IS_NIX})"
            ),
        ),
    }
}

fn in_path(places: &Places, dir: &Path) -> bool {
    places
        .path
        .iter()
        .flat_map(std::env::split_paths)
        .any(|d| d == dir)
}

fn not_found(err: &NixNotFound, whose: &str) -> Finding {
    match err {
        NixNotFound::BinDir { .. } => Finding::fail(
            format!("Nix for uploads: {}", Chain(err)),
            format!("set `[nix] bin_dir` to the directory that holds `nix` ({WHERE_IS_NIX}), or remove it to let reachd look in PATH and where the Nix installers put it"),
        ),
        NixNotFound::Nowhere { looked } => {
            let looked: Vec<String> = looked.iter().map(|d| d.display().to_string()).collect();
            Finding::fail(
                format!(
                    "Nix for uploads: no `nix` in {whose} nor where the Nix installers put it (looked in {}): every upload fails",
                    looked.join(", ")
                ),
                format!("install Nix, or set `[nix] bin_dir = \"DIR\"` in reachd's configuration, DIR being {WHERE_IS_NIX}"),
            )
        }
    }
}

/// The first line `nix --version` prints, or why there is none.
async fn version(nix: &Path) -> Result<String, String> {
    let run = Command::new(nix)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Err(_) => return Err(format!("did not answer within {VERSION_TIMEOUT:?}")),
        Ok(Err(err)) => return Err(format!("cannot be run ({err})")),
        Ok(Ok(output)) => output,
    };
    let first = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.lines().next().unwrap_or("").trim().to_string()
    };
    if !output.status.success() {
        return Err(format!(
            "failed ({}): {}",
            output.status,
            first(&output.stderr)
        ));
    }
    Ok(first(&output.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn config(extra: &str) -> Config {
        let text = format!(
            "{extra}[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n[host.nix]\nupload = true\n"
        );
        crate::config::parse(&text, "c.toml").unwrap()
    }

    /// A directory holding a `nix` script with body `script`.
    fn fake_nix(root: &Path, name: &str, script: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        let nix = dir.join("nix");
        std::fs::write(&nix, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&nix, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    /// PATH of `path`, then `installers`.
    fn places(path: &[&Path], installers: &[&Path]) -> Places {
        Places {
            path: Some(std::env::join_paths(path).unwrap()),
            installers: installers.iter().map(|d| d.to_path_buf()).collect(),
        }
    }

    #[tokio::test]
    async fn the_nix_found_is_named_with_its_version_and_where_it_was() {
        let root = tempfile::tempdir().unwrap();
        let dir = fake_nix(root.path(), "bin", "echo 'nix (Nix) 2.99.0'");
        let whose = "the user manager's PATH";
        let finding = check(&config(""), &places(&[&dir], &[]), whose).await;
        assert_eq!(
            finding,
            Finding::ok(format!(
                "Nix for uploads: {}/nix (nix (Nix) 2.99.0), found in the user manager's PATH",
                dir.display()
            ))
        );
        let empty = root.path().join("empty");
        let finding = check(&config(""), &places(&[&empty], &[&dir]), whose).await;
        assert!(
            finding.what.ends_with(
                "(nix (Nix) 2.99.0), not in the user manager's PATH, found where the Nix installers put it"
            ),
            "{finding}"
        );
    }

    #[tokio::test]
    async fn a_bin_dir_without_nix_or_a_broken_nix_fails_with_a_fix() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let in_path = fake_nix(root.path(), "bin", "echo 'nix (Nix) 2.99.0'");
        let with_empty = config(&format!("[nix]\nbin_dir = \"{}\"\n", empty.display()));
        let finding = check(&with_empty, &places(&[&in_path], &[]), "PATH").await;
        assert_eq!(finding.level, Level::Fail);
        assert_eq!(
            finding.what,
            format!(
                "Nix for uploads: `[nix] bin_dir` {}: holds no `nix`",
                empty.display()
            )
        );
        assert!(finding.fix.unwrap().contains("command -v nix"));

        let broken = fake_nix(root.path(), "broken", "echo 'error: broken' >&2; exit 1");
        let with_broken = config(&format!("[nix]\nbin_dir = \"{}\"\n", broken.display()));
        let finding = check(&with_broken, &places(&[], &[]), "PATH").await;
        assert_eq!(finding.level, Level::Fail);
        assert!(
            finding
                .what
                .ends_with("--version` failed (exit status: 1): error: broken"),
            "{finding}"
        );
    }

    #[test]
    fn nix_nowhere_names_whose_path_and_where_it_looked() {
        let err = NixNotFound::Nowhere {
            looked: vec![
                "/usr/bin".into(),
                "/nix/var/nix/profiles/default/bin".into(),
            ],
        };
        let finding = not_found(&err, "reachd.service's PATH");
        assert_eq!(
            finding.what,
            "Nix for uploads: no `nix` in reachd.service's PATH nor where the Nix installers put it (looked in /usr/bin, /nix/var/nix/profiles/default/bin): every upload fails"
        );
        assert!(finding.fix.unwrap().contains("[nix] bin_dir = \"DIR\""));
    }
}
