//! Where Nix's programs are. Uploads run `nix` and `nix-store`, and the agent gets its PATH
//! from the systemd user manager, which rarely holds them: the Nix installers put Nix in
//! profiles that only a login shell adds to PATH. So reachd runs them from `[nix] bin_dir` when
//! the configuration names it, and otherwise from the first directory of PATH, then of
//! [`installer_dirs`], that holds a `nix` (docs/nix.md, "Which Nix uploads run").

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where the installers put `nix`, in the order a NixOS login shell's PATH has them (Nix's own
/// profile script also puts the user's profile before the default one): the user's profile
/// (single-user installs, `nix profile install`), Home Manager's per-user profile on NixOS,
/// the default profile (the official and Determinate multi-user installers), NixOS's system.
pub fn installer_dirs(home: Option<&Path>, user: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(home.map(|home| home.join(".nix-profile/bin")));
    dirs.extend(user.map(|user| PathBuf::from(format!("/etc/profiles/per-user/{user}/bin"))));
    dirs.push("/nix/var/nix/profiles/default/bin".into());
    dirs.push("/run/current-system/sw/bin".into());
    dirs
}

/// Where to look: PATH, then where the installers put Nix.
#[derive(Debug, Clone, Default)]
pub struct Places {
    pub path: Option<OsString>,
    pub installers: Vec<PathBuf>,
}

impl Places {
    /// `path`, then [`installer_dirs`] for the process's own `HOME` and `USER`.
    pub fn with_path(path: Option<OsString>) -> Places {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let user = var("USER").and_then(|u| u.into_string().ok());
        Places {
            path,
            installers: installer_dirs(home.as_deref(), user.as_deref()),
        }
    }

    /// The process's own: its `PATH`, `HOME` and `USER`.
    pub fn from_env() -> Places {
        Places::with_path(std::env::var_os("PATH"))
    }

    /// Where to look, in order: PATH's directories (only absolute ones), then the installers'.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let path = self.path.iter().flat_map(std::env::split_paths);
        let mut dirs: Vec<PathBuf> = Vec::new();
        for dir in path
            .filter(|d| d.is_absolute())
            .chain(self.installers.clone())
        {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }
}

/// Why a directory cannot be where `nix` is run from.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    #[error("does not exist")]
    Missing,
    #[error("cannot be read")]
    Unreadable(#[source] std::io::Error),
    #[error("is not a directory")]
    NotADirectory,
    #[error("holds no `nix`")]
    NoNix,
    #[error("holds a `nix` that is not an executable file")]
    NotExecutable,
}

/// Nix could not be found.
#[derive(Debug, thiserror::Error)]
pub enum NixNotFound {
    #[error("`[nix] bin_dir` {}", dir.display())]
    BinDir {
        dir: PathBuf,
        #[source]
        unfit: Unfit,
    },
    #[error(
        "cannot find `nix`: not in PATH nor where the Nix installers put it (looked in {}); set `[nix] bin_dir` in reachd's configuration to the directory that holds it",
        shown(looked)
    )]
    Nowhere { looked: Vec<PathBuf> },
}

fn shown(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(", ")
}

/// Whether `dir` holds an executable `nix`.
pub fn holds_nix(dir: &Path) -> Result<(), Unfit> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(Unfit::NotADirectory),
        Ok(_) => {}
        Err(err) if err.kind() == ErrorKind::NotFound => return Err(Unfit::Missing),
        Err(err) => return Err(Unfit::Unreadable(err)),
    }
    match std::fs::metadata(dir.join("nix")) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(Unfit::NotExecutable),
        Err(err) if err.kind() == ErrorKind::NotFound => Err(Unfit::NoNix),
        Err(err) => Err(Unfit::Unreadable(err)),
    }
}

/// The directory whose `nix` and `nix-store` reachd runs: `bin_dir` (`[nix] bin_dir`) when
/// given, which must hold an executable `nix`; otherwise the first of [`Places::dirs`] that does.
pub fn find(bin_dir: Option<&Path>, places: &Places) -> Result<PathBuf, NixNotFound> {
    if let Some(dir) = bin_dir {
        return match holds_nix(dir) {
            Ok(()) => Ok(dir.to_path_buf()),
            Err(unfit) => Err(NixNotFound::BinDir {
                dir: dir.to_path_buf(),
                unfit,
            }),
        };
    }
    let looked = places.dirs();
    match looked.iter().find(|dir| holds_nix(dir).is_ok()) {
        Some(dir) => Ok(dir.clone()),
        None => Err(NixNotFound::Nowhere { looked }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::chain;

    /// A directory holding a `nix` script (mode `mode`).
    fn with_nix(root: &Path, name: &str, mode: u32) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let nix = dir.join("nix");
        std::fs::write(&nix, "#!/bin/sh\necho 'nix (Nix) 2.99.0'\n").unwrap();
        std::fs::set_permissions(&nix, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    /// PATH of `path`, and `installers` after it.
    fn places(path: &[&Path], installers: &[&Path]) -> Places {
        Places {
            path: Some(std::env::join_paths(path).unwrap()),
            installers: installers.iter().map(|d| d.to_path_buf()).collect(),
        }
    }

    #[test]
    fn the_installers_dirs_are_in_a_login_shell_s_order() {
        let dirs = installer_dirs(Some(Path::new("/home/me")), Some("me"));
        assert_eq!(
            dirs,
            [
                Path::new("/home/me/.nix-profile/bin"),
                Path::new("/etc/profiles/per-user/me/bin"),
                Path::new("/nix/var/nix/profiles/default/bin"),
                Path::new("/run/current-system/sw/bin"),
            ]
        );
        assert_eq!(installer_dirs(None, None), dirs[2..]);
    }

    #[test]
    fn path_comes_first_then_the_installers_dirs_each_once() {
        let places = Places {
            path: Some("/usr/bin:relative:/bin:/usr/bin::/nix/b".into()),
            installers: vec!["/nix/a".into(), "/nix/b".into()],
        };
        assert_eq!(
            places.dirs(),
            [
                Path::new("/usr/bin"),
                Path::new("/bin"),
                Path::new("/nix/b"),
                Path::new("/nix/a")
            ]
        );
    }

    #[test]
    fn the_first_directory_with_an_executable_nix_wins() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let not_executable = with_nix(root.path(), "plain", 0o644);
        let first = with_nix(root.path(), "first", 0o755);
        let second = with_nix(root.path(), "second", 0o755);
        let found = find(
            None,
            &places(&[&empty, &not_executable], &[&first, &second]),
        );
        assert_eq!(found.unwrap(), first);
        let found = find(None, &places(&[&second], &[&first]));
        assert_eq!(found.unwrap(), second, "PATH first");
    }

    #[test]
    fn without_nix_anywhere_the_error_names_where_it_looked_and_the_key() {
        let root = tempfile::tempdir().unwrap();
        let (in_path, installer) = (root.path().join("a"), root.path().join("b"));
        let err = find(None, &places(&[&in_path], &[&installer])).unwrap_err();
        assert_eq!(
            chain(&err),
            format!(
                "cannot find `nix`: not in PATH nor where the Nix installers put it (looked in {}, {}); set `[nix] bin_dir` in reachd's configuration to the directory that holds it",
                in_path.display(),
                installer.display()
            )
        );
    }

    #[test]
    fn bin_dir_is_the_only_place_looked_at_and_must_hold_nix() {
        let root = tempfile::tempdir().unwrap();
        let good = with_nix(root.path(), "good", 0o755);
        let in_path = with_nix(root.path(), "in-path", 0o755);
        assert_eq!(find(Some(&good), &places(&[&in_path], &[])).unwrap(), good);
        let plain = with_nix(root.path(), "plain", 0o600);
        let file = good.join("nix");
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        for (dir, why) in [
            (root.path().join("gone"), "does not exist"),
            (file, "is not a directory"),
            (empty, "holds no `nix`"),
            (plain, "holds a `nix` that is not an executable file"),
        ] {
            let err = find(Some(&dir), &places(&[&in_path], &[])).unwrap_err();
            assert_eq!(
                chain(&err),
                format!("`[nix] bin_dir` {}: {why}", dir.display())
            );
        }
    }
}
