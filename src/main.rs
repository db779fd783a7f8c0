//! The `reachd` command: wires the library up and maps outcomes to exit codes. Nothing here
//! decides anything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{CommandFactory, Parser, Subcommand};
use reachd::client::{Client, ClientError};
use reachd::error::Chain;
use reachd::upload::listing::{self, Listing};
use reachd::{agent, config, doctor, logging, status_text};

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
    /// Print each host's state as the running agent holds it: a table, or HOST in detail.
    ///
    /// The table has one row per host: its state and since when, the address that answered,
    /// the target's state, whether Nix uses its cache, the builds waiting for upload, and why
    /// the state is what it is; hosts whose uploads fail are named below it with the error.
    Status {
        /// Only this host (its name in the configuration), in detail.
        host: Option<String>,
        /// Print JSON: {"hosts": [{"name", "reachable", "state", "address", ...}]}; with
        /// HOST, its object alone; with --watch, one host object per line.
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
    /// Ask the running agent to check every host now, mDNS asked again (what the dispatcher hook
    /// calls).
    Refresh,
    /// Ask the running agent to read its configuration again (what `systemctl --user reload
    /// reachd` runs).
    ///
    /// Sends SIGHUP to the process that holds org.reachd.Reachd1 on the session bus, and
    /// returns: the agent applies the file just after, or refuses it whole and keeps the one in
    /// force; its log says which. Exit 0 once the signal is sent; 2 if the agent is not running.
    Reload,
    /// Check the whole set-up and say, per line, ok or what is wrong and how to fix it.
    ///
    /// In order: NetworkManager, the systemd user manager, the agent, the configuration (as
    /// `run` finds it), each host's target and the units bound to it, each host answering now
    /// (one real check, as the agent makes it), the dispatcher hook and, for hosts with
    /// [host.nix], Nix: the fragment's `!include`, `trusted-substituters`, the post-build hook,
    /// the spool, the signing keys and the `nix` uploads would run (as the agent finds it, with
    /// the PATH the user manager gives it). Nix's files are found as Nix finds them ($NIX_CONF_DIR,
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
    /// Write the manual pages (reachd.1, reachd-status.1, ..., reachd.toml.5, reachd-nix-upload.8)
    /// into DIR.
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

/// Why `reachd` ends unsuccessfully, with the code to exit with: printed once, whole, by
/// [`main`]. `logged`: the agent's failures go to its log (the journal), the CLI's to stderr.
struct Failure {
    error: anyhow::Error,
    code: u8,
    logged: bool,
}

impl Failure {
    fn cannot_tell(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            error: error.into(),
            code: CANNOT_TELL,
            logged: false,
        }
    }

    /// The running agent failed: exit 1, so that systemd restarts it.
    fn agent(error: anyhow::Error) -> Failure {
        Failure {
            error,
            code: 1,
            logged: true,
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::cannot_tell(error)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Failure {
            error,
            code,
            logged,
        }) => {
            // The one printer: the error and each of its causes, once.
            let shown = Chain(error.as_ref());
            if logged {
                tracing::error!("{shown}");
            } else {
                eprintln!("reachd: {shown}");
            }
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                check_config,
            } => run_agent(config, check_config).await,
            Command::Status {
                host,
                json,
                watch: false,
            } => status(host.as_deref(), json).await,
            Command::Status {
                host,
                json,
                watch: true,
            } => watch(host.as_deref(), json).await,
            Command::Check { host } => Ok(match check(&host).await? {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(1),
            }),
            Command::Refresh => {
                Client::connect().await?.refresh().await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Reload => {
                let pid = Client::connect().await?.agent_pid().await?;
                ask_reload(pid)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Completions { shell } => {
                // Into memory first: clap_complete panics when its writer fails (a closed pipe).
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "reachd", &mut script);
                match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                    Ok(()) => Ok(ExitCode::SUCCESS),
                    Err(_) => Ok(ExitCode::from(1)),
                }
            }
            Command::Doctor { config } => Ok(doctor(config).await),
            Command::Man { dir } => man_pages(&dir),
            Command::Uploads {
                config,
                wait,
                timeout,
            } => uploads(config, wait.then(|| timeout.map(Duration::from_secs))).await,
        }
    })
}

async fn run_agent(path: Option<PathBuf>, check_only: bool) -> Result<ExitCode, Failure> {
    let (config, source) = config::load(path.as_deref())?;
    if check_only {
        print!("{}", config.summary(&source));
        return Ok(ExitCode::SUCCESS);
    }
    logging::init();
    tracing::info!("configuration: {source}");
    // Before the agent takes its name: SIGHUP's default action would end it.
    let reloads = reload_requests()
        .context("cannot catch SIGHUP for reloads")
        .map_err(Failure::agent)?;
    let environment = agent::Environment {
        config_file: path,
        ..agent::Environment::from_process()
    };
    let control = agent::Control {
        shutdown: shutdown_signal(),
        reloads,
    };
    agent::run(config, environment, control)
        .await
        .map_err(Failure::agent)?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
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

/// `reachd reload`: SIGHUP to the agent's process, which [`reload_requests`] turns into a reload.
fn ask_reload(pid: u32) -> anyhow::Result<()> {
    let target = libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            anyhow!("the session bus names pid {pid} as the agent's: not a process to signal")
        })?;
    // SAFETY: plain syscall; `target` is a single positive pid, never a process group.
    if unsafe { libc::kill(target, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot send SIGHUP to the agent (pid {pid})"));
    }
    Ok(())
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

async fn status(host: Option<&str>, json: bool) -> Result<ExitCode, Failure> {
    let client = Client::connect().await?;
    let now = reachd::status::wall_clock_micros();
    match host {
        Some(name) => {
            let host = client.host_named(name).await?;
            if json {
                println!("{}", serde_json::json!(host));
            } else {
                print!("{}", status_text::detail(&host, now));
            }
        }
        None => {
            let hosts = client.hosts().await?;
            if json {
                println!("{}", serde_json::json!({ "hosts": hosts }));
            } else {
                print!("{}", status_text::table(&hosts, now));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `reachd status --watch`: ends only when the agent goes away (or cannot be read): exit 2.
async fn watch(host: Option<&str>, json: bool) -> Result<ExitCode, Failure> {
    let client = Client::connect().await?;
    if let Some(name) = host {
        client.host_named(name).await?; // An unknown name is an error, not a silent watch.
    }
    client
        .watch(|h| {
            if host.is_some_and(|name| name != h.name) {
                return;
            }
            let line = if json {
                serde_json::to_string(h).unwrap_or_default()
            } else {
                status_text::change_line(h)
            };
            println!("{line}");
        })
        .await?;
    Err(Failure::cannot_tell(anyhow!(
        "the agent left the session bus"
    )))
}

/// Writes the manual pages into `dir` (`reachd man`).
fn man_pages(dir: &std::path::Path) -> Result<ExitCode, Failure> {
    reachd::manual::write(dir, Cli::command())?;
    Ok(ExitCode::SUCCESS)
}

/// How often `reachd uploads --wait` looks at the spool again: one readdir per host, cheap
/// enough to look often, so that a script waiting for its uploads goes on soon after them.
const UPLOADS_WAIT_POLL: Duration = Duration::from_millis(100);

/// `reachd uploads`; `wait`: `None` to list, `Some(timeout)` to wait until nothing waits.
async fn uploads(
    path: Option<PathBuf>,
    wait: Option<Option<Duration>>,
) -> Result<ExitCode, Failure> {
    let (config, _) = config::load(path.as_deref())?;
    let hosts: Vec<String> = config
        .hosts
        .iter()
        .filter(|h| h.upload.is_some())
        .map(|h| h.name.clone())
        .collect();
    if hosts.is_empty() {
        return Err(Failure::cannot_tell(anyhow!(
            "no host has `upload = true` in its [host.nix]"
        )));
    }
    let Some(timeout) = wait else {
        print!("{}", Listing::read(&config.spool, &hosts)?);
        return Ok(ExitCode::SUCCESS);
    };
    let started = tokio::time::Instant::now();
    let mut last = None;
    loop {
        let waiting = listing::waiting(&config.spool, &hosts)?;
        if waiting == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        if last != Some(waiting) {
            println!("{waiting} build(s) waiting for upload");
            last = Some(waiting);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            return Err(Failure {
                error: anyhow!("{waiting} build(s) still waiting for upload"),
                code: 1,
                logged: false,
            });
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
