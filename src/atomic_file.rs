//! Writing a file whole or not at all, the one way both Nix wings do it: the nix.conf fragment
//! (a Nix command reading it concurrently must see the old or the new file, never half of one)
//! and the upload spool (either side may be killed at any moment). A new temporary file in the
//! same directory, created exclusively, written and fsynced, then renamed over the name; the
//! directory is fsynced to make the rename durable ([`sync_dir`], once for several files).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How every temporary file's name starts (`.tmp-<pid>-<ns>-<n>`), so that an owner can find
/// and remove those left by a writer that was killed.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The mode a written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly this, whatever the umask.
    Exact(u32),
    /// 0o666 less the umask, as `File::create` gives.
    Umask,
}

/// A step that failed, and on which file.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct WriteError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn failed<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> WriteError + 'p {
    move |source| WriteError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `name` in `dir` whole or not at all: a new temporary file in the same directory,
/// written and fsynced, then renamed over `name`. The caller fsyncs `dir` to make the rename
/// durable ([`sync_dir`]).
pub fn write(dir: &Path, name: &str, content: &[u8], mode: Mode) -> Result<(), WriteError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let create_mode = match mode {
        Mode::Exact(mode) => mode,
        Mode::Umask => 0o666,
    };
    let mut attempt = 0;
    let (temp, mut file) = loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // create_new: O_EXCL, so a name planted in a group-writable directory (even a symlink)
        // is never opened, only skipped.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(create_mode)
            .open(&temp)
        {
            Ok(file) => break (temp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(failed("create", &temp)(e)),
        }
    };
    let written = fill_and_rename(&mut file, &temp, &dir.join(name), content, mode);
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn fill_and_rename(
    file: &mut File,
    temp: &Path,
    target: &Path,
    content: &[u8],
    mode: Mode,
) -> Result<(), WriteError> {
    if let Mode::Exact(mode) = mode {
        // The umask may have cleared bits the caller needs (the spool's group write bit).
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(failed("set the mode of", temp))?;
    }
    file.write_all(content).map_err(failed("write", temp))?;
    file.sync_data().map_err(failed("fsync", temp))?;
    fs::rename(temp, target).map_err(failed("rename into place", target))
}

/// Makes the renames done in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(failed("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "f", b"old", Mode::Exact(0o640)).unwrap();
        write(dir.path(), "f", b"new", Mode::Exact(0o640)).unwrap();
        sync_dir(dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"new");
        let mode = fs::metadata(dir.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn a_failed_write_names_its_step_and_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = write(&missing, "f", b"x", Mode::Umask).unwrap_err();
        assert_eq!(err.action, "create");
        assert!(err.path.starts_with(&missing), "{}", err.path.display());
        let shown = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(names(dir.path()).is_empty());
    }
}
