//! `reloader run`'s arguments ([`RunArgs`], with `--ready`'s
//! [`ReadyMode`] and the examples its help ends with) and their conversion
//! to a [`RunConfig`], where what needs more than one flag is checked.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use nix::sys::signal::Signal;

use super::{
    HOUR, InstanceArgs, LogFormat, MS,
    parse::{
        self, absolute_path, check_listen, duration_in, parse_check, parse_drain_command,
        parse_listen_addr, parse_metrics_addr, parse_probe, signal_named, size_named,
    },
};
use crate::{
    config::{self, ConfigError, RunConfig},
    listen::ListenerSpec,
};

pub(super) const RUN_EXAMPLES: &str = "\
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

/// `--ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyMode {
    Listeners,
    Notify,
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
