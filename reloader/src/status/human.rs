//! How the reports read to people: the one-line summaries of a reload, a
//! rollback and a rollout (`reload --wait`, `rollback`, the controller's
//! log) and the tables `reloader status` prints. Tables are laid out by
//! comfy-table without borders, so they read as aligned columns whatever
//! the widths of their cells; the layout never depends on the terminal.
//! Durations read like `1.2s` ([`human_duration`]).

use std::{fmt::Write as _, time::Duration};

use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};

use super::{
    GenerationStatus, ListenerStatus, ReloadReport, ReloadResult, RollbackReport, RolloutKind,
    RolloutStatus, StatusReport,
};
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
            let mut text = format!(
                "generation {} active{previous}{canary}: spawn→ready {}, ready→cutover {}, {old}, total {}{config}",
                self.generation,
                ms(self.spawn_to_ready_ms),
                ms(self.ready_to_cutover_ms),
                ms(self.total_ms),
            );
            if let Some(run) = &self.drain_command {
                let _ = write!(
                    text,
                    "\n--drain-command for generation {}: {} after {}{}",
                    run.generation,
                    run.how,
                    ms(Some(run.duration_ms)),
                    if run.ok {
                        ""
                    } else {
                        " (the drain signal was sent instead)"
                    }
                );
                for line in &run.output {
                    let _ = write!(text, "\n  {line}");
                }
            }
            text
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
    /// What `reloader status` prints: the instance, its listeners and its
    /// generations as tables, then the counts and what can be undone now.
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
        let _ = writeln!(out, "\n{}", listener_table(&self.listeners));
        let _ = writeln!(
            out,
            "\n{}",
            generation_table(&self.generations, self.rollout.as_ref())
        );
        let stopped_listening = if self.restarts_stopped_listening > 0 {
            format!(
                " ({} of them had stopped listening)",
                self.restarts_stopped_listening
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "\nreloads: {} succeeded, {} failed, {} rolled back; restarts: {}{stopped_listening}; \
             drain kills: {}{}",
            self.reloads_succeeded,
            self.reloads_failed,
            self.reloads_rolled_back,
            self.restarts,
            self.drain_kills,
            if self.drain_evictions.is_empty() {
                String::new()
            } else {
                let by: Vec<String> = self
                    .drain_evictions
                    .iter()
                    .map(|(reason, n)| format!("{n} by {reason}"))
                    .collect();
                format!("; drain evictions: {}", by.join(", "))
            }
        );
        if let Some(rollout) = &self.rollout {
            let _ = writeln!(out, "{}", rollout.human());
        }
        // Every live generation's cgroup is DIR/gen-N: say DIR once.
        let cgroups = self
            .generations
            .iter()
            .find_map(|g| g.cgroup.as_deref())
            .and_then(|c| std::path::Path::new(c).parent());
        match (cgroups, &self.cgroup_unavailable) {
            (Some(dir), _) => {
                let _ = writeln!(out, "cgroups: {}/gen-N", dir.display());
            }
            (None, Some(why)) => {
                let _ = writeln!(out, "no cgroup per generation: {why}");
            }
            (None, None) => {}
        }
        let r = &self.rollbacks;
        if r.manual + r.crash + r.health > 0 {
            let _ = writeln!(
                out,
                "rollbacks: {} manual, {} after a crash, {} after failed health checks",
                r.manual, r.crash, r.health
            );
        }
        // Only where it matters: for a Go server.
        if let Some(godebug) = self
            .server_environment
            .iter()
            .find(|e| e.starts_with("GODEBUG="))
            .filter(|_| self.go_server_seen)
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

/// One row per listener: its address, the generation that gets its new
/// connections, how full the UDP flow table is (UDP with flow affinity) and
/// how many connections its bridge held.
fn listener_table(listeners: &[ListenerStatus]) -> String {
    const COLUMNS: [Column; 4] = [
        Column::left("LISTENER"),
        Column::left("ACTIVE"),
        Column::right("FLOW TABLE").optional(),
        Column::right("BRIDGE HELD").optional(),
    ];
    let rows = listeners.iter().map(|l| {
        [
            l.addr.clone(),
            or_dash(l.active_generation),
            l.flow_table
                .map(|t| format!("{}/{}", t.flows, t.capacity))
                .unwrap_or_default(),
            if l.bridged > 0 {
                l.bridged.to_string()
            } else {
                String::new()
            },
        ]
    });
    render(&COLUMNS, rows)
}

/// One row per generation: its process, state and age, what the program
/// decided for it (summed over listeners), its sockets, its config digest
/// and whatever else applies to it now.
fn generation_table(generations: &[GenerationStatus], rollout: Option<&RolloutStatus>) -> String {
    const COLUMNS: [Column; 15] = [
        Column::right("GEN"),
        Column::right("PID"),
        Column::left("STATE"),
        Column::right("AGE"),
        Column::right("CONNS").optional(),
        Column::right("MEM").optional(),
        Column::right("CPU").optional(),
        Column::right("PROCS").optional(),
        Column::right("STEERED"),
        Column::right("MIGRATED"),
        Column::right("PROBED"),
        Column::right("FALLBACK"),
        Column::left("SOCKETS (inode:queue)"),
        Column::left("CONFIG").optional(),
        Column::left("NOTES").optional(),
    ];
    let rows = generations.iter().map(|g| {
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
        [
            g.generation.to_string(),
            or_dash(g.pid),
            state_shown(g, rollout),
            human_duration(Duration::from_millis(g.age_ms)),
            g.connections.map(|n| n.to_string()).unwrap_or_default(),
            g.memory_bytes.map(human_bytes).unwrap_or_default(),
            g.cpu_seconds
                .map(|s| human_duration(Duration::from_secs_f64(s)))
                .unwrap_or_default(),
            g.processes.map(|n| n.to_string()).unwrap_or_default(),
            g.counters.steered.to_string(),
            g.counters.migrated.to_string(),
            g.counters.probe_routed.to_string(),
            g.counters.fallback.to_string(),
            sockets.join(", "),
            g.config_sha256
                .as_deref()
                .map(short_digest)
                .unwrap_or_default()
                .to_owned(),
            generation_notes(g, rollout.is_some()),
        ]
    });
    render(&COLUMNS, rows)
}

/// Its STATE cell: `held` for the generation `--keep-previous` holds (its
/// state is `draining` — it receives nothing new — but it was not told to
/// drain, and `reloader rollback` makes it active again).
fn state_shown(g: &GenerationStatus, rollout: Option<&RolloutStatus>) -> String {
    let held = rollout.is_some_and(|r| r.kind == RolloutKind::Hold && r.previous == g.generation);
    if held && g.state == crate::generation::State::Draining {
        "held".into()
    } else {
        g.state.to_string()
    }
}

/// What applies to a generation beyond its columns: its UDP flows, its
/// share of new connections while a rollback is possible, failing health
/// checks, how it ended.
fn generation_notes(g: &GenerationStatus, rollout: bool) -> String {
    let mut notes = Vec::new();
    if g.counters.affinity > 0 || g.udp_flows > 0 {
        notes.push(format!(
            "[udp: {} flows, {} datagrams kept with their flow]",
            g.udp_flows, g.counters.affinity
        ));
    }
    if let Some(weight) = g.weight_percent.filter(|_| rollout) {
        let rate = g
            .steered_per_second
            .map(|r| format!(", {r:.0} steered/s"))
            .unwrap_or_default();
        notes.push(format!("[{weight}% of new connections{rate}]"));
    }
    if let Some(health) = g.health.as_ref().filter(|h| h.consecutive_failures > 0) {
        notes.push(format!(
            "[health: {} failures in a row: {}]",
            health.consecutive_failures,
            health.last_error.as_deref().unwrap_or("?")
        ));
    }
    if let Some(reason) = &g.evicted {
        notes.push(format!("[evicted: {reason}]"));
    }
    if let Some(outcome) = &g.outcome {
        notes.push(format!("({outcome})"));
    }
    notes.join("  ")
}

/// `12.3MiB`, `512KiB`, `900B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    format!(
        "{}{}",
        text.strip_suffix(".0").unwrap_or(&text),
        UNITS[unit]
    )
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A column of a status table.
pub(crate) struct Column {
    header: &'static str,
    align: CellAlignment,
    /// Left out when no row has anything in it.
    optional: bool,
}

impl Column {
    pub(crate) const fn left(header: &'static str) -> Self {
        Self {
            header,
            align: CellAlignment::Left,
            optional: false,
        }
    }

    pub(crate) const fn right(header: &'static str) -> Self {
        Self {
            header,
            align: CellAlignment::Right,
            optional: false,
        }
    }

    pub(crate) const fn optional(self) -> Self {
        Self {
            optional: true,
            ..self
        }
    }
}

/// Lays `rows` out under `columns` without borders: two spaces between
/// columns, none before the first, no trailing whitespace, no final newline.
pub(crate) fn render<const N: usize>(
    columns: &[Column; N],
    rows: impl Iterator<Item = [String; N]>,
) -> String {
    let rows: Vec<[String; N]> = rows.collect();
    let shown: Vec<usize> = (0..N)
        .filter(|&i| !columns[i].optional || rows.iter().any(|row| !row[i].is_empty()))
        .collect();
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(
        shown
            .iter()
            .map(|&i| Cell::new(columns[i].header).set_alignment(columns[i].align)),
    );
    for row in &rows {
        table.add_row(shown.iter().map(|&i| Cell::new(&row[i])));
    }
    let last = shown.len().saturating_sub(1);
    for (n, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if n == last { 0 } else { 2 }));
        column.set_cell_alignment(columns[shown[n]].align);
    }
    table.trim_fmt()
}
