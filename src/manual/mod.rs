//! The manual pages `reachd man DIR` writes: reachd(1) and one page per command, generated from
//! the CLI's own definition (so they cannot disagree with it) with the EXIT STATUS and FILES
//! sections clap cannot know, and the two pages that describe no command line, reachd.toml(5)
//! and reachd-nix-upload(8), kept as roff beside this module. A test checks that reachd.toml(5)
//! names every key the configuration accepts.

use std::io;
use std::path::Path;

/// The configuration file's page.
pub const CONFIG_PAGE: &str = include_str!("reachd.toml.5");

/// The post-build hook's page.
pub const HOOK_PAGE: &str = include_str!("reachd-nix-upload.8");

/// Files the agent and the commands that read its configuration use.
const CONFIG_FILES: &str = r#".TP
.I $XDG_CONFIG_HOME/reachd/config.toml
The configuration, when \fB\-\-config\fR is not given (\fBreachd.toml\fR(5)); without it the
embedded default (host rpi, rpi.local, rpi\-accessible.target).
.TP
.I $XDG_RUNTIME_DIR/reachd/nix.conf
The nix.conf fragment naming the hosts' caches while they answer.
.TP
.I /var/spool/reachd
The upload spool (\fB[nix] spool\fR), written by \fBreachd\-nix\-upload\fR(8).
"#;

/// The EXIT STATUS and FILES sections of command `name`'s page ("reachd" for the top page).
fn extra_sections(name: &str) -> String {
    let (status, files) = match name {
        "reachd" => (
            "0 on success. 1: \\fBrun\\fR: the agent failed (systemd restarts it); \\fBcheck\\fR: \
             the host is not reachable; \\fBdoctor\\fR: a check failed; \\fBuploads \\-\\-wait\\fR: \
             timed out. 2: cannot tell (the agent is not running, an unknown host, a bad \
             configuration, a file that cannot be read or written). Each command's page says \
             which apply.",
            Some(CONFIG_FILES),
        ),
        "reachd-run" => (
            "0 when stopped by SIGTERM or SIGINT, or after \\fB\\-\\-check\\-config\\fR printed a \
             valid configuration. 1 when the agent failed, at its start (no session bus, \
             another agent holds its name) or while running (systemd restarts it). 2 when the \
             configuration is refused.",
            Some(CONFIG_FILES),
        ),
        "reachd-status" => (
            "0 once printed. 2 when the agent is not running, the host is unknown, or (with \
             \\fB\\-\\-watch\\fR) when the agent goes away.",
            None,
        ),
        "reachd-check" => (
            "0 when the agent holds the host reachable, 1 when it does not, 2 when it cannot \
             tell (the agent is not running, the host is unknown).",
            None,
        ),
        "reachd-refresh" | "reachd-reload" => (
            "0 once the agent was asked. 2 when the agent is not running.",
            None,
        ),
        "reachd-doctor" => (
            "0 when no check failed (warnings, such as a host away from home or the agent not \
             running, do not count). 1 when one failed; its line says how to fix it.",
            Some(CONFIG_FILES),
        ),
        "reachd-uploads" => (
            "0 once listed, or with \\fB\\-\\-wait\\fR once nothing waits. 1 when \
             \\fB\\-\\-timeout\\fR ran out. 2 when no host uploads or the spool cannot be read.",
            Some(CONFIG_FILES),
        ),
        "reachd-completions" => ("0 once written. 1 when stdout cannot be written.", None),
        "reachd-man" => ("0 once written. 2 when a page cannot be written.", None),
        _ => ("0 on success, 2 when it cannot tell.", None),
    };
    let mut text = format!(".SH \"EXIT STATUS\"\n{status}\n");
    if let Some(files) = files {
        text.push_str(".SH FILES\n");
        text.push_str(files);
    }
    text
}

/// Writes reachd.1 and reachd-COMMAND.1 for each subcommand of `cli`, reachd.toml.5 and
/// reachd-nix-upload.8 into `dir`.
pub fn write(dir: &Path, cli: clap::Command) -> io::Result<()> {
    let mut pages = vec![("reachd".to_string(), cli.clone())];
    for sub in cli.get_subcommands() {
        let name = format!("reachd-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut generated = Vec::new();
        clap_mangen::Man::new(page).render(&mut generated)?;
        let generated = String::from_utf8(generated)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        write_page(dir, &format!("{name}.1"), &with_sections(&generated, &name))?;
    }
    write_page(dir, "reachd.toml.5", CONFIG_PAGE)?;
    write_page(dir, "reachd-nix-upload.8", HOOK_PAGE)
}

/// `page` with EXIT STATUS and FILES before its VERSION section (or at its end).
fn with_sections(page: &str, name: &str) -> String {
    let extra = extra_sections(name);
    match page.find(".SH VERSION") {
        Some(at) => format!("{}{extra}{}", &page[..at], &page[at..]),
        None => format!("{page}{extra}"),
    }
}

fn write_page(dir: &Path, file: &str, text: &str) -> io::Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, text)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys serde accepts in the table `table` (its error for an unknown key lists them).
    fn accepted_keys(toml: &str) -> Vec<String> {
        let error = crate::config::parse(toml, "t.toml")
            .expect_err("an unknown key is refused")
            .to_string();
        // serde: "expected `a` or `b`", "expected one of `a`, `b`, `c`".
        let list = error
            .split_once("expected ")
            .unwrap_or_else(|| panic!("no key list in {error:?}"))
            .1;
        let list = list.strip_prefix("one of ").unwrap_or(list);
        list.split(", ")
            .flat_map(|keys| keys.split(" or "))
            .map(|key| key.trim_matches(|c| c == '`' || c == ' ').to_string())
            .collect()
    }

    #[test]
    fn the_configuration_page_names_every_key_the_configuration_accepts() {
        let host = "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\n";
        let tables = [
            ("", "nokey = 1\n".to_string()),
            ("[[host]]", "[[host]]\nnokey = 1\n".to_string()),
            ("[host.nix]", format!("{host}[host.nix]\nnokey = 1\n")),
            (
                "[host.builder]",
                format!("{host}[host.builder]\nnokey = 1\n"),
            ),
            ("[nix]", "[nix]\nnokey = 1\n".to_string()),
            ("[probe]", "[probe]\nnokey = 1\n".to_string()),
            ("[notify]", "[notify]\nnokey = 1\n".to_string()),
        ];
        for (table, toml) in tables {
            let keys = accepted_keys(&toml);
            assert!(!keys.is_empty(), "{table}: {keys:?}");
            for key in keys {
                // A table has its own section; a key its own paragraph.
                let heading = match (table, key.as_str()) {
                    ("", "host") => ".SH \"[[host]]\"".to_string(),
                    ("", _) => format!(".SH \"[{key}]\""),
                    ("[[host]]", "nix") => ".SH \"[host.nix]\"".to_string(),
                    ("[[host]]", "builder") => ".SH \"[host.builder]\"".to_string(),
                    _ => format!(".BR {key} "),
                };
                assert!(
                    CONFIG_PAGE.contains(&heading),
                    "reachd.toml.5 does not describe {table} key {key:?} (no {heading:?})"
                );
            }
        }
    }

    #[test]
    fn generated_pages_gain_exit_status_and_files_before_their_version() {
        let page = ".TH x 1\n.SH NAME\nx\n.SH VERSION\nv1\n";
        let text = with_sections(page, "reachd-run");
        let status = text.find(".SH \"EXIT STATUS\"").expect("EXIT STATUS");
        let files = text.find(".SH FILES").expect("FILES");
        let version = text.find(".SH VERSION").expect("VERSION");
        assert!(status < files && files < version, "{text}");
        assert!(!with_sections(page, "reachd-check").contains(".SH FILES"));
    }
}
