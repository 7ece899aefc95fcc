//! DNS: unbound and Knot (the udp suite's configs: two UDP sockets per
//! generation, the zone `test.` answered authoritatively) under
//! `dnsperf -Q 4000`, reloaded R times one period apart, naive and under
//! reloader (`udp://…?mode=stateless`, a DNS readiness probe, the default
//! 250 ms settle). dnsperf counts what was lost over the whole run; the
//! latency client ([`super::probe`]) places its queries next to the reloads.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use nix::sys::signal::Signal;
use reloader_tests::udp::{
    dns::{self, DnsServer, Kind},
    dnsperf::Dnsperf,
    naive::{self, Naive},
};
use serde::Serialize;
use serde_json::Value;

use super::{
    Generations, Method, Reload, durations_ms, in_window,
    probe::{Prober, Stats},
};
use crate::bench::server::in_netns;

pub const KINDS: [Kind; 2] = [Kind::Unbound, Kind::Knot];
/// From one reload's start to the next.
pub const PERIOD: Duration = Duration::from_secs(1);
const ADDR: &str = "127.0.0.1:5353";
/// dnsperf: queries per second, client sockets, per-query timeout (as in
/// the udp suite).
const QPS: u32 = 4000;
const CLIENTS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(1);
/// The latency client's rate.
const PROBE_QPS: u32 = 200;
/// A query sent within this of a reload (its start to its end) is in a
/// reload window.
pub const WINDOW_MARGIN: Duration = Duration::from_millis(100);

fn addr() -> SocketAddr {
    ADDR.parse().expect("address")
}

/// dnsperf's statistics.
#[derive(Clone, Debug, Serialize)]
pub struct DnsperfStats {
    pub command: String,
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub interrupted: u64,
    pub response_codes: String,
}

/// One DNS scenario's results.
#[derive(Clone, Debug, Serialize)]
pub struct DnsResult {
    pub server: String,
    pub version: String,
    pub method: &'static str,
    pub seconds: f64,
    pub reloads: Vec<Reload>,
    pub reloads_failed: usize,
    pub reload_ms: Value,
    pub dnsperf: DnsperfStats,
    /// The latency client: queries inside reload windows, outside them.
    pub in_reloads: Stats,
    pub outside: Stats,
    /// Latency-client queries answered by an older generation than the
    /// newest whose reload had completed before they were sent.
    pub answered_by_older: usize,
    /// reloader's eBPF counters summed over the generations.
    pub counters: Option<Value>,
}

impl DnsResult {
    /// What would be a reloader bug.
    pub fn bugs(&self) -> Vec<String> {
        let mut bugs = Vec::new();
        let d = &self.dnsperf;
        if d.lost > 0 || self.in_reloads.lost + self.outside.lost > 0 {
            bugs.push(format!(
                "{} under reloader: dnsperf lost {} of {} queries, the latency client {} of {}",
                self.server,
                d.lost,
                d.sent,
                self.in_reloads.lost + self.outside.lost,
                self.in_reloads.queries + self.outside.queries
            ));
        }
        if self.reloads_failed > 0 {
            let errors: Vec<_> = self
                .reloads
                .iter()
                .filter_map(|r| r.error.as_ref())
                .collect();
            bugs.push(format!("{}: failed reloads: {errors:?}", self.server));
        }
        bugs
    }
}

pub fn run(kind: Kind, method: Method, reloads: usize) -> Result<DnsResult> {
    in_netns(move || measure(kind, method, reloads))
}

fn measure(kind: Kind, method: Method, reloads: usize) -> Result<DnsResult> {
    let server = DnsServer::new(kind, addr(), reloads as u64 + 1);
    let mut generations = match method {
        Method::Naive => Generations::Naive(Naive::start(naive::Plan {
            command: server.command.clone(),
            env: Vec::new(),
            port: addr().port(),
            udp_sockets: server.udp_sockets,
            drain: Signal::SIGTERM,
            drain_timeout: Duration::from_secs(10),
            dir: server.dir.path().to_owned(),
            serves: Box::new(|g| dns::generation(addr()) == Ok(g)),
        })),
        Method::Reloader => {
            let listen = format!("udp://{ADDR}?mode=stateless");
            let probe = format!("dns://{ADDR}/{}", dns::GEN_NAME);
            Generations::reloader(
                &[
                    "--listen",
                    &listen,
                    "--ready-probe",
                    &probe,
                    "--drain-signal",
                    server.drain,
                    "--drain-timeout",
                    "10s",
                ],
                &server.command,
                &[],
            )?
        }
    };
    let started = std::time::Instant::now();
    let prober = Prober::start(addr(), PROBE_QPS, TIMEOUT);
    let load = Dnsperf::start(addr(), QPS, CLIENTS, TIMEOUT);
    std::thread::sleep(PERIOD);
    let done = generations.reload_every(reloads, PERIOD);
    // Every query sent during the reloads has been answered or timed out.
    std::thread::sleep(TIMEOUT + Duration::from_millis(500));
    let samples = prober.finish();
    let command = load.command.clone();
    let report = load.finish();
    let seconds = started.elapsed().as_secs_f64();
    let counters = generations.stop()?;

    let inside = |t: u64| in_window(&done, t, WINDOW_MARGIN);
    let answered_by_older = samples
        .iter()
        .filter(|s| {
            let newest = done
                .iter()
                .filter(|r| r.end_ns < s.sent_ns)
                .filter_map(|r| r.generation)
                .max()
                .unwrap_or(1);
            s.generation.is_some_and(|g| g < newest)
        })
        .count();
    Ok(DnsResult {
        server: server.name.to_owned(),
        version: server.version.clone(),
        method: method.name(),
        seconds,
        reloads_failed: done.iter().filter(|r| r.error.is_some()).count(),
        reload_ms: durations_ms(&done),
        dnsperf: DnsperfStats {
            command,
            sent: report.sent,
            completed: report.completed,
            lost: report.lost,
            interrupted: report.interrupted,
            response_codes: report.response_codes,
        },
        in_reloads: Stats::of(samples.iter().filter(|s| inside(s.sent_ns))),
        outside: Stats::of(samples.iter().filter(|s| !inside(s.sent_ns))),
        answered_by_older,
        counters,
        reloads: done,
    })
}
