//! What `reloader status` and `reloader reload --wait` report, and how it is
//! shown to people. The JSON form (`--json`) is for scripts: fields are only
//! ever added.

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

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
}

impl ReloadResult {
    /// The label value metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
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
            let config = self
                .config_sha256
                .as_ref()
                .map(|c| format!("; config sha256 {c}"))
                .unwrap_or_default();
            format!(
                "generation {} active{previous}: spawn→ready {}, ready→cutover {}, cutover→old exited {}, total {}{config}",
                self.generation,
                ms(self.spawn_to_ready_ms),
                ms(self.ready_to_cutover_ms),
                ms(self.cutover_to_old_exited_ms),
                ms(self.total_ms),
            )
        } else {
            let error = self.error.as_deref().unwrap_or("unknown error");
            let mut text = format!("reload to generation {} failed", self.generation);
            match self.previous {
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
            let _ = writeln!(out, "{:<46} {active}{flows}", l.addr);
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
            "\nreloads: {} succeeded, {} failed; restarts: {}; drain kills: {}",
            self.reloads_succeeded, self.reloads_failed, self.restarts, self.drain_kills
        );
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
