//! The tables `cargo xtask bench` prints (and BENCHMARKS.md quotes).

use std::fmt::Write as _;

use super::{Micro, ScenarioResult};

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Every table, as plain text (also valid Markdown).
pub fn render(results: &[ScenarioResult], micro: &Micro) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Connections (failed = did not get a complete response)\n"
    );
    let _ = writeln!(
        out,
        "| server | method | reloads | connections | failed | refused | reset | timeout | short read | other | failed/reload | conn/s |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let s = &r.summary;
        let k = |name: &str| s.failed_by_kind.get(name).copied().unwrap_or(0);
        let failed_reloads = if s.reloads_failed > 0 {
            format!(" ({} failed)", s.reloads_failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}{failed_reloads} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.0} |",
            r.server,
            r.method,
            s.reloads,
            s.connections,
            s.failed,
            k("refused"),
            k("reset"),
            k("timeout"),
            k("short_read"),
            k("other"),
            s.failed_per_reload,
            s.throughput_per_s,
        );
    }

    let _ = writeln!(
        out,
        "\nLatency of successful connections, connect to complete response, ms (in reloads: connections that started during a reload)\n"
    );
    let _ = writeln!(
        out,
        "| server | method | p50 | p99 | max | in reloads: conns | p50 | p99 | max |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let (a, w) = (&r.summary.latency, &r.summary.in_reloads);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.server,
            r.method,
            ms(a.p50_ms),
            ms(a.p99_ms),
            ms(a.max_ms),
            w.connections,
            ms(w.latency.p50_ms),
            ms(w.latency.p99_ms),
            ms(w.latency.max_ms),
        );
    }

    let _ = writeln!(
        out,
        "\nReload phases, ms, median / p99 (plain reloads: \"cutover\" is the stop signal to the old instance)\n"
    );
    let _ = writeln!(
        out,
        "| server | method | spawn → ready | ready → cutover | cutover → old exited | total | total ÷ naive (median) |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|");
    for r in results {
        let p = &r.summary.phases;
        let naive = results
            .iter()
            .find(|n| n.server == r.server && n.method == "naive")
            .map(|n| n.summary.phases.total.median_ms)
            .filter(|&m| p.total.n > 0 && m > 0.0);
        let ratio = naive.map_or_else(
            || "-".to_string(),
            |n| format!("{:.2}", p.total.median_ms / n),
        );
        let cell = |s: &super::report::Stat| {
            if s.n == 0 {
                "-".to_string()
            } else {
                format!("{} / {}", ms(s.median_ms), ms(s.p99_ms))
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.server,
            r.method,
            cell(&p.spawn_to_ready),
            cell(&p.ready_to_cutover),
            cell(&p.cutover_to_old_exited),
            cell(&p.total),
            ratio,
        );
    }

    let _ = writeln!(out, "\nMicro-measurements\n");
    let _ = writeln!(out, "| measurement | result |");
    let _ = writeln!(out, "|---|---|");
    let o = &micro.steering_overhead;
    let _ = writeln!(
        out,
        "| steering overhead: new connections/s with the program ÷ without (target ≥ 0.99) | {:.3} ({:.0} vs {:.0} conn/s; median of per-pair ratios {:.3}) |",
        o["ratio"].as_f64().unwrap_or(f64::NAN),
        o["rate_with_program_per_s"].as_f64().unwrap_or(f64::NAN),
        o["rate_without_program_per_s"].as_f64().unwrap_or(f64::NAN),
        o["median_pair_ratio"].as_f64().unwrap_or(f64::NAN),
    );
    let c = &micro.cutover;
    let us = |v: &serde_json::Value| {
        format!(
            "median {:.0} µs, p99 {:.0} µs, max {:.0} µs (n={})",
            v["median"].as_f64().unwrap_or(f64::NAN),
            v["p99"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN),
            v["n"].as_u64().unwrap_or(0)
        )
    };
    let _ = writeln!(
        out,
        "| cutover: map update → first connection on the new slot (its connect returned; target < 1 ms) | {} |",
        us(&c["update_to_first_connection_on_b_us"])
    );
    let _ = writeln!(
        out,
        "| cutover: map update → the new slot's first accept (blocking accept, includes its wake-up) | {} |",
        us(&c["update_to_first_accept_on_b_us"])
    );
    let _ = writeln!(
        out,
        "| cutover: the map update syscall itself | {} |",
        us(&c["map_update_syscall_us"])
    );
    let _ = writeln!(
        out,
        "| cutover: connections begun after the update returned that reached the old slot | {} of {} |",
        c["stale_connections_to_a_after_update"], c["connections"]
    );
    let i = &micro.idle;
    let _ = writeln!(
        out,
        "| idle controller: wake-ups/s (context switches, all {} threads, over {:.0} s) | {:.1} |",
        i.threads, i.seconds, i.wakeups_per_s
    );
    let _ = writeln!(
        out,
        "| idle controller: RSS | {:.1} MiB |",
        i.rss_kib as f64 / 1024.0
    );
    out
}
