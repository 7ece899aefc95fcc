//! Validated configuration of `reloader run`, grouped by the part of the
//! controller that uses it; everything a user can get wrong is checked
//! before anything starts (the command line parses each flag; what needs
//! several flags is checked when the configuration is built), and each
//! error says how to fix it ([`ConfigError`]). Pure logic, no syscalls.

mod error;
mod plans;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use error::ConfigError;
use nix::sys::signal::Signal;
pub use plans::{
    CanaryPlan, CheckCommand, Health, MAX_CANARY_DWELL, MAX_CANARY_STEPS, MIN_CANARY_DWELL, Probe,
};

use reloader_ebpf::Limits;

use crate::listen::{ListenerSpec, Transport};

/// Old generations that may drain at once, at most: with the active
/// generation and a candidate, 16 generations live per instance.
pub const MAX_DRAINING: u32 = 14;
/// Listening sockets one generation may hold per address, by default.
pub const DEFAULT_SOCKETS_PER_LISTENER: u32 = 256;
/// UDP flows the flow table holds, by default (least recently used ones
/// are forgotten beyond that).
pub const DEFAULT_UDP_FLOWS: u32 = 65_536;

/// Everything `reloader run` needs, validated, grouped by the part of the
/// controller that uses it (linkerd2-proxy's `Config { inbound, admin, … }`
/// shape): each part is handed to its user.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub name: String,
    pub listen: Vec<ListenerSpec>,
    pub control_socket: PathBuf,
    /// How generations are started.
    pub spawn: Spawn,
    /// When a new generation counts as ready.
    pub ready: Readiness,
    /// How old generations are told to finish, and how long they may take.
    pub drain: Drain,
    /// Rollback and canary: the hold, health checks.
    pub rollout: Rollout,
    /// The steering maps' sizes and program.
    pub steering: SteeringOptions,
    /// UDP listeners.
    pub udp: Udp,
    /// Config-aware reloads: `--check`, `--watch`, `--config`.
    pub changes: Changes,
    /// Where to serve Prometheus metrics, if anywhere (the probes too).
    pub metrics: Option<SocketAddr>,
    /// Where to serve the probes `/healthz` and `/readyz` alone (`--health`;
    /// `None` when it is the metrics address, which serves them anyway).
    pub health: Option<SocketAddr>,
}

/// How generations are started.
#[derive(Clone, Debug)]
pub struct Spawn {
    /// The server command (`{generation}` is replaced).
    pub command: Vec<String>,
    /// Create each generation's listeners and pass them (socket activation).
    pub pass_fds: bool,
    /// `--inject-reuseport`: the generations' binds to managed addresses
    /// get `SO_REUSEPORT` from cgroup bind programs.
    pub inject_reuseport: bool,
}

/// When a new generation counts as ready.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// How long it may take to listen everywhere and pass its probe.
    pub timeout: Duration,
    /// `--ready-probe`, through its own listener.
    pub probe: Option<Probe>,
    /// Also wait for READY=1 on a per-generation NOTIFY_SOCKET.
    pub notify: bool,
}

/// How old generations are told to finish.
#[derive(Clone, Debug)]
pub struct Drain {
    pub signal: Signal,
    /// `--drain-command`: run instead of sending the drain signal
    /// (`{generation}` and `{pid}` replaced); the signal is sent only if
    /// it fails.
    pub command: Option<CheckCommand>,
    /// Then its process group is killed.
    pub timeout: Duration,
    /// When the old generation, receiving nothing new, gets the drain
    /// signal (`--settle`).
    pub settle: Settle,
    /// The longest an `auto` or `idle` settle waits (`--settle-max`).
    pub settle_max: Duration,
    /// Old generations draining at once.
    pub max_draining: u32,
    /// Beyond `max_draining`, a reload evicts the oldest draining
    /// generation instead of waiting (`--drain-evict`).
    pub evict: bool,
    /// What the draining generations may use together before the oldest
    /// is evicted (`--max-draining-memory`, bytes).
    pub max_memory: Option<u64>,
}

/// When an old generation, which receives nothing new from the cutover
/// on, gets its drain signal (`reload::settle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Once it has answered what it accepted: its listeners' queues are
    /// empty and each connection it holds is closed or idle after an
    /// answer.
    Auto,
    /// Once it holds no connection at all.
    Idle,
    /// After this long.
    Fixed(Duration),
}

impl Settle {
    /// How long it settles at least.
    pub fn floor(self) -> Duration {
        match self {
            Self::Fixed(d) => d,
            Self::Auto | Self::Idle => Duration::ZERO,
        }
    }
}

impl std::fmt::Display for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Idle => f.write_str("idle"),
            Self::Fixed(d) => f.write_str(&crate::generation::human_duration(*d)),
        }
    }
}

/// Slots beyond `--max-draining` + 2 with `--drain-evict`: evicted
/// generations still run for their grace, and a reload must not wait for
/// their slots.
pub const EVICTING_SLOTS: u32 = 2;

/// Rollback and canary.
#[derive(Clone, Debug)]
pub struct Rollout {
    /// How long the previous generation is kept, receiving nothing new but
    /// not signalled, after a cutover (`reloader rollback` brings it back).
    pub keep_previous: Duration,
    /// Health checks of live generations while a rollback is possible.
    pub health: Option<Health>,
}

/// The steering maps and program.
#[derive(Clone, Copy, Debug)]
pub struct SteeringOptions {
    /// Load the select-only program even where select-or-migrate works.
    pub force_select_only: bool,
    /// Listening sockets one generation may hold per address.
    pub sockets_per_listener: u32,
}

/// UDP listeners.
#[derive(Clone, Copy, Debug)]
pub struct Udp {
    /// Entries of the UDP flow table.
    pub flows: u32,
}

/// Config-aware reloads.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// `--check`: run before every new generation is spawned.
    pub check: Option<CheckCommand>,
    /// `--watch`: reload when these change (absolute paths).
    pub watch: Vec<PathBuf>,
    /// `--config` (or the `--watch` paths): what a generation's config
    /// digest covers (absolute paths).
    pub config_files: Vec<PathBuf>,
}

impl RunConfig {
    /// (transport, address) of each `--listen`: what discovery matches
    /// sockets by.
    pub fn listen_keys(&self) -> Vec<(Transport, SocketAddr)> {
        self.listen.iter().map(ListenerSpec::key).collect()
    }

    /// How large the steering maps are for this configuration: a slot per
    /// generation that can be live at once (the active one, a candidate,
    /// and `--max-draining` old ones).
    pub fn limits(&self) -> Limits {
        Limits {
            listeners: self.listen.len() as u32,
            slots: self.drain.max_draining
                + 2
                + if self.drain.evict || self.drain.max_memory.is_some() {
                    EVICTING_SLOTS
                } else {
                    0
                },
            sockets_per_slot: self.steering.sockets_per_listener,
        }
    }
}

impl RunConfig {
    /// A configuration for unit tests: `listen`, short timeouts, no probe.
    #[cfg(test)]
    pub fn for_tests(listen: &[&str]) -> Self {
        Self {
            name: "test".into(),
            listen: listen
                .iter()
                .map(|a| ListenerSpec::from(a.parse::<SocketAddr>().expect("address")))
                .collect(),
            control_socket: std::env::temp_dir().join("reloader-unit-test.sock"),
            spawn: Spawn {
                command: vec!["sleep".into(), "60".into()],
                pass_fds: false,
                inject_reuseport: false,
            },
            ready: Readiness {
                timeout: Duration::from_millis(500),
                probe: None,
                notify: false,
            },
            drain: Drain {
                signal: Signal::SIGTERM,
                command: None,
                timeout: Duration::from_secs(2),
                settle: Settle::Fixed(Duration::from_millis(10)),
                settle_max: Duration::from_secs(2),
                max_draining: 4,
                evict: false,
                max_memory: None,
            },
            rollout: Rollout {
                keep_previous: Duration::ZERO,
                health: None,
            },
            steering: SteeringOptions {
                force_select_only: false,
                sockets_per_listener: 16,
            },
            udp: Udp { flows: 1024 },
            changes: Changes::default(),
            metrics: None,
            health: None,
        }
    }
}

/// Where the control socket of instance `name` lives by default:
/// `/run/reloader/NAME.sock` as root, `$XDG_RUNTIME_DIR/reloader/NAME.sock`
/// otherwise.
pub fn default_control_socket(name: &str) -> PathBuf {
    let dir = if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/reloader")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("reloader"))
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("reloader-{}", nix::unistd::geteuid()))
            })
    };
    dir.join(format!("{name}.sock"))
}

/// Replaces `{generation}` in every argument.
pub fn substitute_generation(command: &[String], generation: u64) -> Vec<String> {
    substitute(command, generation, None)
}

/// [`substitute_generation`], and `{pid}` replaced by `pid` when given.
pub fn substitute(command: &[String], generation: u64, pid: Option<u32>) -> Vec<String> {
    command
        .iter()
        .map(|arg| {
            let arg = arg.replace("{generation}", &generation.to_string());
            match pid {
                Some(pid) => arg.replace("{pid}", &pid.to_string()),
                None => arg,
            }
        })
        .collect()
}
