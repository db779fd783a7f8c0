//! The `reachd` command: wires the library up and maps outcomes to exit codes. Nothing here
//! decides anything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use reachd::client::{Client, ClientError};
use reachd::upload::listing::{self, Listing};
use reachd::{agent, config, doctor, logging};

/// Keeps systemd user targets started exactly while LAN hosts are reachable.
///
/// reachd follows NetworkManager, finds each configured host by mDNS, checks that it answers,
/// and starts `<host>-accessible.target` (or the configured target) while it does, stopping it
/// when the host or the network goes away. Its state is on the session bus as
/// org.reachd.Reachd1.
#[derive(Parser)]
#[command(name = "reachd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what reachd.service runs).
    ///
    /// Without --config it reads $XDG_CONFIG_HOME/reachd/config.toml, or runs the embedded
    /// default (host "rpi", rpi.local, rpi-accessible.target) when that file does not exist.
    /// SIGHUP (`systemctl --user reload reachd`) reads the file again and applies it without a
    /// restart; a bad file is refused and logged, the running configuration kept.
    Run {
        /// Configuration file (TOML); it must exist.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Check the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Print each host's state as the running agent holds it.
    Status {
        /// Print JSON: {"hosts": [{"name", "reachable", "state", "address", ...}]}; with
        /// --watch, one host object per line.
        #[arg(long)]
        json: bool,
        /// Print every host, then one line per change as the agent signals it (no polling);
        /// exit 2 when the agent goes away. For status bars.
        #[arg(long)]
        watch: bool,
    },
    /// Exit 0 if the agent holds HOST reachable, 1 if not; 2 with a message if it cannot tell.
    ///
    /// Instant: it reads the agent's state and does not probe. Replaces `rpi-available`.
    Check {
        /// The host's name in the configuration (e.g. rpi).
        host: String,
    },
    /// Ask the running agent to re-evaluate every host now (what the dispatcher hook calls).
    Refresh,
    /// Check the whole set-up and say, per line, ok or what is wrong and how to fix it.
    ///
    /// In order: NetworkManager, the systemd user manager, the agent, the configuration (as
    /// `run` finds it), each host's target and the units bound to it, each host answering now
    /// (one real check, as the agent makes it), the dispatcher hook and, for hosts with
    /// [host.nix], Nix: the fragment's `!include`, `trusted-substituters`, the post-build hook,
    /// the spool and the signing keys. Nix's files are found as Nix finds them ($NIX_CONF_DIR,
    /// $NIX_USER_CONF_FILES, $XDG_CONFIG_HOME). Exit 0 when nothing failed (a host away or an
    /// agent not running are warnings), 1 otherwise.
    Doctor {
        /// Configuration file (TOML); it must exist.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Print shell completions for reachd (bash, zsh, fish, elvish, powershell).
    ///
    /// Generated from the command's own definition, e.g. for a package:
    /// `reachd completions bash > /usr/share/bash-completion/completions/reachd`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (reachd.1, reachd-status.1, ...) into DIR.
    ///
    /// Generated from the command's own definition, for packages.
    Man {
        /// Where to write them (it must exist).
        dir: PathBuf,
    },
    /// List the builds waiting for upload to each host with `upload = true`, from the spool.
    ///
    /// Reads the spool named by the configuration (as `run` finds it), not the agent: it works
    /// whether or not the agent runs. Exit 0; 2 if the spool cannot be read.
    Uploads {
        /// Configuration file (TOML); it must exist.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Return only when nothing waits any more (exit 0), for scripts.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 1).
        #[arg(long, value_name = "SECONDS", requires = "wait")]
        timeout: Option<u64>,
    },
}

/// Exit code when the CLI cannot tell (agent not running, unknown host, bad config...).
const CANNOT_TELL: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("reachd: cannot start the async runtime: {err}");
            return ExitCode::from(CANNOT_TELL);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                check_config,
            } => run(config, check_config).await,
            Command::Status { json, watch: false } => report(status(json).await),
            Command::Status { json, watch: true } => watch(json).await,
            Command::Check { host } => match check(&host).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(err) => report(Err(err)),
            },
            Command::Refresh => report(refresh().await),
            Command::Completions { shell } => {
                // Into memory first: clap_complete panics when its writer fails (a closed pipe).
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "reachd", &mut script);
                match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(_) => ExitCode::from(1),
                }
            }
            Command::Doctor { config } => doctor(config).await,
            Command::Man { dir } => man_pages(&dir),
            Command::Uploads {
                config,
                wait,
                timeout,
            } => uploads(config, wait.then(|| timeout.map(Duration::from_secs))).await,
        }
    })
}

fn report(result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reachd: {err}");
            ExitCode::from(CANNOT_TELL)
        }
    }
}

async fn run(path: Option<PathBuf>, check_only: bool) -> ExitCode {
    let (config, source) = match config::load(path.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("reachd: {err}");
            return ExitCode::from(CANNOT_TELL);
        }
    };
    if check_only {
        println!("{source}: OK");
        if config.hosts.iter().any(|h| h.upload.is_some()) {
            println!("upload spool: {}", config.spool.display());
        }
        for host in &config.hosts {
            println!(
                "host {}: {} -> {}{}{}{}{}",
                host.name,
                host.hostname,
                host.target,
                host.port
                    .map(|p| format!(", TCP port {p}"))
                    .unwrap_or_default(),
                if host.connections.is_empty() {
                    String::new()
                } else {
                    format!(", only on {}", host.connections.join(", "))
                },
                match &host.nix {
                    None => String::new(),
                    Some(cache @ config::NixCache::Served { daemon_socket, .. }) => format!(
                        ", Nix cache {} served from the daemon at {daemon_socket}",
                        cache.substituter()
                    ),
                    Some(cache) => format!(", Nix cache {}", cache.substituter()),
                },
                host.upload
                    .as_ref()
                    .map(|store| format!(", builds uploaded to {store}"))
                    .unwrap_or_default(),
            );
        }
        return ExitCode::SUCCESS;
    }
    logging::init();
    tracing::info!("configuration: {source}");
    // Before the agent takes its name: SIGHUP's default action would end it.
    let reloads = match reload_requests() {
        Ok(reloads) => reloads,
        Err(err) => {
            tracing::error!("cannot catch SIGHUP for reloads: {err}");
            return ExitCode::FAILURE;
        }
    };
    let environment = agent::Environment {
        config_file: path,
        ..agent::Environment::from_process()
    };
    let control = agent::Control {
        shutdown: shutdown_signal(),
        reloads,
    };
    match agent::run(config, environment, control).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP (`systemctl --user reload reachd`), one item per signal.
fn reload_requests() -> std::io::Result<impl futures_util::Stream<Item = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup())?;
    Ok(futures_util::stream::unfold(
        hangups,
        |mut hangups| async move { hangups.recv().await.map(|()| ((), hangups)) },
    ))
}

/// SIGTERM (how systemd stops services) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!("cannot catch SIGTERM/SIGINT ({err}); stop reachd with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

async fn status(json: bool) -> Result<(), ClientError> {
    let hosts = Client::connect().await?.hosts().await?;
    if json {
        let doc = serde_json::json!({ "hosts": hosts });
        println!("{doc}");
        return Ok(());
    }
    for host in &hosts {
        println!("{}", status_line(host));
    }
    Ok(())
}

/// `reachd status --watch`: ends only when the agent goes away (or cannot be read): exit 2.
async fn watch(json: bool) -> ExitCode {
    let watched = async {
        Client::connect()
            .await?
            .watch(|host| {
                let line = if json {
                    serde_json::to_string(host).unwrap_or_default()
                } else {
                    status_line(host)
                };
                println!("{line}");
            })
            .await
    };
    match watched.await {
        Ok(()) => {
            eprintln!("reachd: the agent left the session bus");
            ExitCode::from(CANNOT_TELL)
        }
        Err(err) => report(Err(err)),
    }
}

/// One host as `reachd status` prints it: name, state, address, target and its state, reason,
/// and the Nix state for a host with `[host.nix]`, tab-separated.
fn status_line(h: &reachd::status::HostStatus) -> String {
    let address = if h.address.is_empty() {
        "-"
    } else {
        &h.address
    };
    let nix = if h.nix_reason.is_empty() {
        String::new()
    } else {
        format!("\tnix: {}", h.nix_reason)
    };
    format!(
        "{}\t{}\t{}\t{} {}\t{}{nix}",
        h.name, h.state, address, h.target, h.target_state, h.reason
    )
}

/// Writes reachd.1 and one page per subcommand (reachd-status.1, ...) into `dir`.
fn man_pages(dir: &std::path::Path) -> ExitCode {
    let command = Cli::command();
    let mut pages = vec![("reachd".to_string(), command.clone())];
    for sub in command.get_subcommands() {
        let name = format!("reachd-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut text = Vec::new();
        let written = clap_mangen::Man::new(page)
            .render(&mut text)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(err) = written {
            eprintln!("reachd: cannot write {}: {err}", path.display());
            return ExitCode::from(CANNOT_TELL);
        }
    }
    ExitCode::SUCCESS
}

/// How often `reachd uploads --wait` looks at the spool again: one readdir per host, cheap
/// enough to look often, so that a script waiting for its uploads goes on soon after them.
const UPLOADS_WAIT_POLL: Duration = Duration::from_millis(100);

/// `reachd uploads`; `wait`: `None` to list, `Some(timeout)` to wait until nothing waits.
async fn uploads(path: Option<PathBuf>, wait: Option<Option<Duration>>) -> ExitCode {
    let config = match config::load(path.as_deref()) {
        Ok((config, _)) => config,
        Err(err) => {
            eprintln!("reachd: {err}");
            return ExitCode::from(CANNOT_TELL);
        }
    };
    let hosts: Vec<String> = config
        .hosts
        .iter()
        .filter(|h| h.upload.is_some())
        .map(|h| h.name.clone())
        .collect();
    if hosts.is_empty() {
        eprintln!("reachd: no host has `upload = true` in its [host.nix]");
        return ExitCode::from(CANNOT_TELL);
    }
    let Some(timeout) = wait else {
        return match Listing::read(&config.spool, &hosts) {
            Ok(listing) => {
                print!("{listing}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("reachd: {err}");
                ExitCode::from(CANNOT_TELL)
            }
        };
    };
    let started = tokio::time::Instant::now();
    let mut last = None;
    loop {
        let waiting = match listing::waiting(&config.spool, &hosts) {
            Ok(waiting) => waiting,
            Err(err) => {
                eprintln!("reachd: {err}");
                return ExitCode::from(CANNOT_TELL);
            }
        };
        if waiting == 0 {
            return ExitCode::SUCCESS;
        }
        if last != Some(waiting) {
            println!("{waiting} build(s) waiting for upload");
            last = Some(waiting);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            eprintln!("reachd: {waiting} build(s) still waiting for upload");
            return ExitCode::from(1);
        }
        tokio::time::sleep(UPLOADS_WAIT_POLL).await;
    }
}

/// `reachd doctor`: every finding printed as it comes; exit 1 if one failed.
async fn doctor(config: Option<PathBuf>) -> ExitCode {
    let mut failed = false;
    let paths = doctor::Paths::from_env();
    doctor::run(config, &paths, |finding| {
        failed |= finding.level == doctor::Level::Fail;
        println!("{finding}");
    })
    .await;
    ExitCode::from(u8::from(failed))
}

async fn check(host: &str) -> Result<bool, ClientError> {
    Ok(Client::connect().await?.host_named(host).await?.reachable)
}

async fn refresh() -> Result<(), ClientError> {
    Client::connect().await?.refresh().await
}
