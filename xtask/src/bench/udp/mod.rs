//! `cargo xtask bench --udp`: UDP servers reloaded the naive way (start
//! N+1 beside N with `SO_REUSEPORT`, then stop N) and under reloader, in one
//! run so the ratios mean something; plus the steering program's cost per
//! datagram.
//!
//! - DNS ([`dns`]): unbound and Knot under dnsperf, R reloads at a fixed
//!   period: queries lost, and latency inside reload windows vs outside
//!   them from a client of our own ([`probe`]).
//! - HTTP/3 ([`quic`]): Caddy 2.11 with the aioquic clients (a long-lived
//!   connection and a stream of new connections): failed handshakes and
//!   requests, reconnects.
//! - Per datagram: `steerbench overhead-udp`, stateless, flows and flows
//!   that churn the flow table, and the floor under them: a program that
//!   only selects a socket (`select-only`), measured the same way.
//!
//! Every scenario runs in a thread of its own that unshares a network
//! namespace (the servers, clients and reloader it starts inherit it). The
//! servers and clients are the udp test suite's (`reloader_tests::udp`);
//! `cargo xtask test-deps` installs them.

mod dns;
mod probe;
mod quic;
mod render;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use reloader::{demo::load::monotonic_ns, status::CounterStatus};
use reloader_tests::{
    instance::{Instance, process_alive},
    udp::naive::Naive,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::scenario::Bins;

/// How the generations are replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Naive,
    Reloader,
}

impl Method {
    pub const ALL: [Self; 2] = [Self::Naive, Self::Reloader];

    pub fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Reloader => "reloader",
        }
    }
}

/// One reload, timed on `CLOCK_MONOTONIC`.
#[derive(Clone, Debug, Serialize)]
pub struct Reload {
    pub start_ns: u64,
    pub end_ns: u64,
    pub generation: Option<u64>,
    pub error: Option<String>,
}

/// The generations of one scenario, whichever way they are replaced.
pub enum Generations {
    Naive(Naive),
    Reloader {
        instance: Instance,
        /// The eBPF counters of every generation seen, as last read.
        counters: BTreeMap<u64, CounterStatus>,
    },
}

impl Generations {
    /// Starts `reloader run ARGS -- COMMAND` and waits until every listener
    /// has an active generation.
    pub fn reloader(args: &[&str], command: &[String], env: &[(String, String)]) -> Result<Self> {
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut instance = Instance::spawn_with_env(tempfile::tempdir()?, args, &command, &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if instance.serving() {
                instance.remember_pids();
                return Ok(Self::Reloader {
                    instance,
                    counters: BTreeMap::new(),
                });
            }
            if !process_alive(instance.pid()) || Instant::now() > deadline {
                bail!(
                    "reloader run {args:?} -- {command:?}: no generation active on every \
                     listener within 30s; its log:\n{}",
                    instance.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One reload: the generation it made active, or why it failed.
    fn reload(&mut self) -> Result<u64, String> {
        match self {
            Self::Naive(naive) => naive.reload(),
            Self::Reloader { instance, .. } => {
                let reload = instance.reload_wait();
                if reload.ok() {
                    Ok(reload.done().generation)
                } else {
                    let generation = reload
                        .report()
                        .map_or_else(|| "none".into(), |r| r.generation.to_string());
                    Err(format!("generation {generation} failed: {}", reload.why()))
                }
            }
        }
    }

    /// Notes the counters of the generations `status` lists (it keeps the
    /// last few).
    fn read_counters(&mut self) {
        if let Self::Reloader { instance, counters } = self {
            for g in instance.status().generations {
                counters.insert(g.generation, g.counters);
            }
        }
    }

    /// `reloads` reloads, one starting every `period` (or at once when the
    /// previous one took longer).
    pub fn reload_every(&mut self, reloads: usize, period: Duration) -> Vec<Reload> {
        let mut done = Vec::new();
        for _ in 0..reloads {
            let started = Instant::now();
            let start_ns = monotonic_ns();
            let result = self.reload();
            let end_ns = monotonic_ns();
            done.push(Reload {
                start_ns,
                end_ns,
                generation: result.as_ref().ok().copied(),
                error: result.err(),
            });
            self.read_counters();
            if let Some(rest) = period.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        done
    }

    /// Stops the generations; for reloader, the eBPF counters summed over
    /// every generation.
    pub fn stop(mut self) -> Result<Option<Value>> {
        self.read_counters();
        match self {
            Self::Naive(naive) => {
                naive.stop();
                Ok(None)
            }
            Self::Reloader {
                mut instance,
                counters,
            } => {
                let status = instance.stop();
                if !status.success() {
                    bail!(
                        "reloader stop: the controller exited with {status}; its log:\n{}",
                        instance.log_text()
                    );
                }
                let mut sum = CounterStatus::default();
                for c in counters.values() {
                    sum += *c;
                }
                Ok(Some(serde_json::to_value(sum)?))
            }
        }
    }
}

/// Whether `t_ns` falls within `margin` of a reload (from its start to its
/// end).
pub fn in_window(reloads: &[Reload], t_ns: u64, margin: Duration) -> bool {
    let m = margin.as_nanos() as u64;
    reloads
        .iter()
        .any(|r| t_ns + m >= r.start_ns && t_ns <= r.end_ns + m)
}

/// Median and max of the reloads' durations, ms.
pub fn durations_ms(reloads: &[Reload]) -> Value {
    let mut d: Vec<f64> = reloads
        .iter()
        .map(|r| (r.end_ns - r.start_ns) as f64 / 1e6)
        .collect();
    d.sort_by(f64::total_cmp);
    json!({
        "median": d.get(d.len() / 2),
        "max": d.last(),
    })
}

/// The section's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct Params {
    pub reloads: usize,
    pub dns_period_ms: u64,
    pub quic_period_ms: u64,
    pub overhead_pairs: usize,
    pub overhead_round_ms: u64,
}

/// Runs the section: prints its tables, writes the JSON (by default
/// target/bench/udp.json), and fails when reloader lost a query or failed
/// a request or a reload (a bug, not a number). `reloads` per scenario: 20
/// by default, 5 with `quick`.
pub fn run(
    bins: &Bins,
    root: &Path,
    quick: bool,
    reloads: Option<usize>,
    json_path: Option<PathBuf>,
) -> Result<()> {
    let started = Instant::now();
    let reloads = reloads.unwrap_or(if quick { 5 } else { 20 });
    let json_path = json_path.unwrap_or_else(|| root.join("target/bench/udp.json"));
    crate::deps::install().context("the udp section needs the udp suite's servers and clients")?;
    let params = Params {
        reloads,
        dns_period_ms: dns::PERIOD.as_millis() as u64,
        quic_period_ms: quic::PERIOD.as_millis() as u64,
        overhead_pairs: if quick { 5 } else { 20 },
        overhead_round_ms: 200,
    };
    let machine = super::machine();
    eprintln!(
        "bench --udp: {reloads} reloads per scenario; {}",
        machine["summary"]
    );
    let mut dns_results = Vec::new();
    for kind in dns::KINDS {
        for method in Method::ALL {
            let t = Instant::now();
            eprint!("bench --udp: DNS {kind:?} / {} ... ", method.name());
            let result = dns::run(kind, method, reloads)?;
            eprintln!(
                "{:.0}s: {} queries sent, {} lost",
                t.elapsed().as_secs_f64(),
                result.dnsperf.sent,
                result.dnsperf.lost
            );
            dns_results.push(result);
        }
    }
    let mut quic_results = Vec::new();
    for method in Method::ALL {
        let t = Instant::now();
        eprint!("bench --udp: HTTP/3 Caddy / {} ... ", method.name());
        let result = quic::run(method, reloads)?;
        eprintln!(
            "{:.0}s: {} + {} failed",
            t.elapsed().as_secs_f64(),
            result.long.failed,
            result.new.failed
        );
        quic_results.push(result);
    }
    let mut overhead = Vec::new();
    for mode in ["select-only", "stateless", "flows", "flows-churn"] {
        eprintln!("bench --udp: per-datagram overhead, {mode} ...");
        overhead.push(overhead_udp(bins, mode, &params)?);
    }

    let versions = versions(&dns_results, &quic_results);
    let tables = render::tables(&params, &dns_results, &quic_results, &overhead);
    println!("{tables}");
    let seconds = started.elapsed().as_secs_f64();
    let document = json!({
        "command": format!("cargo xtask {}", std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
        "mode": if quick { "quick" } else { "full" },
        "seconds": seconds,
        "machine": machine,
        "versions": versions,
        "params": params,
        "dns": dns_results,
        "quic": quic_results,
        "overhead": overhead,
        "tables": tables,
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    eprintln!(
        "bench --udp: done in {seconds:.0}s; wrote {}",
        json_path.display()
    );

    let mut bugs = Vec::new();
    for r in dns_results.iter().filter(|r| r.method == "reloader") {
        bugs.extend(r.bugs());
    }
    for r in quic_results.iter().filter(|r| r.method == "reloader") {
        bugs.extend(r.bugs());
    }
    if !bugs.is_empty() {
        bail!(
            "reloader lost traffic or failed a reload (a bug):\n{}",
            bugs.join("\n")
        );
    }
    Ok(())
}

fn overhead_udp(bins: &Bins, mode: &str, params: &Params) -> Result<Value> {
    let args = [
        "overhead-udp",
        "--mode",
        mode,
        "--pairs",
        &params.overhead_pairs.to_string(),
        "--round-ms",
        &params.overhead_round_ms.to_string(),
    ];
    let out = Command::new(&bins.steerbench)
        .args(args)
        .output()
        .with_context(|| format!("failed to run {}", bins.steerbench.display()))?;
    if !out.status.success() {
        bail!(
            "steerbench {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("steerbench printed no JSON")
}

/// What ran, for the record.
fn versions(dns: &[dns::DnsResult], quic: &[quic::QuicResult]) -> Value {
    let first_line = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| l.contains("Version") || l.contains("version"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let python = reloader_tests::servers::venv().join("bin/python");
    let aioquic = Command::new(&python)
        .args(["-c", "import aioquic; print(aioquic.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut servers = serde_json::Map::new();
    for r in dns {
        servers.insert(r.server.clone(), r.version.clone().into());
    }
    for r in quic {
        servers.insert(r.server.clone(), r.version.clone().into());
    }
    json!({
        "servers": servers,
        "dnsperf": first_line("dnsperf", &["-h"]),
        "aioquic": aioquic,
    })
}
