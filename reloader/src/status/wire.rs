//! The reports as the control protocol carries them and `--json` prints
//! them: what `reloader status` (`StatusReport`), `reload --wait`
//! (`ReloadReport`) and `rollback` (`RollbackReport`) answer, with the
//! counters and labels the controller keeps them in. These serde types are
//! an interface for scripts: fields are only ever added, each new one
//! `#[serde(default)]` so older reports still read.

use serde::{Deserialize, Serialize};

pub use crate::error::{FailureKind, ReloadFailure};
use crate::generation::State;

/// The whole instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    /// The controller's pid.
    pub pid: u32,
    /// `select-or-migrate` or `select-only`.
    pub steering: crate::steering::Mode,
    pub uptime_ms: u64,
    pub listeners: Vec<ListenerStatus>,
    pub generations: Vec<GenerationStatus>,
    pub last_reload: Option<ReloadReport>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// Active generations that crashed, or stopped listening, and were
    /// replaced.
    pub restarts: u64,
    /// Of those, the ones replaced because they stopped listening on a
    /// managed address for 5 s while still running.
    #[serde(default)]
    pub restarts_stopped_listening: u64,
    /// Draining generations killed at the drain timeout.
    pub drain_kills: u64,
    /// Draining generations evicted before their drain timeout, by reason
    /// (`memory`, `count`).
    #[serde(default)]
    pub drain_evictions: std::collections::BTreeMap<String, u64>,
    /// Decisions for groups with no registered listener.
    pub unmanaged_fallback: u64,
    /// What this controller took over (or cleaned up) from a previous one
    /// that was killed.
    #[serde(default)]
    pub recovered: Option<String>,
    /// Entries in the steering maps now.
    #[serde(default)]
    pub map_entries: crate::steering::EntryCounts,
    /// Lines (the controller's log and its servers' stderr) dropped because
    /// the controller's stderr was not read fast enough.
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// Why generations have no cgroup, if they have none (`None`: they do).
    #[serde(default)]
    pub cgroup_unavailable: Option<String>,
    /// A rollback that is possible now: a held previous generation or a
    /// canary.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// Reloads undone by a rollback (a canary rolled back, or a held
    /// generation made active again).
    #[serde(default)]
    pub reloads_rolled_back: u64,
    /// Rollbacks by reason.
    #[serde(default)]
    pub rollbacks: RollbackCounts,
    /// Environment reloader sets for its servers (`NAME=value`), besides
    /// what it inherited: `RELOADER_GENERATION`, `RELOADER_NAME`, and
    /// `GODEBUG` with `multipathtcp=0` so Go servers listen with plain TCP.
    #[serde(default)]
    pub server_environment: Vec<String>,
    /// Whether a generation's listening socket was held by a Go program
    /// (its executable has a `.go.buildinfo` section) since the controller
    /// started: then `GODEBUG` above is why it listens with plain TCP.
    #[serde(default)]
    pub go_server_seen: bool,
    /// The config digest (`--config`) of the active generation: what this
    /// replica serves now. `reloader status --json | jq -r
    /// .active_config_sha256` answers "which config runs here?".
    #[serde(default)]
    pub active_config_sha256: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// As given to `--listen` (`udp://…?mode=…` for UDP).
    pub addr: String,
    pub active_generation: Option<u64>,
    #[serde(default)]
    pub transport: crate::net::Transport,
    /// UDP with flow affinity: the flow table (shared by the instance's UDP
    /// listeners).
    #[serde(default)]
    pub flow_table: Option<FlowTableStatus>,
    /// The controller keeps a bridge listener in the group (TCP): it holds
    /// connections while no generation listens there.
    #[serde(default)]
    pub bridge: bool,
    /// Connections the program held on the bridge (since the controller
    /// started).
    #[serde(default)]
    pub bridged: u64,
}

/// How full the UDP flow table is. When full, the least recently used flow
/// is forgotten; its next datagram goes to the active generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Flows of this listener in the table.
    pub flows: u64,
    /// Entries the table holds at most (all UDP listeners together).
    pub capacity: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u64,
    pub pid: Option<u32>,
    pub state: State,
    pub age_ms: u64,
    pub slot: u32,
    /// How it ended (exit status or failure reason).
    pub outcome: Option<String>,
    pub sockets: Vec<SocketStatus>,
    /// Summed over listeners.
    pub counters: CounterStatus,
    /// UDP flows pinned to it now (summed over UDP listeners).
    #[serde(default)]
    pub udp_flows: u64,
    /// The digest of the `--config` files it was started with (the sha256
    /// of what `sha256sum` prints for them: docs/config-aware-reloads.md, "Config identity").
    #[serde(default)]
    pub config_sha256: Option<String>,
    /// Its share of new connections now, in percent (the active generation
    /// 100, or what the canary leaves; a held or draining one 0).
    #[serde(default)]
    pub weight_percent: Option<f64>,
    /// New connections steered to it per second, measured over the last
    /// second while a canary runs.
    #[serde(default)]
    pub steered_per_second: Option<f64>,
    /// Its health checks (`--health-probe`), while it is checked.
    #[serde(default)]
    pub health: Option<HealthStatus>,
    /// Its cgroup (the directory in the cgroup v2 hierarchy), which holds
    /// every process of it; `None` without cgroups (the instance's
    /// `cgroup_unavailable` says why) or once it is removed.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Its established TCP connections on the managed addresses now (for a
    /// draining generation: how many remain). `None` where unavailable
    /// (`unavailable` says why).
    #[serde(default)]
    pub connections: Option<u64>,
    /// Its cgroup's memory (`memory.current`), bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time its processes used (`cpu.stat`), seconds.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Processes in its cgroup.
    #[serde(default)]
    pub processes: Option<u64>,
    /// Why a field above is `None`, by field name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unavailable: std::collections::BTreeMap<String, String>,
    /// Why it is being (or was) evicted while it drained: `memory`
    /// (`--max-draining-memory`) or `count` (`--drain-evict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<String>,
}

/// Health checks of one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub checks: u64,
    /// Failures in a row now.
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// What can be undone now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub kind: RolloutKind,
    /// The new generation (the canary, or the one that replaced the held
    /// one).
    pub generation: u64,
    /// The generation a rollback makes active (held, or active beside the
    /// canary).
    pub previous: u64,
    /// The canary's share of new connections in percent (100 for a hold).
    pub weight_percent: f64,
    /// Canary steps, in percent.
    #[serde(default)]
    pub steps_percent: Vec<f64>,
    /// Which step runs (0-based).
    #[serde(default)]
    pub step: usize,
    /// Time left: of the hold, or until the next canary step or promotion
    /// (None: until `promote` or `rollback`).
    pub remaining_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutKind {
    /// The previous generation is held (`--keep-previous`).
    Hold,
    /// A canary gets a share of new connections (`reload --canary`).
    Canary,
}
/// Why a rollback happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackReason {
    /// `reloader rollback`.
    Manual,
    /// The new generation exited.
    Crash,
    /// The new generation failed its health checks.
    Health,
}

impl RollbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Crash => "crash",
            Self::Health => "health",
        }
    }
}

impl std::fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rollbacks by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackCounts {
    pub manual: u64,
    pub crash: u64,
    pub health: u64,
}

impl RollbackCounts {
    pub fn add(&mut self, reason: RollbackReason) {
        match reason {
            RollbackReason::Manual => self.manual += 1,
            RollbackReason::Crash => self.crash += 1,
            RollbackReason::Health => self.health += 1,
        }
    }

    pub fn get(&self, reason: RollbackReason) -> u64 {
        match reason {
            RollbackReason::Manual => self.manual,
            RollbackReason::Crash => self.crash,
            RollbackReason::Health => self.health,
        }
    }
}

/// What `reloader rollback` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RollbackReport {
    /// The generation that no longer receives new connections.
    pub from: u64,
    /// The generation that receives them again.
    pub to: u64,
    /// How long the map updates took (every listener), in microseconds.
    pub map_update_us: f64,
    /// With `--wait`: from the rollback until `from` exited.
    pub from_exited_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SocketStatus {
    pub addr: String,
    pub inode: u64,
    pub cookie: u64,
    /// Connections waiting in its accept queue now (None once closed).
    pub accept_queue: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStatus {
    /// New connections (UDP: datagrams of new flows, or every datagram of
    /// a stateless listener) sent to the generation.
    pub steered: u64,
    pub migrated: u64,
    pub probe_routed: u64,
    pub fallback: u64,
    /// UDP datagrams of a flow the generation already served.
    #[serde(default)]
    pub affinity: u64,
}

impl From<reloader_ebpf::Counters> for CounterStatus {
    fn from(c: reloader_ebpf::Counters) -> Self {
        Self {
            steered: c.steered,
            migrated: c.migrated,
            probe_routed: c.probe_routed,
            fallback: c.fallback,
            affinity: c.affinity,
        }
    }
}

impl std::ops::AddAssign for CounterStatus {
    fn add_assign(&mut self, o: Self) {
        self.steered += o.steered;
        self.migrated += o.migrated;
        self.probe_routed += o.probe_routed;
        self.fallback += o.fallback;
        self.affinity += o.affinity;
    }
}

/// How a reload ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadResult {
    Succeeded,
    #[default]
    Failed,
    /// It cut over (or ran as a canary) and was then rolled back.
    RolledBack,
}

impl ReloadResult {
    /// The label value metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// One reload: what happened and how long each phase took.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The generation the reload started.
    pub generation: u64,
    /// The generation it replaced, if any.
    pub previous: Option<u64>,
    pub result: ReloadResult,
    /// Why it failed (the previous generation stays active).
    pub error: Option<String>,
    /// The new generation's last stderr lines, when it failed.
    pub stderr_tail: Vec<String>,
    pub spawn_to_ready_ms: Option<f64>,
    pub ready_to_cutover_ms: Option<f64>,
    pub cutover_to_old_exited_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// The config digest of the new generation (`--config`).
    #[serde(default)]
    pub config_sha256: Option<String>,
    /// `--check` refused the reload: nothing was started (its output is
    /// in `error` and `stderr_tail`).
    #[serde(default)]
    pub check_failed: bool,
    /// Its canary plan (`reload --canary`), in percent per step.
    #[serde(default)]
    pub canary_percent: Vec<f64>,
    /// The previous generation is held this long after the cutover
    /// (`--keep-previous`): `reload --wait` returned at the cutover.
    #[serde(default)]
    pub held_ms: Option<f64>,
    /// Why it did not succeed (`None` when it did): the kind, for scripts,
    /// and the generation active when that was decided.
    #[serde(default)]
    pub failure: Option<ReloadFailure>,
    /// How `--drain-command` ran for the generation this reload replaced.
    #[serde(default)]
    pub drain_command: Option<DrainCommandReport>,
}

/// A `--drain-command` run: what `--check` reports, for the drain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainCommandReport {
    /// The generation it drained.
    pub generation: u64,
    /// The command as given.
    pub command: String,
    /// It exited with status 0 (else the drain signal was sent).
    pub ok: bool,
    /// How it ended: `exited with status 0`, `did not finish within 30s
    /// (--drain-timeout; killed)`.
    pub how: String,
    pub duration_ms: f64,
    /// Its last lines of output (stdout and stderr, in order).
    pub output: Vec<String>,
}
