//! The command line: `reloader run | reload | status | stop | list | …`
//! ([`Cli`], what users see: help, man pages, completions) and the
//! subcommands the binary runs itself as ([`Internal`]: `__exec`,
//! `__keeper`, `__serve`), parsed apart so that they never show anywhere a
//! user looks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::Signal;

pub use crate::logging::LogFormat;
mod parse;

pub use parse::*;

use crate::{
    config::{self, ConfigError, RunConfig},
    listen::ListenerSpec,
};

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

/// `--ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyMode {
    Listeners,
    Notify,
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

const RUN_EXAMPLES: &str = "\
Examples:
  # nginx: `listen 80 reuseport;` in its config, graceful stop with QUIT
  reloader run --listen 0.0.0.0:80 --drain-signal QUIT -- nginx -g 'daemon off;'

  # HAProxy: soft-stop with USR1, in the foreground (-db; no `daemon` in
  # its config), readiness through its own listener
  reloader run --listen 0.0.0.0:443 --drain-signal USR1 \\
      --ready-probe tcp://127.0.0.1:443 -- haproxy -db -f /etc/haproxy/haproxy.cfg

  # Envoy: a distinct base id per generation
  reloader run --listen [::]:8080 -- envoy -c envoy.yaml --base-id {generation}

Then: `reloader reload --wait` (or SIGHUP), `reloader status`, `reloader stop`.";

/// Selects an instance.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// Instance name (one controller per name).
    #[arg(long, default_value = "default", value_parser = parse_name)]
    pub name: String,
    /// Control socket path [default: /run/reloader/NAME.sock as root,
    /// $XDG_RUNTIME_DIR/reloader/NAME.sock otherwise].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl InstanceArgs {
    pub fn socket(&self) -> Result<PathBuf, ConfigError> {
        Ok(self
            .control_socket
            .clone()
            .unwrap_or_else(|| config::default_control_socket(&self.name)))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Log format on stderr (level: RELOADER_LOG or RUST_LOG, e.g.
    /// `info,reloader=debug`; `reloader::ebpf=debug` adds the eBPF
    /// program's own debug records).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// An address the server listens on with SO_REUSEPORT (repeat for
    /// each): IP:PORT or tcp://IP:PORT for TCP; for UDP a mode is needed:
    /// udp://IP:PORT?mode=flows keeps flows on their generation (QUIC and
    /// other sessions), udp://IP:PORT?mode=stateless sends every datagram to
    /// the newest generation (DNS and other single-datagram exchanges).
    #[arg(long, value_name = "ADDR", required = true, value_parser = parse_listen_addr)]
    pub listen: Vec<ListenerSpec>,
    /// How long a new generation may take to listen on every address and
    /// pass its probe.
    #[arg(long, default_value = "30s", value_name = "DURATION",
          value_parser = duration_in("--ready-timeout", MS * 100, HOUR))]
    pub ready_timeout: Duration,
    /// Readiness check through the new generation's own listener:
    /// tcp://IP:PORT (connects), http://IP:PORT/PATH (expects 2xx) or
    /// dns://IP:PORT/NAME (a UDP query; expects NOERROR).
    #[arg(long, value_name = "URL")]
    pub ready_probe: Option<String>,
    /// Signal that tells an old generation to finish its work and exit.
    #[arg(long, default_value = "TERM", value_name = "SIGNAL",
          value_parser = signal_named("--drain-signal"))]
    pub drain_signal: Signal,
    /// Run this instead of sending the drain signal when an old generation's
    /// drain begins (after --settle), for servers whose graceful stop is an
    /// API call, e.g. 'curl -fsS -X POST http://127.0.0.1:9901/drain_listeners?graceful':
    /// one string split like a shell would, `{generation}` and `{pid}` (its
    /// first process) replaced. Its exit status, output and duration are
    /// reported; if it fails, the drain signal is sent. It and the drain are
    /// bounded by --drain-timeout.
    #[arg(long, value_name = "CMD", value_parser = parse_drain_command)]
    pub drain_command: Option<config::CheckCommand>,
    /// How long an old generation may drain before its process group is killed.
    #[arg(long, default_value = "30s", value_name = "DURATION",
          value_parser = duration_in("--drain-timeout", MS * 100, HOUR * 24))]
    pub drain_timeout: Duration,
    /// When an old generation, which receives nothing new after the
    /// cutover, is told to drain: `auto` once it has answered what it
    /// accepted (empty accept queues; each connection closed or idle after
    /// an answer), `idle` once it holds no connection, or a fixed DURATION
    /// (the behaviour before `auto`). `auto` and `idle` wait at most
    /// --settle-max.
    #[arg(long, default_value = "auto", value_name = "auto|idle|DURATION",
          value_parser = parse::parse_settle)]
    pub settle: config::Settle,
    /// The longest `--settle auto` or `idle` waits before the drain signal.
    #[arg(long, default_value = "2s", value_name = "DURATION",
          value_parser = duration_in("--settle-max", Duration::ZERO, HOUR * 24))]
    pub settle_max: Duration,
    /// Old generations allowed to drain at once; a reload beyond that waits
    /// until one has exited (or, with --drain-evict, evicts the oldest).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub max_draining: u32,
    /// A reload beyond --max-draining evicts the oldest draining generation
    /// (drain signal now, killed a second later) instead of waiting.
    #[arg(long)]
    pub drain_evict: bool,
    /// When the draining generations together use more memory than this
    /// (their cgroups' memory.current), the oldest is evicted. Needs the
    /// memory controller in the generations' cgroup v2.
    #[arg(long, value_name = "SIZE", value_parser = size_named("--max-draining-memory"))]
    pub max_draining_memory: Option<u64>,
    /// Use the select-only steering program even where select-or-migrate
    /// works (connections queued in a closing listener are then reset).
    #[arg(long, hide = true)]
    pub force_select_only: bool,
    /// Socket activation: reloader opens each generation's SO_REUSEPORT
    /// listeners itself and passes them as fds 3, 4, … (one per --listen,
    /// in order) with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
    #[arg(long)]
    pub pass_fds: bool,
    /// Give SO_REUSEPORT to every socket a generation binds to a --listen
    /// address (same protocol, address and port), for servers that do not
    /// set it themselves: cgroup bind programs on each generation's cgroup
    /// (needs a writable cgroup v2; refused at start where the kernel
    /// cannot, e.g. Linux 5.10). Other binds are left as they are.
    #[arg(long)]
    pub inject_reuseport: bool,
    /// When a generation counts as ready: `listeners` (it holds a listener
    /// for every address) or `notify` (that, and it sent READY=1 to the
    /// NOTIFY_SOCKET reloader gives each generation).
    #[arg(long, value_enum, default_value_t = ReadyMode::Listeners)]
    pub ready: ReadyMode,
    /// Listening sockets one generation may hold for one address (one per
    /// worker for nginx with `reuseport`, per thread for Envoy); sizes the
    /// steering maps.
    #[arg(long, default_value_t = config::DEFAULT_SOCKETS_PER_LISTENER, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::steering::limits::MAX_SOCKETS_PER_SLOT)))]
    pub max_sockets_per_listener: u32,
    /// UDP flows the flow table keeps (remote address and port → the
    /// generation serving it); when full, the least recently used flow is
    /// forgotten and its next datagram goes to the active generation.
    #[arg(long, default_value_t = config::DEFAULT_UDP_FLOWS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub udp_flows: u32,
    /// After a cutover, keep the previous generation this long, receiving
    /// nothing new but not told to drain, so `reloader rollback` can make
    /// it active again at once (at least --settle; 0: no hold).
    #[arg(long, default_value = "0s", value_name = "DURATION",
          value_parser = duration_in("--keep-previous", Duration::ZERO, HOUR * 24))]
    pub keep_previous: Duration,
    /// Health check sent through each live generation's own listener while
    /// a rollback is possible (a held previous generation, a canary); same
    /// forms as --ready-probe. A new generation that fails it
    /// --health-failures times in a row is rolled back.
    #[arg(long, value_name = "URL")]
    pub health_probe: Option<String>,
    /// Time between health checks.
    #[arg(long, value_name = "DURATION",
          value_parser = duration_in("--health-interval", MS * 100, HOUR))]
    pub health_interval: Option<Duration>,
    /// Consecutive failed health checks that make a generation unhealthy.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub health_failures: Option<u32>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
    /// Serve the probes on http://ADDR: /healthz (200 while the controller
    /// answers) and /readyz (200 while the active generation listens on
    /// every --listen address; 503 during the first start and the stop),
    /// e.g. 0.0.0.0:9478 for a kubelet. The --metrics address serves them
    /// too.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub health: Option<SocketAddr>,
    /// A pre-flight check run before every new generation is spawned (the
    /// first one too), e.g. 'nginx -t -c /etc/nginx/nginx.conf': one string,
    /// split into words like a shell would (no variables or pipes),
    /// `{generation}` replaced by the number the new generation will get.
    /// A non-zero exit (or no exit within --ready-timeout) fails the reload
    /// before anything is started; its last output lines are reported.
    #[arg(long, value_name = "CMD", value_parser = parse_check)]
    pub check: Option<config::CheckCommand>,
    /// Reload when this file or directory changes (repeat for each):
    /// created, written and closed, renamed over, removed, or a symlink in
    /// its directory swapped (Kubernetes ConfigMap volumes); changes within
    /// 200ms of each other make one reload. Its directory must not be
    /// writable by another user.
    #[arg(long, value_name = "PATH")]
    pub watch: Vec<PathBuf>,
    /// A file or directory (repeat for each) whose sha256 identifies the
    /// configuration a generation started with, shown by status, reload
    /// --wait and the metrics [default: the --watch paths].
    #[arg(long = "config", value_name = "PATH")]
    pub config_files: Vec<PathBuf>,
    /// The server command; `{generation}` in it becomes the generation
    /// number. The server also gets RELOADER_GENERATION and RELOADER_NAME.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// Checks what needs more than one flag, before anything starts.
    pub fn into_config(self) -> Result<RunConfig, ConfigError> {
        let control_socket = self.instance.socket()?;
        check_listen(&self.listen)?;
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ConfigError::EmptyCommand);
        }
        let ready_probe = self
            .ready_probe
            .as_deref()
            .map(|p| parse_probe("--ready-probe", p, &self.listen))
            .transpose()?;
        let watch = self
            .watch
            .iter()
            .map(|p| absolute_path("--watch", p))
            .collect::<Result<Vec<_>, _>>()?;
        let config_files = if self.config_files.is_empty() {
            watch.clone()
        } else {
            self.config_files
                .iter()
                .map(|p| absolute_path("--config", p))
                .collect::<Result<Vec<_>, _>>()?
        };
        let health = match (
            &self.health_probe,
            self.health_interval,
            self.health_failures,
        ) {
            (Some(probe), interval, failures) => Some(config::Health {
                probe: parse_probe("--health-probe", probe, &self.listen)?,
                interval: interval.unwrap_or(Duration::from_secs(1)),
                failures: failures.unwrap_or(3),
            }),
            (None, Some(_), _) => {
                return Err(ConfigError::HealthWithoutProbe {
                    flag: "--health-interval",
                });
            }
            (None, _, Some(_)) => {
                return Err(ConfigError::HealthWithoutProbe {
                    flag: "--health-failures",
                });
            }
            (None, None, None) => None,
        };
        if self.max_draining == 0 || self.max_draining > config::MAX_DRAINING {
            return Err(ConfigError::BadMaxDraining {
                value: self.max_draining,
            });
        }
        Ok(RunConfig {
            name: self.instance.name,
            listen: self.listen,
            control_socket,
            spawn: config::Spawn {
                command: self.command,
                pass_fds: self.pass_fds,
                inject_reuseport: self.inject_reuseport,
            },
            ready: config::Readiness {
                timeout: self.ready_timeout,
                probe: ready_probe,
                notify: self.ready == ReadyMode::Notify,
            },
            drain: config::Drain {
                signal: self.drain_signal,
                command: self.drain_command,
                timeout: self.drain_timeout,
                settle: self.settle,
                settle_max: self.settle_max,
                max_draining: self.max_draining,
                evict: self.drain_evict,
                max_memory: self.max_draining_memory,
            },
            rollout: config::Rollout {
                keep_previous: self.keep_previous,
                health,
            },
            steering: config::SteeringOptions {
                force_select_only: self.force_select_only,
                sockets_per_listener: self.max_sockets_per_listener,
            },
            udp: config::Udp {
                flows: self.udp_flows,
            },
            changes: config::Changes {
                check: self.check,
                watch,
                config_files,
            },
            metrics: self.metrics,
            // One listener serves both when they are the same address.
            health: self.health.filter(|h| Some(*h) != self.metrics),
        })
    }
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Wait until the new generation is active everywhere and the old one
    /// has exited; exit non-zero if the reload failed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the new generation as a canary: once ready it gets this share
    /// of new connections (by packet hash, so a client's retry usually
    /// lands alike), the active generation the rest, until `reloader
    /// promote` or `reloader rollback`. Steps such as 1%,10%,50% need
    /// --canary-for. With --wait: returns when promoted (exit 0) or rolled
    /// back (exit 3).
    #[arg(long, value_name = "PERCENT", value_parser = parse_canary)]
    pub canary: Option<CanarySteps>,
    /// With --canary: how long each step lasts; after the last one, a
    /// canary that stayed healthy is promoted.
    #[arg(long, value_name = "DURATION", requires = "canary",
          value_parser = duration_in("--canary-for", MS * 100, HOUR * 24))]
    pub canary_for: Option<Duration>,
}

impl ReloadArgs {
    /// The canary plan asked for, checked.
    pub fn canary_plan(&self) -> Result<Option<config::CanaryPlan>, ConfigError> {
        let Some(CanarySteps(steps)) = &self.canary else {
            return Ok(None);
        };
        if steps.len() > 1 && self.canary_for.is_none() {
            return Err(ConfigError::BadCanary {
                value: steps
                    .iter()
                    .map(|w| format!("{}%", config::CanaryPlan::percent(*w)))
                    .collect::<Vec<_>>()
                    .join(","),
                why: "steps need --canary-for DURATION (how long each lasts)".into(),
            });
        }
        Ok(Some(config::CanaryPlan {
            steps: steps.clone(),
            dwell_ms: self.canary_for.map(|d| d.as_millis() as u64),
        }))
    }
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Return once the generation rolled back from has exited.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Return once the generation beside the canary has exited (at once
    /// when it is held with --keep-previous).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also look for control sockets (`*.sock`) in DIR (repeat for each):
    /// instances started with --control-socket elsewhere.
    #[arg(long, value_name = "DIR")]
    pub dir: Vec<PathBuf>,
    /// How long each instance may take to answer.
    #[arg(long, default_value = "1s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 10, Duration::from_secs(60)))]
    pub timeout: Duration,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Wait until every reloader instance Prometheus scrapes (at least
    /// --expect) has config SHA256 active with no canary pending. Exits 0
    /// then; 1 at --timeout, listing each instance and what it serves; 2
    /// when Prometheus could not be asked at the last attempt.
    Wait(FleetWaitArgs),
    /// Print each reloader instance Prometheus scrapes and what it serves.
    Status(FleetStatusArgs),
}

#[derive(Debug, Args)]
pub struct FleetWaitArgs {
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
    /// The config digest every instance must serve (what `reloader status`
    /// shows; docs/config-aware-reloads.md, "Config identity", computes it
    /// with sha256sum).
    #[arg(long, value_name = "SHA256", value_parser = parse_sha256)]
    pub config: String,
    /// Instances there must be at least (a wrong --selector, or replicas
    /// Prometheus has not discovered yet, must not pass the barrier).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub expect: u32,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_name = "DURATION",
          value_parser = duration_in("--timeout", Duration::ZERO, HOUR * 24))]
    pub timeout: Duration,
    /// Time between two looks (Prometheus sees a change at its next
    /// scrape anyway).
    #[arg(long, default_value = "2s", value_name = "DURATION",
          value_parser = duration_in("--interval", MS * 100, Duration::from_secs(600)))]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
    /// Also say, per instance, why it does not serve this config digest.
    #[arg(long, value_name = "SHA256", value_parser = parse_sha256)]
    pub config: Option<String>,
}

/// Which Prometheus to ask, and how.
#[derive(Debug, Args)]
pub struct PrometheusArgs {
    /// Prometheus's base URL, e.g. http://prometheus:9090 (its HTTP API
    /// /api/v1/query is asked).
    #[arg(long, value_name = "URL", env = "RELOADER_PROMETHEUS_URL")]
    pub prometheus: String,
    /// Target label matchers the instances must have, e.g.
    /// 'job="edge",env="prod"'.
    #[arg(long, value_name = "LABELS", default_value = "",
          value_parser = |v: &str| crate::fleet::Selector::parse(v))]
    pub selector: crate::fleet::Selector,
    /// Basic auth user; the password comes from --password-file or
    /// RELOADER_PROMETHEUS_PASSWORD.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// A file holding the basic auth password (one line).
    #[arg(long, value_name = "PATH", requires = "user")]
    pub password_file: Option<PathBuf>,
    /// A file holding a bearer token (one line); or RELOADER_PROMETHEUS_TOKEN.
    #[arg(long, value_name = "PATH", conflicts_with = "user")]
    pub bearer_token_file: Option<PathBuf>,
    /// Trust only the CA certificates in this PEM file for an https://
    /// Prometheus (default: Mozilla's root certificates).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// How long one request may take.
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = duration_in("--request-timeout", MS * 100, Duration::from_secs(600)))]
    pub request_timeout: Duration,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HandoverArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Give up waiting (for the controller to exit; with --wait, for its
    /// successor to answer) after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Then wait until the next controller answers on the control socket
    /// (systemd starts it).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Give up waiting for the instance to exit after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(run) => run.into_config().map_err(|e| e.to_string()),
            _ => Err("not run".into()),
        }
    }

    /// A forgotten `--` before the server command gets a tip with the
    /// command line fixed (issue 29: clap's "unexpected argument 'nginx'"
    /// alone did not say what was wrong).
    #[test]
    fn a_server_command_without_the_separator_gets_a_tip() {
        let args = |words: &[&str]| words.iter().map(std::ffi::OsString::from).collect();
        let error = Cli::try_parse_with_tips(args(&[
            "reloader",
            "run",
            "--listen",
            "127.0.0.1:80",
            "nginx",
            "-g",
            "daemon off;",
        ]))
        .unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
        let text = error.to_string();
        assert!(
            text.contains(
                "tip: the server command goes after `--` (what comes before it is reloader's): \
                 reloader run --listen 127.0.0.1:80 -- nginx -g 'daemon off;'"
            ),
            "{text}"
        );
        // Other mistakes get no such tip.
        for words in [
            &[
                "reloader",
                "run",
                "--listen",
                "127.0.0.1:80",
                "--bogus",
                "--",
                "x",
            ][..],
            &["reloader", "status", "extra"],
            &[
                "reloader",
                "run",
                "--listen",
                "127.0.0.1:80",
                "--",
                "x",
                "--",
                "y",
            ],
        ] {
            if let Err(error) = Cli::try_parse_with_tips(args(words)) {
                assert!(
                    !error.to_string().contains("goes after"),
                    "{words:?}: {error}"
                );
            }
        }
    }

    #[test]
    fn a_full_run_command_line() {
        let config = parse(&[
            "reloader",
            "run",
            "--name",
            "edge",
            "--listen",
            "127.0.0.1:8080",
            "--listen",
            "[::]:8443",
            "--drain-signal",
            "QUIT",
            "--drain-timeout",
            "2m",
            "--ready-probe",
            "http://127.0.0.1:8080/health",
            "--",
            "nginx",
            "-g",
            "daemon off;",
        ])
        .unwrap();
        assert_eq!(config.name, "edge");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.drain.timeout, Duration::from_secs(120));
        assert_eq!(config.spawn.command, vec!["nginx", "-g", "daemon off;"]);
        assert!(config.ready.probe.is_some());
    }

    #[test]
    fn config_paths_default_to_the_watched_ones() {
        let base = ["reloader", "run", "--listen", "127.0.0.1:80"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            v.extend_from_slice(&["--", "x"]);
            parse(&v).unwrap()
        };
        let c = with(&["--watch", "/etc/nginx", "--watch", "/etc/ssl/x.pem"]);
        assert_eq!(c.changes.config_files, c.changes.watch);
        assert_eq!(c.changes.watch.len(), 2);
        let c = with(&["--watch", "/etc/nginx", "--config", "/etc/nginx/nginx.conf"]);
        assert_eq!(
            c.changes.config_files,
            vec![PathBuf::from("/etc/nginx/nginx.conf")]
        );
        let c = with(&["--check", "nginx -t -g 'pid /run/{generation}.pid;'"]);
        assert_eq!(
            c.changes.check.unwrap().argv[3],
            "pid /run/{generation}.pid;"
        );
        assert!(with(&[]).changes.config_files.is_empty() && with(&[]).changes.check.is_none());
    }

    /// The internal subcommands (`__exec`, `__keeper`, `__serve`) were
    /// offered by every shell's completions and listed in `man`.
    #[test]
    fn internal_commands_show_nowhere_a_user_looks() {
        let mut help = Vec::new();
        command().write_long_help(&mut help).unwrap();
        let help = String::from_utf8(help).unwrap();
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "reloader", &mut script);
            let script = String::from_utf8(script).unwrap();
            assert!(script.contains("handover"), "{shell}: {script}");
            for text in [&script, &help] {
                for internal in ["__exec", "__keeper", "__serve"] {
                    assert!(!text.contains(internal), "{shell}: {internal} in {text}");
                }
            }
            // A hidden option (for tests) is left out of the help; bash's
            // completions (clap_complete) list hidden options too.
            assert!(!help.contains("force-select-only"));
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(dir.path()).unwrap();
        let mut names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "reloader-completions.1",
                "reloader-demo.1",
                "reloader-fleet-status.1",
                "reloader-fleet-wait.1",
                "reloader-fleet.1",
                "reloader-handover.1",
                "reloader-list.1",
                "reloader-man.1",
                "reloader-promote.1",
                "reloader-reload.1",
                "reloader-rollback.1",
                "reloader-run.1",
                "reloader-status.1",
                "reloader-stop.1",
                "reloader.1",
            ]
        );
        for page in &pages {
            let roff = std::fs::read_to_string(page).unwrap();
            for internal in ["\\_\\_", "__", "force\\-select"] {
                assert!(!roff.contains(internal), "{}: {roff}", page.display());
            }
        }
        let run = std::fs::read_to_string(dir.path().join("reloader-run.1")).unwrap();
        assert!(run.contains("drain\\-signal"), "{run}");
        // The internal ones still parse, apart.
        let internal = Internal::try_parse_from(["reloader", "__keeper", "--socket", "/x"]);
        assert!(matches!(internal, Ok(Internal::Keeper { .. })));
        assert!(Cli::try_parse_from(["reloader", "__keeper", "--socket", "/x"]).is_err());
    }

    /// `--log-format` was a global flag that `status` or `stop` accepted
    /// and ignored.
    #[test]
    fn log_format_is_an_option_of_run_only() {
        let cli = Cli::try_parse_from([
            "reloader",
            "run",
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:80",
            "--",
            "x",
        ])
        .unwrap();
        assert_eq!(cli.log_format(), LogFormat::Json);
        let error = Cli::try_parse_from(["reloader", "status", "--log-format", "json"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--log-format"), "{error}");
        let cli = Cli::try_parse_from(["reloader", "handover", "--name", "web"]).unwrap();
        assert_eq!(cli.log_format(), LogFormat::Text);
    }

    #[test]
    fn bad_command_lines_are_refused_before_anything_starts() {
        let base = ["reloader", "run", "--listen", "127.0.0.1:80"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v).unwrap_err()
        };
        assert!(with(&[]).contains("no server command"));
        assert!(with(&["--drain-signal", "NOPE", "--", "x"]).contains("not a signal"));
        assert!(with(&["--drain-timeout", "0s", "--", "x"]).contains("at least"));
        assert!(with(&["--ready-timeout", "forever", "--", "x"]).contains("durations like"));
        assert!(with(&["--max-draining", "0", "--", "x"]).contains("--max-draining"));
        assert!(with(&["--max-draining", "99", "--", "x"]).contains("--max-draining"));
        assert!(with(&["--listen", "127.0.0.1:80", "--", "x"]).contains("twice"));
        assert!(with(&["--name", "../x", "--", "x"]).contains("--name"));
        assert!(with(&["--ready-probe", "tcp://127.0.0.1:81", "--", "x"]).contains("--listen"));
        assert!(with(&["--check", "nginx -t 'oops", "--", "x"]).contains("--check"));
        assert!(
            parse(&["reloader", "run", "--", "x"])
                .unwrap_err()
                .contains("--listen")
        );
    }
}
