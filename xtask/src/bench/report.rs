//! Turns one scenario's raw material — every connection's event from the
//! load client and the reloads as the orchestrator timed them — into the
//! numbers the bench reports. Pure: no clocks, no I/O.
//!
//! A *reload window* is [reload started, reload complete] (for `reloader`:
//! `reload --wait` called → returned; for the plain reloads: new instance
//! spawned → old instance exited). A connection is in a window when it
//! started inside it.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use reloader_tests::loadgen::{Event, Kind};
use serde::Serialize;

/// How long one reload's phases took, as far as the method can tell.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Phases {
    pub spawn_to_ready_ms: Option<f64>,
    /// For `reloader`: until the map update; for the plain reloads: until
    /// the old instance was sent its stop signal.
    pub ready_to_cutover_ms: Option<f64>,
    pub cutover_to_old_exited_ms: Option<f64>,
    pub total_ms: Option<f64>,
}

impl Phases {
    /// The phases a reloader reload report gives (none without a report).
    pub fn of(report: Option<&reloader::status::ReloadReport>) -> Self {
        Self {
            spawn_to_ready_ms: report.and_then(|r| r.spawn_to_ready_ms),
            ready_to_cutover_ms: report.and_then(|r| r.ready_to_cutover_ms),
            cutover_to_old_exited_ms: report.and_then(|r| r.cutover_to_old_exited_ms),
            total_ms: report.and_then(|r| r.total_ms),
        }
    }
}

/// One reload as the orchestrator saw it (`CLOCK_MONOTONIC`, ns).
#[derive(Clone, Debug, Serialize)]
pub struct Reload {
    pub start_ns: u64,
    pub end_ns: u64,
    pub succeeded: bool,
    pub error: Option<String>,
    pub phases: Phases,
}

/// Percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub n: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Median, 99th percentile and maximum of one phase over all reloads.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Stat {
    pub n: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PhaseStats {
    pub spawn_to_ready: Stat,
    pub ready_to_cutover: Stat,
    pub cutover_to_old_exited: Stat,
    pub total: Stat,
}

/// The connections that started inside reload windows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InReloads {
    pub connections: u64,
    pub failed: u64,
    /// Of the connections that succeeded.
    pub latency: Latency,
}

/// A failed connection, placed relative to the reloads.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Failure {
    pub kind: &'static str,
    /// Seconds since the load started.
    pub at_s: f64,
    /// The last reload (1-based) that started before it, if any.
    pub after_reload: Option<usize>,
    /// Milliseconds after that reload started.
    pub since_reload_start_ms: Option<f64>,
    /// Whether it started before that reload completed.
    pub in_window: bool,
}

/// What one scenario measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub connections: u64,
    pub ok: u64,
    pub failed: u64,
    /// Every failure kind, zero or not.
    pub failed_by_kind: BTreeMap<&'static str, u64>,
    pub reloads: usize,
    pub reloads_failed: usize,
    pub failed_per_reload: f64,
    /// From the first to the last connection start.
    pub duration_s: f64,
    /// Successful connections per second.
    pub throughput_per_s: f64,
    /// Of the connections that succeeded.
    pub latency: Latency,
    pub in_reloads: InReloads,
    pub phases: PhaseStats,
    /// Distinct generations that answered.
    pub generations_answering: usize,
    /// The first failures (at most [`MAX_FAILURES_LISTED`]).
    pub failures: Vec<Failure>,
}

pub const MAX_FAILURES_LISTED: usize = 100;

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        n: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// The index of the last reload that started at or before `t_ns`.
pub fn reload_before(reloads: &[Reload], t_ns: u64) -> Option<usize> {
    reloads
        .partition_point(|r| r.start_ns <= t_ns)
        .checked_sub(1)
}

/// Whether `t_ns` falls inside some reload window (`reloads` sorted by start).
pub fn in_window(reloads: &[Reload], t_ns: u64) -> bool {
    reload_before(reloads, t_ns).is_some_and(|i| t_ns <= reloads[i].end_ns)
}

/// Summarises a scenario; `reloads` must be sorted by start.
pub fn summarize(events: &[Event], reloads: &[Reload]) -> Summary {
    let mut all = histogram();
    let mut windowed = histogram();
    let mut by_kind: BTreeMap<&'static str, u64> = Kind::ALL
        .iter()
        .filter(|k| k.is_failure())
        .map(|k| (k.name(), 0))
        .collect();
    let mut in_reloads = InReloads::default();
    let mut failures = Vec::new();
    let mut generations = std::collections::BTreeSet::new();
    let first = events.first().map_or(0, |e| e.start_ns);
    for e in events {
        let window = reload_before(reloads, e.start_ns);
        let inside = in_window(reloads, e.start_ns);
        if inside {
            in_reloads.connections += 1;
        }
        if e.kind.is_failure() {
            *by_kind.entry(e.kind.name()).or_default() += 1;
            if inside {
                in_reloads.failed += 1;
            }
            if failures.len() < MAX_FAILURES_LISTED {
                failures.push(Failure {
                    kind: e.kind.name(),
                    at_s: (e.start_ns - first) as f64 / 1e9,
                    after_reload: window.map(|i| i + 1),
                    since_reload_start_ms: window
                        .map(|i| (e.start_ns - reloads[i].start_ns) as f64 / 1e6),
                    in_window: inside,
                });
            }
            continue;
        }
        let us = u64::from(e.latency_us).max(1);
        all.saturating_record(us);
        if inside {
            windowed.saturating_record(us);
        }
        if let Some(g) = e.generation {
            generations.insert(g);
        }
    }
    in_reloads.latency = latency(&windowed);
    let connections = events.len() as u64;
    let failed: u64 = by_kind.values().sum();
    let duration_s = events
        .last()
        .map_or(0.0, |last| (last.start_ns - first) as f64 / 1e9);
    Summary {
        connections,
        ok: connections - failed,
        failed,
        failed_by_kind: by_kind,
        reloads: reloads.len(),
        reloads_failed: reloads.iter().filter(|r| !r.succeeded).count(),
        failed_per_reload: if reloads.is_empty() {
            0.0
        } else {
            failed as f64 / reloads.len() as f64
        },
        duration_s,
        throughput_per_s: if duration_s > 0.0 {
            (connections - failed) as f64 / duration_s
        } else {
            0.0
        },
        latency: latency(&all),
        in_reloads,
        phases: phase_stats(reloads),
        generations_answering: generations.len(),
        failures,
    }
}

/// Each phase's statistics over `reloads`.
pub fn phase_stats(reloads: &[Reload]) -> PhaseStats {
    PhaseStats {
        spawn_to_ready: stat(reloads.iter().filter_map(|r| r.phases.spawn_to_ready_ms)),
        ready_to_cutover: stat(reloads.iter().filter_map(|r| r.phases.ready_to_cutover_ms)),
        cutover_to_old_exited: stat(
            reloads
                .iter()
                .filter_map(|r| r.phases.cutover_to_old_exited_ms),
        ),
        total: stat(reloads.iter().filter_map(|r| r.phases.total_ms)),
    }
}

/// Median, p99 (nearest rank) and maximum.
pub fn stat(values: impl Iterator<Item = f64>) -> Stat {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return Stat::default();
    }
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Stat {
        n: v.len(),
        median_ms: rank(0.5),
        p99_ms: rank(0.99),
        max_ms: v[v.len() - 1],
    }
}

/// Connections per time bucket, for the plot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub from_ns: u64,
    pub width_ns: u64,
    /// Successful connections per bucket, by answering generation (0: the
    /// response did not say).
    pub ok_by_generation: BTreeMap<u32, Vec<u32>>,
    pub ok: Vec<u32>,
    pub failed: Vec<u32>,
}

/// Counts the connections that started in [`from_ns`, `to_ns`) into
/// buckets `width_ns` wide.
pub fn buckets(
    events: &[Event],
    from_ns: u64,
    to_ns: u64,
    width_ns: u64,
    by_generation: bool,
) -> Buckets {
    let n = (to_ns.saturating_sub(from_ns)).div_ceil(width_ns.max(1)) as usize;
    let mut b = Buckets {
        from_ns,
        width_ns,
        ok: vec![0; n],
        failed: vec![0; n],
        ..Buckets::default()
    };
    let start = events.partition_point(|e| e.start_ns < from_ns);
    for e in events[start..].iter().take_while(|e| e.start_ns < to_ns) {
        let i = ((e.start_ns - from_ns) / width_ns) as usize;
        if e.kind.is_failure() {
            b.failed[i] += 1;
        } else {
            b.ok[i] += 1;
            if by_generation {
                b.ok_by_generation
                    .entry(e.generation.unwrap_or(0))
                    .or_insert_with(|| vec![0; n])[i] += 1;
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn event(at_ms: u64, kind: Kind, generation: u32, latency_us: u32) -> Event {
        Event {
            start_ns: 1_000 * MS + at_ms * MS,
            latency_us,
            kind,
            generation: (kind == Kind::Ok).then_some(generation),
        }
    }

    fn reload(from_ms: u64, to_ms: u64) -> Reload {
        Reload {
            start_ns: 1_000 * MS + from_ms * MS,
            end_ns: 1_000 * MS + to_ms * MS,
            succeeded: true,
            error: None,
            phases: Phases {
                spawn_to_ready_ms: Some(10.0),
                ready_to_cutover_ms: Some(0.1),
                cutover_to_old_exited_ms: Some((to_ms - from_ms) as f64 - 10.1),
                total_ms: Some((to_ms - from_ms) as f64),
            },
        }
    }

    #[test]
    fn windows_include_both_ends_and_nothing_between_reloads() {
        let reloads = [reload(100, 200), reload(300, 400)];
        let at = |ms: u64| 1_000 * MS + ms * MS;
        assert!(!in_window(&reloads, at(99)));
        assert!(in_window(&reloads, at(100)));
        assert!(in_window(&reloads, at(200)));
        assert!(!in_window(&reloads, at(250)));
        assert!(in_window(&reloads, at(350)));
        assert!(!in_window(&reloads, at(401)));
    }

    #[test]
    fn summary_counts_failures_by_kind_and_cuts_reload_windows() {
        let events = vec![
            event(0, Kind::Ok, 1, 1_000),
            event(50, Kind::Ok, 1, 2_000),
            event(110, Kind::Reset, 0, 500),
            event(150, Kind::Ok, 2, 9_000),
            event(160, Kind::Refused, 0, 100),
            event(250, Kind::Ok, 2, 3_000),
            event(350, Kind::Timeout, 0, 3_000_000),
            event(450, Kind::Ok, 3, 4_000),
        ];
        let reloads = [reload(100, 200), reload(300, 400)];
        let s = summarize(&events, &reloads);
        assert_eq!(s.connections, 8);
        assert_eq!(s.ok, 5);
        assert_eq!(s.failed, 3);
        assert_eq!(s.failed_by_kind["reset"], 1);
        assert_eq!(s.failed_by_kind["refused"], 1);
        assert_eq!(s.failed_by_kind["timeout"], 1);
        assert_eq!(s.failed_by_kind["short_read"], 0);
        assert_eq!(s.failed_per_reload, 1.5);
        assert_eq!(s.generations_answering, 3);
        assert_eq!(s.in_reloads.connections, 4);
        assert_eq!(s.in_reloads.failed, 3);
        // Only the successful connection at 150 ms is in a window.
        assert_eq!(s.in_reloads.latency.n, 1);
        assert!((s.in_reloads.latency.max_ms - 9.0).abs() < 0.01);
        // Failures' latencies stay out of the histogram.
        assert_eq!(s.latency.n, 5);
        assert!((s.latency.max_ms - 9.0).abs() < 0.01);
        assert!((s.latency.p50_ms - 3.0).abs() < 0.01);
        assert!((s.duration_s - 0.45).abs() < 1e-9);
        assert!((s.throughput_per_s - 5.0 / 0.45).abs() < 1e-9);
        assert_eq!(
            s.failures[0],
            Failure {
                kind: "reset",
                at_s: 0.11,
                after_reload: Some(1),
                since_reload_start_ms: Some(10.0),
                in_window: true,
            }
        );
        assert_eq!(s.failures[2].after_reload, Some(2));
        assert_eq!(s.phases.total.n, 2);
        assert_eq!(s.phases.total.median_ms, 100.0);
    }

    #[test]
    fn a_failure_before_any_reload_is_not_attributed_to_one() {
        let events = vec![event(0, Kind::ShortRead, 0, 10), event(5, Kind::Ok, 1, 10)];
        let s = summarize(&events, &[reload(100, 200)]);
        assert_eq!(s.failures[0].after_reload, None);
        assert!(!s.failures[0].in_window);
        assert_eq!(s.in_reloads.connections, 0);
        assert_eq!(s.in_reloads.latency, Latency::default());
    }

    #[test]
    fn stat_takes_nearest_rank_percentiles() {
        let s = stat((1..=100).map(f64::from));
        assert_eq!(
            (s.n, s.median_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(stat(std::iter::empty()), Stat::default());
        let one = stat([7.0].into_iter());
        assert_eq!((one.median_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
    }

    #[test]
    fn buckets_count_by_generation_within_the_range() {
        let events = vec![
            event(0, Kind::Ok, 1, 10),
            event(5, Kind::Ok, 1, 10),
            event(12, Kind::Reset, 0, 10),
            event(15, Kind::Ok, 2, 10),
            event(25, Kind::Ok, 2, 10),
            event(30, Kind::Ok, 2, 10),
        ];
        let b = buckets(
            &events,
            1_000 * MS + 5 * MS,
            1_000 * MS + 30 * MS,
            10 * MS,
            true,
        );
        assert_eq!(b.ok, vec![1, 1, 1]);
        assert_eq!(b.failed, vec![1, 0, 0]);
        assert_eq!(b.ok_by_generation[&1], vec![1, 0, 0]);
        assert_eq!(b.ok_by_generation[&2], vec![0, 1, 1]);
        let totals = buckets(&events, 1_000 * MS, 1_000 * MS + 40 * MS, 20 * MS, false);
        assert_eq!((totals.ok, totals.failed), (vec![3, 2], vec![1, 0]));
        assert!(totals.ok_by_generation.is_empty());
    }
}
