//! Nix's configuration files, read as text the way Nix reads them, so that `reachd doctor` can
//! say what the nix-daemon and the user's commands will see: one setting per line,
//! `name = value words`, `#` starting a comment, `include PATH` and `!include PATH` (the latter
//! ignoring a missing file) relative to the including file's directory, and `extra-NAME`
//! appending to `NAME`. Reading never runs Nix.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};

/// How deep includes may nest before the doctor stops following them (a loop).
const MAX_DEPTH: usize = 16;

/// One meaningful line of a nix.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `include PATH` (`optional: false`) or `!include PATH`.
    Include { path: String, optional: bool },
    /// `name = words...`.
    Setting { name: String, words: Vec<String> },
}

/// The lines of one file, each with its number, or what Nix would say about a line it refuses.
pub fn parse(text: &str) -> Vec<(usize, Result<Line, String>)> {
    let mut lines = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("");
        let tokens: Vec<&str> = content.split_whitespace().collect();
        if tokens.is_empty() {
            continue;
        }
        let illegal = || Err(format!("illegal configuration line {:?}", raw.trim()));
        let line = match tokens[..] {
            [word, path] if word == "include" || word == "!include" => Ok(Line::Include {
                path: path.to_string(),
                optional: word == "!include",
            }),
            ["include" | "!include", ..] => illegal(),
            [name, "=", ref words @ ..] => Ok(Line::Setting {
                name: name.to_string(),
                words: words.iter().map(|w| w.to_string()).collect(),
            }),
            _ => illegal(),
        };
        lines.push((index + 1, line));
    }
    lines
}

/// An include line met while reading, with the file it names resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The file that holds the line, and the line's number.
    pub from: PathBuf,
    pub line: usize,
    /// The included file, absolute and without `.` or `..`.
    pub path: PathBuf,
    pub optional: bool,
}

/// What a nix.conf and the files it includes add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixConf {
    settings: BTreeMap<String, Vec<String>>,
    /// Every include line, in the order Nix meets them.
    pub includes: Vec<Include>,
    /// Lines Nix would refuse, and included files it would not find: `FILE:LINE: what`.
    pub problems: Vec<String>,
}

impl NixConf {
    /// Reads `path` and what it includes. The file itself must exist.
    pub fn read(path: &Path) -> io::Result<NixConf> {
        let text = std::fs::read_to_string(path)?;
        let mut conf = NixConf::default();
        conf.apply(path, &text, 0);
        Ok(conf)
    }

    /// The value of setting `name` (its words; none when unset).
    pub fn get(&self, name: &str) -> &[String] {
        self.settings.get(name).map_or(&[], Vec::as_slice)
    }

    /// Whether setting `name` is set at all (to an empty value, too).
    pub fn is_set(&self, name: &str) -> bool {
        self.settings.contains_key(name)
    }

    /// Applies the text of `file` (already read), following its includes.
    pub fn apply(&mut self, file: &Path, text: &str, depth: usize) {
        for (number, line) in parse(text) {
            let at = format!("{}:{number}", file.display());
            match line {
                Err(why) => self.problems.push(format!("{at}: {why}")),
                Ok(Line::Setting { name, words }) => match name.strip_prefix("extra-") {
                    Some(base) => self.settings.entry(base.into()).or_default().extend(words),
                    None => {
                        self.settings.insert(name, words);
                    }
                },
                Ok(Line::Include { path, optional }) => {
                    let dir = file.parent().unwrap_or(Path::new("/"));
                    let path = normalize(&dir.join(path));
                    self.includes.push(Include {
                        from: file.to_path_buf(),
                        line: number,
                        path: path.clone(),
                        optional,
                    });
                    if depth >= MAX_DEPTH {
                        self.problems
                            .push(format!("{at}: includes nested too deep (a loop?)"));
                        continue;
                    }
                    match std::fs::read_to_string(&path) {
                        Ok(text) => self.apply(&path, &text, depth + 1),
                        Err(err) if err.kind() == io::ErrorKind::NotFound && optional => {}
                        Err(err) => self.problems.push(format!(
                            "{at}: included file {} cannot be read: {err}",
                            path.display()
                        )),
                    }
                }
            }
        }
    }

    /// The include lines (from this file or the files it includes) that name `path`.
    pub fn includes_of(&self, path: &Path) -> Vec<&Include> {
        let path = normalize(path);
        self.includes.iter().filter(|i| i.path == path).collect()
    }
}

/// `path` without `.` and `..` components (lexically, as Nix's `absPath` does).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_includes_and_comments_are_read_as_nix_reads_them() {
        let lines = parse(
            "# a comment\n\
             trusted-substituters = http://127.0.0.1:37515 https://cache.example # trailing\n\
             \n\
             !include /run/user/1000/reachd/nix.conf\n\
             include   other.conf\n\
             substituters =\n",
        );
        let got: Vec<_> = lines.into_iter().map(|(n, l)| (n, l.unwrap())).collect();
        let setting = |name: &str, words: &[&str]| Line::Setting {
            name: name.into(),
            words: words.iter().map(|w| w.to_string()).collect(),
        };
        assert_eq!(
            got,
            [
                (
                    2,
                    setting(
                        "trusted-substituters",
                        &["http://127.0.0.1:37515", "https://cache.example"]
                    )
                ),
                (
                    4,
                    Line::Include {
                        path: "/run/user/1000/reachd/nix.conf".into(),
                        optional: true
                    }
                ),
                (
                    5,
                    Line::Include {
                        path: "other.conf".into(),
                        optional: false
                    }
                ),
                (6, setting("substituters", &[])),
            ]
        );
    }

    #[test]
    fn lines_nix_refuses_are_reported() {
        let lines = parse("trusted-substituters http://x\n!include a b\ninclude\n");
        assert_eq!(lines.len(), 3);
        for (_, line) in lines {
            assert!(line.unwrap_err().starts_with("illegal configuration line"));
        }
    }

    #[test]
    fn includes_are_followed_relative_to_their_file_and_extra_appends() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("nix.conf");
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(
            &main,
            "trusted-substituters = http://a\ninclude d/more.conf\n!include ./absent.conf\ninclude gone.conf\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("d/more.conf"),
            "extra-trusted-substituters = http://b\npost-build-hook = /usr/local/bin/reachd-nix-upload\n",
        )
        .unwrap();
        let conf = NixConf::read(&main).unwrap();
        assert_eq!(conf.get("trusted-substituters"), ["http://a", "http://b"]);
        assert_eq!(
            conf.get("post-build-hook"),
            ["/usr/local/bin/reachd-nix-upload"]
        );
        assert_eq!(conf.get("secret-key-files"), [] as [String; 0]);
        assert_eq!(conf.includes.len(), 3);
        assert_eq!(conf.includes_of(&dir.path().join("absent.conf")).len(), 1);
        assert!(conf.includes_of(&dir.path().join("absent.conf"))[0].optional);
        // A missing file without `!` is what Nix fails on; a missing optional one is not.
        assert_eq!(conf.problems.len(), 1, "{:?}", conf.problems);
        assert!(
            conf.problems[0].contains("gone.conf"),
            "{:?}",
            conf.problems
        );
        assert!(conf.problems[0].starts_with(&format!("{}:4: ", main.display())));
    }

    #[test]
    fn a_later_plain_setting_replaces_an_earlier_one() {
        let mut conf = NixConf::default();
        conf.apply(
            Path::new("/etc/nix/nix.conf"),
            "trusted-substituters = http://a\ntrusted-substituters = http://b\n",
            0,
        );
        assert_eq!(conf.get("trusted-substituters"), ["http://b"]);
    }

    #[test]
    fn an_include_loop_ends() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("nix.conf");
        std::fs::write(&main, "include nix.conf\n").unwrap();
        let conf = NixConf::read(&main).unwrap();
        assert!(
            conf.problems.iter().any(|p| p.contains("nested too deep")),
            "{:?}",
            conf.problems
        );
    }
}
