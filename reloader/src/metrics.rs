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
//! | `reloader_reloads_total` | counter | `result` = succeeded, failed |
//! | `reloader_reload_phase_seconds` | histogram | `phase` = spawn_to_ready, ready_to_cutover, cutover_to_old_exited, total |
//! | `reloader_generations` | gauge | `state` |
//! | `reloader_active_generation` | gauge | |
//! | `reloader_connections_steered_total` | counter | `generation` |
//! | `reloader_connections_migrated_total` | counter | `generation` |
//! | `reloader_connections_probe_routed_total` | counter | `generation` |
//! | `reloader_connections_fallback_total` | counter | `generation` |
//! | `reloader_child_restarts_total` | counter | |
//! | `reloader_drain_kills_total` | counter | |

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{debug, info, warn};

use crate::{
    controller::Shared,
    status::{CounterStatus, StatusReport},
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
pub struct Metrics {
    reloads: Family<Labels, Counter>,
    phases: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
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

impl Metrics {
    /// Records a reload's result and the phases it reached.
    pub fn reload(&self, report: &crate::status::ReloadReport) {
        self.reloads
            .get_or_create(&label("result", &report.result))
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
            "starting", "ready", "active", "draining", "exited", "failed",
        ] {
            generations.get_or_create(&label("state", state)).set(0);
        }
        for g in &status.generations {
            generations.get_or_create(&label("state", &g.state)).inc();
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

        let families: [CounterField; 4] = [
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

        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` on `addr` until the process exits.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on /metrics");
    }
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (bounded size and time).
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < head.len() {
                    let n = stream.read(&mut head[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let request = String::from_utf8_lossy(&head[..len]);
            let response = if request.starts_with("GET /metrics ") || request.starts_with("GET / ")
            {
                let status = crate::controller::status(&shared);
                let body = shared.metrics.encode(&status);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; \
                     charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, %error, "metrics response");
            }
        });
    }
}

/// Binds the metrics address (before anything starts, so a taken port is
/// an error the user sees at once).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        warn!(%addr, error = %e, "cannot serve metrics");
        anyhow::anyhow!("--metrics {addr}: cannot listen there: {e}")
    })
}
