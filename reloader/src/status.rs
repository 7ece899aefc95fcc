//! What `reloader status` and `reloader reload --wait` report, and how it is
//! shown to people. The JSON form (`--json`) is for scripts: fields are only
//! ever added.

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

pub use crate::error::{FailureKind, ReloadFailure};
use crate::generation::{State, human_duration};

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
    /// Active generations that crashed and were replaced.
    pub restarts: u64,
    /// Draining generations killed at the drain timeout.
    pub drain_kills: u64,
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
    /// The config digest (`--config`) of the active generation: what this
    /// replica serves now. `reloader status --json | jq -r
    /// .active_config_sha256` answers "which config runs here?".
    #[serde(default)]
    pub active_config_sha256: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// As given to `--listen` (`udp://…` for UDP).
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
    /// of what `sha256sum` prints for them: README "Config identity").
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

impl RolloutStatus {
    /// One line for people.
    pub fn human(&self) -> String {
        let left = |what: &str| {
            self.remaining_ms
                .map(|ms| format!(", {what} in {}", human_duration(Duration::from_millis(ms))))
                .unwrap_or_default()
        };
        match self.kind {
            RolloutKind::Hold => format!(
                "hold: generation {} is kept (receives nothing new){}; `reloader rollback` makes \
                 it active again instead of generation {}",
                self.previous,
                left("drains"),
                self.generation
            ),
            RolloutKind::Canary => {
                let next = if self.step + 1 < self.steps_percent.len() {
                    left("next step")
                } else {
                    left("promoted")
                };
                format!(
                    "canary: generation {} gets {}% of new connections (step {} of {}{next}), \
                     generation {} the rest; `reloader promote` or `reloader rollback`",
                    self.generation,
                    self.weight_percent,
                    self.step + 1,
                    self.steps_percent.len().max(1),
                    self.previous
                )
            }
        }
    }
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

impl RollbackReport {
    pub fn human(&self) -> String {
        let exited = self
            .from_exited_ms
            .map(|ms| {
                format!(
                    "; generation {} exited after {}",
                    self.from,
                    human_duration(Duration::from_secs_f64(ms / 1000.0))
                )
            })
            .unwrap_or_else(|| format!("; generation {} drains", self.from));
        format!(
            "rolled back: generation {} active again (maps switched in {}){exited}",
            self.to,
            human_duration(Duration::from_secs_f64(self.map_update_us / 1e6)),
        )
    }
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
}

fn ms(v: Option<f64>) -> String {
    v.map(|ms| human_duration(Duration::from_secs_f64(ms / 1000.0)))
        .unwrap_or_else(|| "-".into())
}

impl ReloadReport {
    /// One line for people.
    pub fn human(&self) -> String {
        if self.result == ReloadResult::Succeeded {
            let previous = self
                .previous
                .map(|p| format!(" (replaced {p})"))
                .unwrap_or_default();
            let canary = if self.canary_percent.is_empty() {
                String::new()
            } else {
                let steps: Vec<String> = self
                    .canary_percent
                    .iter()
                    .map(|p| format!("{p}%"))
                    .collect();
                format!(", promoted after a canary at {}", steps.join(","))
            };
            let old = match (self.held_ms, self.previous) {
                (Some(held), Some(previous)) => format!(
                    "generation {previous} held for {} (`reloader rollback` makes it active again)",
                    ms(Some(held))
                ),
                _ => format!("cutover→old exited {}", ms(self.cutover_to_old_exited_ms)),
            };
            let config = self
                .config_sha256
                .as_ref()
                .map(|c| format!("; config sha256 {c}"))
                .unwrap_or_default();
            format!(
                "generation {} active{previous}{canary}: spawn→ready {}, ready→cutover {}, {old}, total {}{config}",
                self.generation,
                ms(self.spawn_to_ready_ms),
                ms(self.ready_to_cutover_ms),
                ms(self.total_ms),
            )
        } else if self.result == ReloadResult::RolledBack {
            format!(
                "generation {} was rolled back: {}",
                self.generation,
                self.error.as_deref().unwrap_or("rolled back")
            )
        } else {
            let error = self.error.as_deref().unwrap_or("unknown error");
            let mut text = format!("reload to generation {} failed", self.generation);
            // Who serves: as the controller saw it when it decided (a
            // later reload may have replaced the one this reload replaced).
            let active = match &self.failure {
                Some(failure) => failure.active,
                None => self.previous,
            };
            match active {
                // The check's output ends its error: say what still runs first.
                Some(previous) if self.check_failed => {
                    let _ = write!(text, " (generation {previous} is still active): {error}");
                }
                Some(previous) => {
                    let _ = write!(text, ": {error}; generation {previous} is still active");
                }
                None => {
                    let _ = write!(text, ": {error}");
                }
            }
            // A failed check's output is part of its error already.
            if !self.stderr_tail.is_empty() && !self.check_failed {
                text.push_str("\nlast stderr lines of the new generation:");
                for line in &self.stderr_tail {
                    let _ = write!(text, "\n  {line}");
                }
            }
            text
        }
    }
}

/// The first 12 hex digits, for the table (the full digest is printed
/// below it and in `--json`).
fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

impl StatusReport {
    /// The aligned table `reloader status` prints.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "instance {} (controller pid {}), steering {}, up {}",
            self.name,
            self.pid,
            self.steering,
            human_duration(Duration::from_millis(self.uptime_ms))
        );
        let _ = writeln!(
            out,
            "\nLISTENER                                       ACTIVE"
        );
        for l in &self.listeners {
            let active = l
                .active_generation
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into());
            let flows = l
                .flow_table
                .map(|t| format!("  (flow table {}/{})", t.flows, t.capacity))
                .unwrap_or_default();
            let bridged = if l.bridged > 0 {
                format!("  (bridge held {})", l.bridged)
            } else {
                String::new()
            };
            let _ = writeln!(out, "{:<46} {active}{flows}{bridged}", l.addr);
        }
        let _ = writeln!(
            out,
            "\n{:>4}  {:>8}  {:<9} {:>8}  {:>9} {:>9} {:>7} {:>9}  SOCKETS (inode:queue)",
            "GEN", "PID", "STATE", "AGE", "STEERED", "MIGRATED", "PROBED", "FALLBACK"
        );
        for g in &self.generations {
            let sockets: Vec<String> = g
                .sockets
                .iter()
                .map(|s| {
                    let queue = s
                        .accept_queue
                        .map(|q| q.to_string())
                        .unwrap_or_else(|| "closed".into());
                    format!("{} {}:{queue}", s.addr, s.inode)
                })
                .collect();
            let pid = g.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let mut line = format!(
                "{:>4}  {:>8}  {:<9} {:>8}  {:>9} {:>9} {:>7} {:>9}  {}",
                g.generation,
                pid,
                g.state,
                human_duration(Duration::from_millis(g.age_ms)),
                g.counters.steered,
                g.counters.migrated,
                g.counters.probe_routed,
                g.counters.fallback,
                sockets.join(", ")
            );
            if g.counters.affinity > 0 || g.udp_flows > 0 {
                let _ = write!(
                    line,
                    "  [udp: {} flows, {} datagrams kept with their flow]",
                    g.udp_flows, g.counters.affinity
                );
            }
            if let Some(weight) = g.weight_percent.filter(|_| self.rollout.is_some()) {
                let rate = g
                    .steered_per_second
                    .map(|r| format!(", {r:.0} steered/s"))
                    .unwrap_or_default();
                let _ = write!(line, "  [{weight}% of new connections{rate}]");
            }
            if let Some(health) = g.health.as_ref().filter(|h| h.consecutive_failures > 0) {
                let _ = write!(
                    line,
                    "  [health: {} failures in a row: {}]",
                    health.consecutive_failures,
                    health.last_error.as_deref().unwrap_or("?")
                );
            }
            if let Some(outcome) = &g.outcome {
                let _ = write!(line, "  ({outcome})");
            }
            if let Some(config) = &g.config_sha256 {
                let _ = write!(line, "  config {}", short_digest(config));
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let _ = writeln!(
            out,
            "\nreloads: {} succeeded, {} failed, {} rolled back; restarts: {}; drain kills: {}",
            self.reloads_succeeded,
            self.reloads_failed,
            self.reloads_rolled_back,
            self.restarts,
            self.drain_kills
        );
        if let Some(rollout) = &self.rollout {
            let _ = writeln!(out, "{}", rollout.human());
        }
        let r = &self.rollbacks;
        if r.manual + r.crash + r.health > 0 {
            let _ = writeln!(
                out,
                "rollbacks: {} manual, {} after a crash, {} after failed health checks",
                r.manual, r.crash, r.health
            );
        }
        if let Some(godebug) = self
            .server_environment
            .iter()
            .find(|e| e.starts_with("GODEBUG="))
        {
            let _ = writeln!(
                out,
                "servers get {godebug} (Go listens with plain TCP: MPTCP listeners cannot be steered)"
            );
        }
        if let Some(config) = &self.active_config_sha256 {
            let _ = writeln!(out, "active config sha256 {config}");
        }
        if let Some(recovered) = &self.recovered {
            let _ = writeln!(out, "at start: {recovered}");
        }
        if let Some(last) = &self.last_reload {
            let _ = writeln!(out, "last reload: {}", last.human());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_reports_name_the_config_and_what_a_check_refused() {
        let done = ReloadReport {
            generation: 3,
            previous: Some(2),
            result: ReloadResult::Succeeded,
            config_sha256: Some("ab".repeat(32)),
            ..ReloadReport::default()
        };
        assert!(
            done.human()
                .starts_with("generation 3 active (replaced 2): ")
        );
        assert!(
            done.human()
                .ends_with(&format!("; config sha256 {}", "ab".repeat(32)))
        );
        let refused = ReloadReport {
            generation: 3,
            previous: Some(2),
            error: Some(
                "--check `nginx -t` exited with status 1: nothing was started; it printed:\n  bad"
                    .into(),
            ),
            stderr_tail: vec!["bad".into()],
            check_failed: true,
            ..ReloadReport::default()
        };
        assert_eq!(
            refused.human(),
            "reload to generation 3 failed (generation 2 is still active): --check `nginx -t` \
             exited with status 1: nothing was started; it printed:\n  bad",
            "the output once, after what still runs"
        );
        let failed = ReloadReport {
            check_failed: false,
            ..refused.clone()
        };
        assert!(
            failed
                .human()
                .contains("; generation 2 is still active\nlast stderr lines")
        );
    }
}
