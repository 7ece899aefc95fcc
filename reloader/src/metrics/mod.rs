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
//! | `reloader_child_restarts_total` | counter | |
//! | `reloader_drain_kills_total` | counter | |
//! | `reloader_log_lines_dropped_total` | counter | |
//! | `reloader_rollbacks_total` | counter | `reason` = manual, crash, health |
//! | `reloader_generation_weight` | gauge | `generation` (share of new connections, 0–1) |
//! | `reloader_connections_steered_per_second` | gauge | `generation` (during a canary) |
//! | `reloader_held_generation` | gauge | (0: none) |
//! | `reloader_canary_generation` | gauge | (0: none) |
//! | `reloader_rollout_remaining_seconds` | gauge | `kind` = hold, canary (until the hold ends or the next step) |

mod server;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
pub use server::{Source, bind, serve};

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
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            reloads: Family::default(),
            phases: Family::new_with_constructor(phase_histogram),
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

    /// Rollback and canary: counts by reason, weights, what is held.
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

        let restarts = Counter::<u64>::default();
        restarts.inc_by(status.restarts);
        registry.register(
            "child_restarts",
            "Active generations that exited on their own and were replaced",
            restarts,
        );
        let kills = Counter::<u64>::default();
        kills.inc_by(status.drain_kills);
        registry.register(
            "drain_kills",
            "Draining generations killed at the drain timeout",
            kills,
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
