//! How the reports read to people: the one-line summaries of a reload, a
//! rollback and a rollout (`reload --wait`, `rollback`, the controller's
//! log) and the aligned table `reloader status` prints. Durations read like
//! `1.2s` ([`human_duration`]).

use std::{fmt::Write as _, time::Duration};

use super::{ReloadReport, ReloadResult, RollbackReport, RolloutKind, RolloutStatus, StatusReport};
use crate::generation::human_duration;

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
