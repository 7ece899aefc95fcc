//! The section's tables, as Markdown (BENCHMARKS.md takes them as they
//! are).

use std::fmt::Write;

use serde_json::Value;

use super::{Params, dns::DnsResult, probe::Stats, quic::QuicResult};

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

fn per(n: u64, reloads: usize) -> String {
    format!("{:.2}", n as f64 / reloads.max(1) as f64)
}

fn latency(s: &Stats) -> String {
    format!(
        "{} | {} | {} | {} | {}",
        s.queries,
        s.lost,
        ms(s.p50_ms),
        ms(s.p99_ms),
        ms(s.max_ms)
    )
}

pub fn tables(
    params: &Params,
    dns: &[DnsResult],
    quic: &[QuicResult],
    overhead: &[Value],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nDNS: {} reloads every {} ms under `dnsperf -Q 4000` (1 s timeout)\n\n\
         | server | method | reloads (failed) | reload ms, median / max | queries sent | lost | \
         lost/reload | not NOERROR | answered by an older generation |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|",
        params.reloads, params.dns_period_ms
    );
    for r in dns {
        let d = &r.dnsperf;
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {} / {} | {} | {} | {} | {} | {} |",
            r.server,
            r.method,
            r.reloads.len(),
            r.reloads_failed,
            ms(r.reload_ms["median"].as_f64()),
            ms(r.reload_ms["max"].as_f64()),
            d.sent,
            d.lost,
            per(d.lost, r.reloads.len()),
            r.in_reloads.not_noerror + r.outside.not_noerror,
            r.answered_by_older,
        );
    }
    let _ = writeln!(
        out,
        "\nDNS latency, ms, from a client of our own beside dnsperf (200 queries/s over 8 \
         sockets): queries sent within {} ms of a reload (its start to its end) vs the rest\n\n\
         | server | method | in reloads: queries | lost | p50 | p99 | max | outside: queries | \
         lost | p50 | p99 | max |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        super::dns::WINDOW_MARGIN.as_millis()
    );
    for r in dns {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.server,
            r.method,
            latency(&r.in_reloads),
            latency(&r.outside)
        );
    }
    let _ = writeln!(
        out,
        "\nHTTP/3 (Caddy 2.11): {} reloads every {} ms; a long-lived QUIC connection (a request \
         every 100 ms) and 20 new QUIC connections per second\n\n\
         | method | reloads (failed) | reload ms, median / max | long-lived: requests | failed | \
         failed/reload | connections | reconnects | new: connections | failed handshakes | failed \
         requests | failed/reload | reconnects |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        params.reloads, params.quic_period_ms
    );
    for r in quic {
        let n = r.reloads.len();
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.method,
            n,
            r.reloads_failed,
            ms(r.reload_ms["median"].as_f64()),
            ms(r.reload_ms["max"].as_f64()),
            r.long.requests,
            r.long.failed,
            per(r.long.failed, n),
            r.long.connections,
            r.long.reconnects,
            r.new.requests,
            r.new.failed_handshakes,
            r.new.failed_requests,
            per(r.new.failed, n),
            r.new.reconnects,
        );
    }
    for r in quic.iter().filter(|r| r.long.failed + r.new.failed > 0) {
        let _ = writeln!(
            out,
            "\n{} failures: long-lived {:?}; new connections {:?}",
            r.method, r.long.failure_kinds, r.new.failure_kinds
        );
    }
    let _ = writeln!(
        out,
        "\nPer datagram: the steering program attached vs not, same sockets (2 in one group), \
         one client thread sending 32-byte datagrams from 64 flows as fast as it can; {} \
         alternating pairs of {} ms rounds; then the program's own run time from the kernel's \
         BPF statistics (`run_time_ns / run_cnt`, in rounds of their own). `select-only` is \
         not the steering program but the floor under it: a program that only calls \
         `bpf_sk_select_reuseport` by the packet hash (no decisions counted; its runs shown)\n\n\
         | mode | datagrams/s without | with | ratio (median of pairs) | sent ratio (median of \
         pairs) | client CPU ns/datagram without | with | added (median of pairs) | program \
         ns/run (BPF stats) | program decisions: new / known flow |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        params.overhead_pairs, params.overhead_round_ms
    );
    for o in overhead {
        let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.0} | {:.0} | {:.0} | {:.1} | {} / {} |",
            o["mode"].as_str().unwrap_or("?"),
            f("median_received_without_per_s"),
            f("median_received_with_per_s"),
            f("median_pair_ratio_received"),
            f("median_pair_ratio_sent"),
            f("sender_cpu_ns_per_datagram_without"),
            f("sender_cpu_ns_per_datagram_with"),
            f("median_pair_sender_cpu_ns_added"),
            f("program_ns_per_run"),
            o["steered"],
            o["affinity"],
        );
    }
    out
}
