//! The Debian package as a user installs it: `packaging/build-deb` builds it, dpkg installs it on
//! this machine, and every file must land where the distribution looks for it, owned by root
//! with the right mode; systemd's user-unit lookup must see the unit, man must read every page,
//! postinst must make the spool's group and the spool; then `dpkg --purge` must leave the machine
//! as it was.
//!
//! Root only. It fails, without touching anything, on a machine where the package or any file it
//! would install is already there (it would replace them), and it purges the package whatever
//! check fails. It uses fixed system paths: run it under the lab's lock, like the lab.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use reachd_testkit::lab::preflight::{fix_path, which};

const PACKAGE: &str = "reachd";
/// The spool postinst makes from the tmpfiles.d snippet.
const SPOOL: &str = "/var/spool/reachd";
/// Where postinst records what it made, for postrm.
const PACKAGE_STATE: &str = "/var/lib/reachd";
/// The group postinst makes from the sysusers.d snippet.
const GROUP: &str = "reachd";

/// Every file of the package but the man pages (one per page `reachd man` writes) and the
/// documents (one per docs/*.md), with its mode; all are owned by root:root.
const FILES: &[(&str, u32)] = &[
    ("/usr/bin/reachd", 0o755),
    ("/usr/bin/reachd-nix-upload", 0o755),
    ("/usr/lib/systemd/user/reachd.service", 0o644),
    (
        "/usr/share/dbus-1/services/org.reachd.Reachd1.service",
        0o644,
    ),
    ("/etc/NetworkManager/dispatcher.d/90-reachd", 0o755),
    ("/usr/lib/sysusers.d/reachd.conf", 0o644),
    ("/usr/lib/tmpfiles.d/reachd.conf", 0o644),
    ("/usr/share/bash-completion/completions/reachd", 0o644),
    ("/usr/share/zsh/vendor-completions/_reachd", 0o644),
    ("/usr/share/fish/vendor_completions.d/reachd.fish", 0o644),
    ("/usr/share/doc/reachd/README.md", 0o644),
    ("/usr/share/doc/reachd/copyright", 0o644),
    (
        "/usr/share/doc/reachd/examples/rpi-accessible.target",
        0o644,
    ),
    ("/usr/share/doc/reachd/examples/rpi-mount.service", 0o644),
    (
        "/usr/share/doc/reachd/examples/rpi-nix-tunnel.service",
        0o644,
    ),
];

/// Installed files that are the repository's own, byte for byte.
const COPIES: &[(&str, &str)] = &[
    (
        "/usr/share/dbus-1/services/org.reachd.Reachd1.service",
        "systemd/org.reachd.Reachd1.service",
    ),
    (
        "/etc/NetworkManager/dispatcher.d/90-reachd",
        "dispatcher/90-reachd",
    ),
    (
        "/usr/lib/sysusers.d/reachd.conf",
        "systemd/sysusers.d/reachd.conf",
    ),
    (
        "/usr/lib/tmpfiles.d/reachd.conf",
        "systemd/tmpfiles.d/reachd.conf",
    ),
    ("/usr/share/doc/reachd/README.md", "README.md"),
    (
        "/usr/share/doc/reachd/examples/rpi-nix-tunnel.service",
        "systemd/rpi-nix-tunnel.service",
    ),
];

/// Programs the test runs, with the Debian package that provides each.
const PROGRAMS: &[(&str, &str)] = &[
    ("dpkg", "dpkg"),
    ("dpkg-deb", "dpkg"),
    ("dpkg-query", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("man", "man-db"),
    ("systemctl", "systemd"),
    ("systemd-analyze", "systemd"),
    ("systemd-sysusers", "systemd"),
    ("systemd-tmpfiles", "systemd"),
    ("getent", "libc-bin"),
    ("bash", "bash"),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `command`, which must succeed; its stdout.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn output(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Fails unless the test can run here: root, the programs, cargo-deb.
fn require_tools() {
    assert!(
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() } == 0,
        "the package test installs a .deb with dpkg: run it as root"
    );
    fix_path();
    for (program, package) in PROGRAMS {
        assert!(
            which(program).is_some(),
            "`{program}` not found: install the Debian package {package} (tests/run installs \
             what the tests need)"
        );
    }
    let cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        cargo_deb.is_ok_and(|o| o.status.success()),
        "cargo-deb not found: cargo install --locked cargo-deb (tests/run installs it)"
    );
}

/// dpkg's state of the package: "installed", "config-files", ..., or "" when dpkg knows none.
fn package_status() -> String {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", PACKAGE]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn group_exists() -> bool {
    output(Command::new("getent").args(["group", GROUP]))
        .status
        .success()
}

/// The .deb's contents: regular files and directories, as absolute paths.
struct Contents {
    files: BTreeSet<String>,
    dirs: BTreeSet<String>,
}

impl Contents {
    fn of(deb: &Path) -> Contents {
        let listing = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
        let mut contents = Contents {
            files: BTreeSet::new(),
            dirs: BTreeSet::new(),
        };
        for line in listing.lines() {
            let kind = line.chars().next();
            let path = line.split_whitespace().last().expect("a path per line");
            let path = path.trim_start_matches('.').trim_end_matches('/');
            match kind {
                Some('-') => contents.files.insert(path.to_string()),
                Some('d') if !path.is_empty() => contents.dirs.insert(path.to_string()),
                _ if path.is_empty() => false,
                _ => panic!("the package has neither a file nor a directory: {line}"),
            };
        }
        contents
    }
}

/// The machine as the package could change it, read before installing and after purging.
#[derive(Debug, PartialEq)]
struct Footprint {
    existing_dirs: BTreeSet<String>,
    group: bool,
}

impl Footprint {
    fn read(contents: &Contents) -> Footprint {
        Footprint {
            existing_dirs: contents
                .dirs
                .iter()
                .filter(|d| Path::new(d).exists())
                .cloned()
                .collect(),
            group: group_exists(),
        }
    }
}

/// The installed package: purged when dropped, so that a failed check does not leave it.
struct Installed {
    purged: bool,
}

impl Installed {
    fn new(deb: &Path) -> Installed {
        let installed = Installed { purged: false };
        run(Command::new("dpkg").arg("--install").arg(deb));
        installed
    }

    fn purge(&mut self) {
        self.purged = true;
        run(Command::new("dpkg").args(["--purge", PACKAGE]));
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        }
    }
}

/// The man pages the CLI writes, by file name (`reachd.1`, `reachd-status.1`, ...).
fn man_pages() -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    run(Command::new(env!("CARGO_BIN_EXE_reachd"))
        .arg("man")
        .arg(dir.path()));
    let mut pages: Vec<String> = fs::read_dir(dir.path())
        .expect("the man pages' directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    pages.sort();
    assert!(pages.len() > 5, "reachd man wrote too few pages: {pages:?}");
    for page in ["reachd.1", "reachd.toml.5", "reachd-nix-upload.8"] {
        assert!(
            pages.iter().any(|p| p == page),
            "reachd man wrote no {page}: {pages:?}"
        );
    }
    pages
}

/// Where the package puts man page `page` (`reachd.1`, `reachd.toml.5`, ...): by its section.
fn man_path(page: &str) -> String {
    let (_, section) = page
        .rsplit_once('.')
        .expect("a man page's name ends in its section");
    format!("/usr/share/man/man{section}/{page}.gz")
}

/// The documents the package installs (every docs/*.md, which README.md links to), each with
/// the repository file it copies.
fn documents() -> Vec<(String, String)> {
    let mut documents: Vec<(String, String)> = fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| {
            (
                format!("/usr/share/doc/reachd/docs/{name}"),
                format!("docs/{name}"),
            )
        })
        .collect();
    documents.sort();
    assert!(
        documents.len() > 5,
        "too few documents in docs/: {documents:?}"
    );
    documents
}

/// Fails, touching nothing, where the package or one of its files or state is already there.
fn require_clean_machine(contents: &Contents) {
    let status = package_status();
    assert!(
        status.is_empty() || status == "not-installed",
        "dpkg has package {PACKAGE} here ({status}): the package test would replace it; \
         run it where reachd is not installed (dpkg --purge {PACKAGE})"
    );
    for path in contents
        .files
        .iter()
        .map(String::as_str)
        .chain([SPOOL, PACKAGE_STATE])
    {
        assert!(
            !Path::new(path).exists(),
            "{path} exists: reachd is installed here otherwise; the package test would replace \
             it, so it runs only on a machine without it"
        );
    }
}

/// "UID:GID MODE", the mode in octal with its setgid bit, for messages one can read.
fn ownership(meta: &fs::Metadata) -> String {
    format!("{}:{} {:o}", meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// Owner root:root and `mode` for every installed file.
fn check_owners_and_modes(pages: &[String]) {
    let expected = FILES
        .iter()
        .map(|&(path, mode)| (path.to_string(), mode))
        .chain(pages.iter().map(|p| (man_path(p), 0o644)))
        .chain(documents().into_iter().map(|(path, _)| (path, 0o644)));
    for (path, mode) in expected {
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(meta.is_file(), "{path} is not a regular file");
        assert_eq!(ownership(&meta), format!("0:0 {mode:o}"), "{path}");
    }
}

/// The unit is the repository's with /usr/bin/reachd in ExecStart and ExecReload, and systemd's
/// user-unit lookup finds it and accepts it (its syntax, and that its commands are executables).
fn check_unit() {
    let unit = "/usr/lib/systemd/user/reachd.service";
    let source = fs::read_to_string(repo().join("systemd/reachd.service")).expect("the unit");
    let mut expected = source.clone();
    for (from, to) in [
        (
            "ExecStart=%h/.cargo/bin/reachd run",
            "ExecStart=/usr/bin/reachd run",
        ),
        (
            "ExecReload=%h/.cargo/bin/reachd reload",
            "ExecReload=/usr/bin/reachd reload",
        ),
    ] {
        assert!(source.contains(from), "systemd/reachd.service runs {from}");
        expected = expected.replace(from, to);
    }
    assert_eq!(fs::read_to_string(unit).expect("the unit"), expected);
    let state =
        output(Command::new("systemctl").args(["--global", "is-enabled", "reachd.service"]));
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "disabled",
        "systemctl --global sees the user unit, not enabled by the package: {state:?}"
    );
    // By name: the user manager's search path must find it. A user manager needs a runtime
    // directory even to only load units.
    let runtime = tempfile::tempdir().expect("temp dir");
    let verify = output(
        Command::new("systemd-analyze")
            .args(["--user", "verify", "reachd.service"])
            .env("XDG_RUNTIME_DIR", runtime.path()),
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze --user verify reachd.service: {verify:?}"
    );
}

/// man finds every page by name and renders it without a warning; the completions are the
/// installed binary's own.
fn check_man_pages_and_completions(pages: &[String]) {
    for page in pages {
        let (name, _section) = page.rsplit_once('.').expect("a man page's section");
        let found = run(Command::new("man").args(["-w", name]));
        assert_eq!(found.trim(), man_path(page), "man -w {name}");
        let rendered = output(
            Command::new("man")
                .args(["--warnings", "-l"])
                .arg(man_path(page))
                .env("MANWIDTH", "80"),
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            rendered.status.success() && rendered.stderr.is_empty(),
            "man -l {}: {rendered:?}",
            man_path(page)
        );
        assert!(
            text.contains("NAME") && text.contains(name),
            "{page} names {name}: {text}"
        );
    }
    for (shell, path) in [
        ("bash", "/usr/share/bash-completion/completions/reachd"),
        ("zsh", "/usr/share/zsh/vendor-completions/_reachd"),
        ("fish", "/usr/share/fish/vendor_completions.d/reachd.fish"),
    ] {
        let generated = run(Command::new("/usr/bin/reachd").args(["completions", shell]));
        assert_eq!(
            fs::read_to_string(path).expect("the completion"),
            generated,
            "{path} is `reachd completions {shell}`"
        );
    }
    run(Command::new("bash")
        .arg("-n")
        .arg("/usr/share/bash-completion/completions/reachd"));
}

/// postinst made the group (a system group) and the spool as the tmpfiles.d snippet says.
fn check_group_and_spool() {
    let entry = run(Command::new("getent").args(["group", GROUP]));
    let gid: u32 = entry
        .split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("group entry {entry}"));
    assert!(gid < 1000, "{GROUP} is a system group: {entry}");
    for (dir, mode) in [
        (SPOOL.to_string(), 0o750),
        (format!("{SPOOL}/incoming"), 0o2770),
        (format!("{SPOOL}/hosts"), 0o2770),
    ] {
        let meta = fs::metadata(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir} is a directory");
        assert_eq!(ownership(&meta), format!("0:{gid} {mode:o}"), "{dir}");
    }
}

#[test]
fn the_debian_package_installs_every_file_in_place_and_purges_without_a_trace() {
    require_tools();
    let started = Instant::now();
    let built = run(Command::new(repo().join("packaging/build-deb")).current_dir(repo()));
    let deb = Path::new(built.lines().last().expect("build-deb prints the .deb")).to_path_buf();
    let build_time = started.elapsed();
    let contents = Contents::of(&deb);
    let pages = man_pages();
    let expected: BTreeSet<String> = FILES
        .iter()
        .map(|(path, _)| path.to_string())
        .chain(pages.iter().map(|p| man_path(p)))
        .chain(documents().into_iter().map(|(path, _)| path))
        .collect();
    assert_eq!(contents.files, expected, "the package's files");
    let control = run(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Depends"));
    assert!(
        control.contains("libc6") && control.contains("systemd"),
        "Depends: {control}"
    );
    require_clean_machine(&contents);
    let before = Footprint::read(&contents);

    let started = Instant::now();
    let mut installed = Installed::new(&deb);
    let install_time = started.elapsed();
    assert_eq!(package_status(), "installed");
    check_owners_and_modes(&pages);
    let copies = COPIES
        .iter()
        .map(|&(installed, source)| (installed.to_string(), source.to_string()))
        .chain(documents());
    for (installed_path, source) in copies {
        assert_eq!(
            fs::read(&installed_path).expect("an installed file"),
            fs::read(repo().join(&source)).expect("a repository file"),
            "{installed_path} is {source}"
        );
    }
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(
        conffiles.contains("/etc/NetworkManager/dispatcher.d/90-reachd"),
        "the dispatcher hook is a conffile: {conffiles}"
    );
    assert_eq!(
        run(Command::new("/usr/bin/reachd").arg("--version")).trim(),
        format!("reachd {}", env!("CARGO_PKG_VERSION"))
    );
    check_unit();
    check_man_pages_and_completions(&pages);
    check_group_and_spool();

    let started = Instant::now();
    installed.purge();
    let purge_time = started.elapsed();
    let status = package_status();
    assert!(
        status.is_empty() || status == "not-installed",
        "dpkg still has {PACKAGE}: {status}"
    );
    for path in contents
        .files
        .iter()
        .map(String::as_str)
        .chain([SPOOL, PACKAGE_STATE])
    {
        assert!(!Path::new(path).exists(), "{path} left behind by the purge");
    }
    assert_eq!(
        Footprint::read(&contents),
        before,
        "directories and the {GROUP} group as before the install"
    );
    eprintln!(
        "package: built in {build_time:.1?}, installed in {install_time:.1?}, purged in \
         {purge_time:.1?}; {} files",
        contents.files.len()
    );
}
