//! Files root runs on the user's behalf: the NetworkManager dispatcher hook and Nix's post-build
//! hook. Both must belong to root and be writable by nobody else, or anyone who can write them
//! runs code as root (and nm-dispatcher refuses such a hook anyway).

use std::fs::{self, Metadata};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Finding;

/// What every copy of the dispatcher hook contains, however it was installed: its call.
const HOOK_MARK: &str = "org.reachd.Reachd1 /org/reachd/Reachd1 org.reachd.Reachd1 Refresh";

/// The dispatcher hook: absent is fine (it is optional), present must be safe to run as root.
/// Absent from `path`, it is looked for among the other hooks of its directory: NixOS installs
/// it as `03userscript0001` (or the next number).
pub fn dispatcher_hook(path: &Path) -> Finding {
    let path = &renamed_hook(path).unwrap_or_else(|| path.to_path_buf());
    let shown = path.display();
    match fs::metadata(path) {
        Err(err) if err.kind() == ErrorKind::NotFound => Finding::ok(format!(
            "dispatcher hook {shown} not installed (optional: reachd follows NetworkManager itself; the hook only makes the agent look again at once on each event)"
        )),
        Err(err) => Finding::fail(
            format!("dispatcher hook {shown} cannot be read ({err})"),
            format!("`sudo install -m755 -o root -g root dispatcher/90-reachd {shown}`"),
        ),
        Ok(meta) => root_program_problem("dispatcher hook", path, Facts::from(&meta)).unwrap_or_else(|| {
            Finding::ok(format!(
                "dispatcher hook {shown} installed: root's, mode {:04o}",
                meta.mode() & 0o7777
            ))
        }),
    }
}

/// When nothing is at `path`, the file of its directory that carries the hook's call, if any.
fn renamed_hook(path: &Path) -> Option<PathBuf> {
    if fs::symlink_metadata(path).is_ok() {
        return None;
    }
    let mut found: Vec<PathBuf> = fs::read_dir(path.parent()?)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|hook| {
            // Hooks are small scripts; a large file is not one of reachd's.
            let small = fs::metadata(hook).is_ok_and(|m| m.is_file() && m.len() < 64 * 1024);
            small && fs::read_to_string(hook).is_ok_and(|text| text.contains(HOOK_MARK))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// What the checks need to know about a file: whether it is a regular file, its owner, its mode.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub is_file: bool,
    pub uid: u32,
    pub mode: u32,
}

impl From<&Metadata> for Facts {
    fn from(meta: &Metadata) -> Self {
        Facts {
            is_file: meta.is_file(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// What is wrong with `path` as a program root runs, if anything; `what` names it.
pub fn root_program_problem(what: &str, path: &Path, facts: Facts) -> Option<Finding> {
    let shown = path.display();
    let mode = facts.mode;
    if !facts.is_file {
        return Some(Finding::fail(
            format!("{what} {shown} is not a regular file"),
            format!(
                "install the program there: `sudo install -m755 -o root -g root PROGRAM {shown}`"
            ),
        ));
    }
    if facts.uid != 0 {
        return Some(Finding::fail(
            format!(
                "{what} {shown} belongs to uid {}, not root: whoever owns it can run code as root",
                facts.uid
            ),
            format!("`sudo chown root:root {shown}`"),
        ));
    }
    if mode & 0o022 != 0 {
        return Some(Finding::fail(
            format!("{what} {shown} is writable by group or others (mode {mode:04o}): they can run code as root"),
            format!("`sudo chmod go-w {shown}`"),
        ));
    }
    if mode & 0o100 == 0 {
        return Some(Finding::fail(
            format!("{what} {shown} is not executable (mode {mode:04o})"),
            format!("`sudo chmod 755 {shown}`"),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    const HOOK: &str = "/etc/NetworkManager/dispatcher.d/90-reachd";

    fn problem(uid: u32, mode: u32) -> Option<Finding> {
        let facts = Facts {
            is_file: true,
            uid,
            mode,
        };
        root_program_problem("dispatcher hook", Path::new(HOOK), facts)
    }

    #[test]
    fn a_missing_hook_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        let finding = dispatcher_hook(&dir.path().join("90-reachd"));
        assert_eq!(finding.level, Level::Ok, "{finding}");
        assert!(
            finding.what.contains("not installed (optional"),
            "{finding}"
        );
    }

    #[test]
    fn the_hook_s_mark_is_in_the_hook() {
        assert!(include_str!("../../dispatcher/90-reachd").contains(HOOK_MARK));
    }

    #[test]
    fn a_hook_installed_under_another_name_is_found_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("01-other");
        fs::write(&other, "#!/bin/sh\nexit 0\n").unwrap();
        let nixos = dir.path().join("03userscript0002");
        fs::write(&nixos, include_str!("../../dispatcher/90-reachd")).unwrap();
        fs::set_permissions(&nixos, fs::Permissions::from_mode(0o775)).unwrap();
        let finding = dispatcher_hook(&dir.path().join("90-reachd"));
        assert_eq!(finding.level, Level::Fail, "{finding}");
        assert!(
            finding
                .what
                .starts_with(&format!("dispatcher hook {} ", nixos.display())),
            "the renamed hook is the one checked: {finding}"
        );
    }

    #[test]
    fn a_root_owned_0755_hook_is_fine() {
        assert_eq!(problem(0, 0o755), None);
    }

    #[test]
    fn a_hook_others_can_write_is_named_with_chmod() {
        let finding = problem(0, 0o775).expect("a problem");
        assert_eq!(finding.level, Level::Fail);
        assert_eq!(
            finding.to_string(),
            format!("FAIL dispatcher hook {HOOK} is writable by group or others (mode 0775): they can run code as root; fix: `sudo chmod go-w {HOOK}`")
        );
    }

    #[test]
    fn a_hook_of_another_owner_is_named_with_chown() {
        let finding = problem(1000, 0o755).expect("a problem");
        assert!(finding.what.contains("belongs to uid 1000"), "{finding}");
        assert_eq!(
            finding.fix.unwrap(),
            format!("`sudo chown root:root {HOOK}`")
        );
    }

    #[test]
    fn a_hook_that_cannot_run_is_named() {
        let finding = problem(0, 0o644).expect("a problem");
        assert_eq!(finding.fix.unwrap(), format!("`sudo chmod 755 {HOOK}`"));
    }
}
