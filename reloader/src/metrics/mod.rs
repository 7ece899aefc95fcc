//! Prometheus metrics (`reloader run --metrics ADDR`), encoded by
//! prometheus-client in the OpenMetrics text format.
//!
//! Event metrics (reloads, phase durations, restarts, drain kills) are
//! recorded as they happen. State metrics (generations by state, the BPF
//! counters per generation) are read at scrape time from the same snapshot
//! `reloader status` shows, so the two never disagree.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `reloader_reloads_total` | counter | `result` = succeeded, failed, rolled_back |
//! | `reloader_reload_phase_seconds` | histogram | `phase` = spawn_to_ready, ready_to_cutover, cutover_to_old_exited, total |
//! | `reloader_generations` | gauge | `state` |
//! | `reloader_active_generation` | gauge | |
//! | `reloader_connections_steered_total` | counter | `generation` |
//! | `reloader_connections_migrated_total` | counter | `generation` |
//! | `reloader_connections_probe_routed_total` | counter | `generation` |
//! | `reloader_connections_fallback_total` | counter | `generation` |
//! | `reloader_datagrams_affinity_total` | counter | `generation` |
//! | `reloader_udp_flows` | gauge | `generation` |
//! | `reloader_udp_flow_table_entries` | gauge | `listener` |
//! | `reloader_udp_flow_table_capacity` | gauge | |
//! | `reloader_connections_bridged_total` | counter | `listener` (held on the bridge while no generation listened) |
//! | `reloader_child_restarts_total` | counter | `reason` (`crash`, `stopped_listening`) |
//! | `reloader_drain_kills_total` | counter | |
//! | `reloader_drain_evictions_total` | counter | `reason`: `memory`, `count` |
//! | `reloader_log_lines_dropped_total` | counter | |
//! | `reloader_rollbacks_total` | counter | `reason` = manual, crash, health |
//! | `reloader_generation_weight` | gauge | `generation` (share of new connections, 0–1) |
//! | `reloader_connections_steered_per_second` | gauge | `generation` (during a canary) |
//! | `reloader_held_generation` | gauge | (0: none) |
//! | `reloader_canary_generation` | gauge | (0: none) |
//! | `reloader_rollout_remaining_seconds` | gauge | `kind` = hold, canary (until the hold ends or the next step) |
//! | `reloader_reload_check_failures_total` | counter | |
//! | `reloader_generation_info` | gauge (1) | `generation`, `config_sha256` |
//! | `reloader_generation_connections` | gauge | `generation` (established TCP connections on the managed addresses) |
//! | `reloader_generation_memory_bytes` | gauge | `generation` (its cgroup's `memory.current`) |
//! | `reloader_generation_cpu_seconds_total` | counter | `generation` (its cgroup's `cpu.stat`) |
//! | `reloader_generation_processes` | gauge | `generation` (processes in its cgroup) |
//! | `reloader_active_config_info` | gauge (1) | `config_sha256` |
//! | `reloader_config_last_reload_successful` | gauge (0/1) | |
//! | `reloader_config_last_reload_success_timestamp_seconds` | gauge | |
//!
//! Config identity follows the conventions of ingress-nginx
//! (`nginx_ingress_controller_config_hash`,
//! `…_config_last_reload_successful`) and of `_info` metrics (a constant 1
//! carrying labels), so "which config does every replica serve" is a
//! `count by (config_sha256)` away. A reload refused by `--check` counts
//! as failed in `reloader_reloads_total` and, apart, in
//! `reloader_reload_check_failures_total`: a separate counter rather than
//! a `reason` label, so the existing `reloads_total` series keep their
//! labels and queries written for them keep working.

mod server;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
pub use server::{Endpoints, Source, serve};

use crate::{
    generation::State,
    status::{CounterStatus, ReloadReport, StatusReport},
};

type Labels = Vec<(String, String)>;
/// A per-generation BPF counter family: name, help, which field.
type CounterField = (&'static str, &'static str, fn(&CounterStatus) -> u64);

/// Phase duration buckets: 1 ms to ~65 s.
fn phase_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

/// Metrics recorded as events happen.
#[derive(Clone)]
pub struct Recorder {
    reloads: Family<Labels, Counter>,
    phases: Family<Labels, Histogram, fn() -> Histogram>,
    check_failures: Counter,
    /// The last config load (first start included): whether it succeeded,
    /// and when the last one that did (Unix seconds). Unknown after an
    /// adoption until the next reload.
    config: std::sync::Arc<std::sync::Mutex<ConfigLoads>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct ConfigLoads {
    last_successful: Option<bool>,
    last_success_unix: Option<f64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            reloads: Family::default(),
            phases: Family::new_with_constructor(phase_histogram),
            check_failures: Counter::default(),
            config: Default::default(),
        }
    }
}

fn label(key: &str, value: impl ToString) -> Labels {
    vec![(key.to_owned(), value.to_string())]
}

impl Recorder {
    /// Records a reload's result and the phases it reached.
    pub fn reload(&self, report: &ReloadReport) {
        self.reloads
            .get_or_create(&label("result", report.result.as_str()))
            .inc();
        if report.check_failed {
            self.check_failures.inc();
        }
        for (phase, ms) in [
            ("spawn_to_ready", report.spawn_to_ready_ms),
            ("ready_to_cutover", report.ready_to_cutover_ms),
            ("cutover_to_old_exited", report.cutover_to_old_exited_ms),
            ("total", report.total_ms),
        ] {
            if let Some(ms) = ms {
                self.phases
                    .get_or_create(&label("phase", phase))
                    .observe(ms / 1000.0);
            }
        }
    }

    /// Records the result of a config load: a reload, a restart or the
    /// first start (a reload that never began a generation, refused at a
    /// stop, is none). Only a reload that succeeded counts as successful:
    /// a failed one, one refused by `--check`, and one rolled back (the
    /// previous config serves again) do not.
    pub fn config_loaded(&self, report: &ReloadReport) {
        if report.generation == 0 {
            return;
        }
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let succeeded = report.result == crate::status::ReloadResult::Succeeded;
        config.last_successful = Some(succeeded);
        if succeeded {
            config.last_success_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs_f64());
        }
    }

    /// The config identity metrics (module comment).
    fn register_config(&self, registry: &mut Registry, status: &StatusReport) {
        registry.register(
            "reload_check_failures",
            "Reloads refused by --check (nothing was started; also counted as failed reloads)",
            self.check_failures.clone(),
        );
        let info = Family::<Labels, Gauge>::default();
        for g in status.generations.iter().filter(|g| g.state.is_live()) {
            if let Some(digest) = &g.config_sha256 {
                info.get_or_create(&vec![
                    ("generation".to_owned(), g.generation.to_string()),
                    ("config_sha256".to_owned(), digest.clone()),
                ])
                .set(1);
            }
        }
        registry.register(
            "generation_info",
            "A live generation and the sha256 of the --config files it started with",
            info,
        );
        let active = Family::<Labels, Gauge>::default();
        if let Some(digest) = &status.active_config_sha256 {
            active.get_or_create(&label("config_sha256", digest)).set(1);
        }
        registry.register(
            "active_config_info",
            "The sha256 of the --config files of the active generation (what this replica serves)",
            active,
        );
        let loads = *self.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(successful) = loads.last_successful {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::from(successful));
            registry.register(
                "config_last_reload_successful",
                "Whether the last config load (reload, restart or first start) succeeded",
                gauge,
            );
        }
        if let Some(unix) = loads.last_success_unix {
            let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            gauge.set(unix);
            registry.register(
                "config_last_reload_success_timestamp_seconds",
                "When the last successful config load completed (Unix time)",
                gauge,
            );
        }
    }

    /// Rollback and canary: counts by reason, weights, what is held.
    /// What each live generation holds (where it is known).
    fn encode_holdings(registry: &mut Registry, status: &StatusReport) {
        let connections = Family::<Labels, Gauge>::default();
        let memory = Family::<Labels, Gauge>::default();
        let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let processes = Family::<Labels, Gauge>::default();
        for g in status.generations.iter().filter(|g| g.state.is_live()) {
            let l = label("generation", g.generation);
            if let Some(n) = g.connections {
                connections.get_or_create(&l).set(n as i64);
            }
            if let Some(bytes) = g.memory_bytes {
                memory.get_or_create(&l).set(bytes as i64);
            }
            if let Some(seconds) = g.cpu_seconds {
                cpu.get_or_create(&l).inc_by(seconds);
            }
            if let Some(n) = g.processes {
                processes.get_or_create(&l).set(n as i64);
            }
        }
        registry.register(
            "generation_connections",
            "Established TCP connections each generation holds on the managed addresses",
            connections,
        );
        registry.register(
            "generation_memory_bytes",
            "Memory of each generation's cgroup (memory.current)",
            memory,
        );
        registry.register(
            "generation_cpu_seconds",
            "CPU time each generation's processes used (its cgroup's cpu.stat)",
            cpu,
        );
        registry.register(
            "generation_processes",
            "Processes in each generation's cgroup",
            processes,
        );
    }

    fn encode_rollout(&self, registry: &mut Registry, status: &StatusReport) {
        use crate::status::{RollbackReason, RolloutKind};
        let rollbacks = Family::<Labels, Counter>::default();
        for reason in [
            RollbackReason::Manual,
            RollbackReason::Crash,
            RollbackReason::Health,
        ] {
            rollbacks
                .get_or_create(&label("reason", reason))
                .inc_by(status.rollbacks.get(reason));
        }
        registry.register(
            "rollbacks",
            "Rollbacks to the previous generation, by reason",
            rollbacks,
        );
        let weights = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let rates = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for g in status.generations.iter().filter(|g| g.state.is_live()) {
            if let Some(w) = g.weight_percent {
                weights
                    .get_or_create(&label("generation", g.generation))
                    .set(w / 100.0);
            }
            if let Some(r) = g.steered_per_second {
                rates
                    .get_or_create(&label("generation", g.generation))
                    .set(r);
            }
        }
        registry.register(
            "generation_weight",
            "Share of new connections a live generation gets (0 to 1)",
            weights,
        );
        registry.register(
            "connections_steered_per_second",
            "New connections steered to a generation per second while a canary runs",
            rates,
        );
        let held = Gauge::<i64>::default();
        let canary = Gauge::<i64>::default();
        let remaining = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        if let Some(r) = &status.rollout {
            let kind = match r.kind {
                RolloutKind::Hold => {
                    held.set(r.previous as i64);
                    "hold"
                }
                RolloutKind::Canary => {
                    canary.set(r.generation as i64);
                    "canary"
                }
            };
            if let Some(ms) = r.remaining_ms {
                remaining
                    .get_or_create(&label("kind", kind))
                    .set(ms as f64 / 1000.0);
            }
        }
        registry.register(
            "held_generation",
            "The previous generation kept for a rollback (--keep-previous; 0: none)",
            held,
        );
        registry.register(
            "canary_generation",
            "The generation running as a canary (0: none)",
            canary,
        );
        registry.register(
            "rollout_remaining_seconds",
            "Time left of the hold, or until the canary's next step or promotion",
            remaining,
        );
    }

    /// The OpenMetrics text for a scrape, with state read from `status`.
    pub fn encode(&self, status: &StatusReport) -> String {
        let mut registry = Registry::with_prefix("reloader");
        self.register_config(&mut registry, status);
        registry.register(
            "reloads",
            "Reloads by result (the first generation's start is not a reload)",
            self.reloads.clone(),
        );
        registry.register(
            "reload_phase_seconds",
            "Duration of each reload phase",
            self.phases.clone(),
        );

        let generations = Family::<Labels, Gauge>::default();
        for state in [
            State::Starting,
            State::Ready,
            State::Active,
            State::Canary,
            State::Draining,
            State::Exited,
            State::Failed,
        ] {
            generations.get_or_create(&label("state", state)).set(0);
        }
        for g in &status.generations {
            generations.get_or_create(&label("state", g.state)).inc();
        }
        registry.register(
            "generations",
            "Generations known, by state (ended ones: the recent history)",
            generations,
        );
        Self::encode_holdings(&mut registry, status);

        let active = Gauge::<i64>::default();
        active.set(
            status
                .listeners
                .first()
                .and_then(|l| l.active_generation)
                .map_or(0, |g| g as i64),
        );
        registry.register(
            "active_generation",
            "The generation receiving new connections (0: none)",
            active,
        );

        let families: [CounterField; 5] = [
            (
                "connections_steered",
                "New connections the steering program sent to a generation",
                |c| c.steered,
            ),
            (
                "connections_migrated",
                "Queued connections of closing listeners moved to a generation",
                |c| c.migrated,
            ),
            (
                "connections_probe_routed",
                "Readiness probes routed to a generation",
                |c| c.probe_routed,
            ),
            (
                "connections_fallback",
                "Decisions left to the kernel's hash while a generation's slot was the target",
                |c| c.fallback,
            ),
            (
                "datagrams_affinity",
                "UDP datagrams of a known flow kept with the generation serving it",
                |c| c.affinity,
            ),
        ];
        for (name, help, field) in families {
            let family = Family::<Labels, Counter>::default();
            for g in &status.generations {
                family
                    .get_or_create(&label("generation", g.generation))
                    .inc_by(field(&g.counters));
            }
            registry.register(name, help, family);
        }

        let flows = Family::<Labels, Gauge>::default();
        for g in status.generations.iter().filter(|g| g.state.is_live()) {
            flows
                .get_or_create(&label("generation", g.generation))
                .set(g.udp_flows as i64);
        }
        registry.register("udp_flows", "UDP flows pinned to a generation now", flows);
        let table = Family::<Labels, Gauge>::default();
        let capacity = Gauge::<i64>::default();
        for l in &status.listeners {
            if let Some(t) = l.flow_table {
                table
                    .get_or_create(&label("listener", &l.addr))
                    .set(t.flows as i64);
                capacity.set(t.capacity as i64);
            }
        }
        registry.register(
            "udp_flow_table_entries",
            "Flows of a UDP listener in the flow table",
            table,
        );
        registry.register(
            "udp_flow_table_capacity",
            "Entries the UDP flow table holds at most (--udp-flows)",
            capacity,
        );
        let bridged = Family::<Labels, Counter>::default();
        for l in status.listeners.iter().filter(|l| l.bridge) {
            bridged
                .get_or_create(&label("listener", &l.addr))
                .inc_by(l.bridged);
        }
        registry.register(
            "connections_bridged",
            "Connections held on the controller's bridge listener while no generation listened",
            bridged,
        );

        let restarts = Family::<Labels, Counter>::default();
        restarts
            .get_or_create(&label("reason", "crash"))
            .inc_by(status.restarts - status.restarts_stopped_listening);
        restarts
            .get_or_create(&label("reason", "stopped_listening"))
            .inc_by(status.restarts_stopped_listening);
        registry.register(
            "child_restarts",
            "Active generations replaced because they exited on their own (crash) or stopped \
             listening on a managed address for 5s (stopped_listening)",
            restarts,
        );
        let kills = Counter::<u64>::default();
        kills.inc_by(status.drain_kills);
        registry.register(
            "drain_kills",
            "Draining generations killed at the drain timeout",
            kills,
        );
        let evictions = Family::<Labels, Counter>::default();
        for reason in ["memory", "count"] {
            evictions
                .get_or_create(&label("reason", reason))
                .inc_by(status.drain_evictions.get(reason).copied().unwrap_or(0));
        }
        registry.register(
            "drain_evictions",
            "Draining generations evicted before their drain timeout: over \
             --max-draining-memory (memory) or beyond --max-draining with --drain-evict (count)",
            evictions,
        );

        let dropped = Counter::<u64>::default();
        dropped.inc_by(status.log_lines_dropped);
        registry.register(
            "log_lines_dropped",
            "Log lines (the controller's and its servers' stderr) dropped because the \
             controller's stderr was not read fast enough",
            dropped,
        );

        self.encode_rollout(&mut registry, status);

        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}
