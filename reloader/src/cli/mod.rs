//! The command line: `reloader run | reload | status | stop | list | …`
//! ([`Cli`], what users see: help, man pages, completions) and the
//! subcommands the binary runs itself as ([`Internal`]: `__exec`,
//! `__keeper`, `__serve`), parsed apart so that they never show anywhere a
//! user looks. The subcommand list ([`Command`]) and `demo`'s arguments
//! live here; `run`'s arguments and their conversion to a
//! [`crate::config::RunConfig`] in `run`, the commands that ask a running
//! controller in `control`, `fleet`'s in `fleet`, the value parsers in
//! `parse`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

pub use crate::logging::LogFormat;
mod control;
mod fleet;
mod parse;
mod run;
#[cfg(test)]
mod tests;

pub use control::{
    HandoverArgs, InstanceArgs, ListArgs, PromoteArgs, ReloadArgs, RollbackArgs, StatusArgs,
    StopArgs,
};
pub use fleet::{FleetArgs, FleetCommand, FleetStatusArgs, FleetWaitArgs, PrometheusArgs};
pub use parse::*;
use run::RUN_EXAMPLES;
pub use run::{ReadyMode, RunArgs};

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Parser)]
#[command(
    name = "reloader",
    version,
    about = "Zero-drop reloads for servers that listen with SO_REUSEPORT",
    long_about = "reloader runs your server (nginx, HAProxy, Envoy, your own) as a child and \
                  reloads it under full load without failing a connection: the new generation \
                  starts beside the old one, an eBPF program sends every new connection to the \
                  newest ready generation, and the old one drains and exits."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `args` (the program name first) as [`Parser::try_parse_from`]
    /// does; a `run` whose server command lacks the `--` before it gets a
    /// tip that shows the command line with `--` where it belongs.
    pub fn try_parse_with_tips(args: Vec<std::ffi::OsString>) -> Result<Self, clap::Error> {
        Self::try_parse_from(&args).map_err(|mut error| {
            let words: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            if let Some(tip) = missing_separator_tip(&words, &error) {
                error.insert(
                    clap::error::ContextKind::Suggested,
                    clap::error::ContextValue::StyledStrs(vec![tip.into()]),
                );
            }
            error
        })
    }

    /// The log format: `run`'s `--log-format`, text for every other
    /// command (they print for people, and log only what goes wrong).
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Command::Run(run) => run.log_format,
            _ => LogFormat::Text,
        }
    }
}

/// For `reloader run … nginx -g …` (no `--`): clap refuses `nginx` as an
/// unexpected argument; the tip shows where `--` goes. `None` for any other
/// error.
fn missing_separator_tip(args: &[String], error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::UnknownArgument
        || args.get(1).map(String::as_str) != Some("run")
        || args.iter().any(|a| a == "--")
    {
        return None;
    }
    let Some(ContextValue::String(unexpected)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    if unexpected.starts_with('-') {
        return None;
    }
    let at = args.iter().skip(2).position(|a| a == unexpected)? + 2;
    let fixed: Vec<&str> = std::iter::once("reloader")
        .chain(args[1..at].iter().map(String::as_str))
        .chain(std::iter::once("--"))
        .chain(args[at..].iter().map(String::as_str))
        .collect();
    let line = shlex::try_join(fixed).ok()?;
    Some(format!(
        "the server command goes after `--` (what comes before it is reloader's): {line}"
    ))
}

/// The subcommands the binary runs itself as, never typed by a user: parsed
/// apart from [`Cli`] (see [`Internal::from_env`]), so no help text, man
/// page or completion names them.
#[derive(Debug, Parser)]
#[command(name = "reloader")]
pub enum Internal {
    /// Every generation's start: waits for the controller's go, sets
    /// LISTEN_PID to its own pid when sockets are passed, and execs CMD.
    #[command(name = "__exec")]
    Exec {
        #[arg(long)]
        gate_fd: i32,
        #[arg(long)]
        listen_fds: usize,
        #[arg(long, default_value = "")]
        fd_names: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The log keeper: holds every generation's stderr so that it always
    /// has a reader, also while no controller runs (`supervisor::keeper`).
    #[command(name = "__keeper")]
    Keeper {
        #[arg(long)]
        socket: PathBuf,
    },
    /// The demo's built-in server (what `demo` runs as the managed child).
    #[command(name = "__serve")]
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
}

impl Internal {
    /// The internal subcommand this process was started as, if its first
    /// argument names one (`__…`).
    pub fn from_env() -> Option<Self> {
        let first = std::env::args_os().nth(1)?;
        first
            .to_str()
            .is_some_and(|a| a.starts_with("__"))
            .then(Self::parse)
    }
}

/// The user-facing command line, as man pages and completions describe it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Writes `reloader.1` and `reloader-COMMAND.1` for every command (and
/// `reloader-COMMAND-SUBCOMMAND.1` below it) into `dir`; returns the files
/// written.
#[allow(clippy::disallowed_methods)] // the `man` command, no runtime
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    fn pages(command: &clap::Command, into: &mut Vec<clap::Command>) {
        into.push(command.clone());
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub, into);
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut command = command().disable_help_subcommand(true);
    // Names every page: `reloader-fleet-wait` for `reloader fleet wait`.
    command.build();
    let mut all = Vec::new();
    pages(&command, &mut all);
    all.into_iter()
        .map(|page| clap_mangen::Man::new(page).generate_to(dir))
        .collect()
}

// Parsed once per process: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server under reloader (stays in the foreground).
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Reload a running instance: start a new generation, cut over, drain the old one.
    Reload(ReloadArgs),
    /// Send new connections back to the previous generation (held with
    /// --keep-previous) or away from the canary, and drain the one rolled
    /// back from.
    Rollback(RollbackArgs),
    /// Send every new connection to the canary generation now.
    Promote(PromoteArgs),
    /// Show an instance's generations, listeners and counters.
    Status(StatusArgs),
    /// List the instances on this host you can reach: name, controller
    /// pid, listeners, active generation.
    List(ListArgs),
    /// Ask Prometheus which config every replica serves; wait until all
    /// serve one (the fleet barrier).
    Fleet(FleetArgs),
    /// Drain every generation of an instance and stop it.
    Stop(StopArgs),
    /// Hand an instance over to a new controller (upgrading reloader):
    /// the running one exits (status 75) without signalling any
    /// generation, and the next `reloader run` with the same options adopts
    /// them.
    #[command(after_help = HANDOVER_HELP)]
    Handover(HandoverArgs),
    /// See reloader work: reload a built-in server every second under load.
    Demo(DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (reloader.1, reloader-run.1, …) into
    /// DIR; without DIR, print reloader(1).
    Man {
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

const HANDOVER_HELP: &str = "\
The servers never notice: the steering program keeps sending connections to \
the active generation, the log keeper keeps their stderr, and the state file \
and the pinned maps stay for the successor. Before asking, this binary checks \
that it can adopt the instance's state file and maps (their layout versions); \
if not, nothing is asked and the controller keeps running.

Under systemd (the shipped reloader@.service has RestartForceExitStatus=75) \
systemd starts the new binary at once; the Debian package's upgrade does \
this for every active reloader@ unit instead of restarting it. Elsewhere, \
start `reloader run` again with the same options.";

#[derive(Debug, Args)]
#[command(after_help = "\
Runs `reloader run` around a built-in HTTP server (this binary, nothing to install), \
sends it a continuous load of new connections on 127.0.0.1:PORT, reloads it every \
--reload-every and shows, live, which generation answers and whether any connection \
failed. The built-in server's graceful stop behaves like HAProxy's (stop listening, close \
connections that sent no request yet), so --compare shows what a plain SO_REUSEPORT \
reload does to the same load. Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_PTRACE).")]
pub struct DemoArgs {
    /// How long to run (each phase with --compare).
    #[arg(long, default_value = "20s", value_name = "DURATION",
          value_parser = duration_in("--duration", Duration::from_secs(1), HOUR))]
    pub duration: Duration,
    /// Time between reloads.
    #[arg(long, default_value = "1s", value_name = "DURATION",
          value_parser = duration_in("--reload-every", MS * 100, Duration::from_secs(600)))]
    pub reload_every: Duration,
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
    /// First run the same load with a plain SO_REUSEPORT reload, then
    /// reloader, and compare.
    #[arg(long)]
    pub compare: bool,
    /// Concurrent connection loops.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

impl DemoArgs {
    pub fn options(&self) -> crate::demo::DemoOptions {
        crate::demo::DemoOptions {
            duration: self.duration,
            reload_every: self.reload_every,
            port: self.port,
            compare: self.compare,
            concurrency: self.concurrency.clamp(1, 256),
        }
    }
}
