//! The DNS section's own latency client. dnsperf gives each query's
//! latency with `-v`, but not when the query was sent, so its latencies
//! cannot be placed next to the reloads. This client sends `gen.test TXT`
//! at a fixed rate alongside dnsperf, from a few sockets (a few flows, so a
//! naive reload's re-spread of the reuseport hash reaches some of them),
//! and stamps every query on `CLOCK_MONOTONIC`, the clock the reloads are
//! timed with.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use reloader::demo::load::monotonic_ns;
use reloader::dns::{TYPE_TXT, query};
use reloader_tests::udp::dns::{GEN_NAME, parse_reply};
use serde::Serialize;
use tokio::net::UdpSocket;

/// Sockets the queries take turns on.
const SOCKETS: usize = 8;

/// One query.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent_ns: u64,
    /// Send to answer; `None`: no answer within the timeout.
    pub latency_ns: Option<u64>,
    /// The answer's rcode and the generation its TXT record named.
    pub rcode: Option<u8>,
    pub generation: Option<u64>,
}

/// A running client.
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Prober {
    /// `per_second` queries to `addr`, each unanswered after `timeout`.
    pub fn start(addr: SocketAddr, per_second: u32, timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Started from the scenario's thread: the same network namespace.
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(run(addr, per_second, timeout, flag))
        });
        Self { stop, thread }
    }

    /// Stops sending, waits one timeout for the last answers, and returns
    /// every query in send order.
    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the DNS latency client panicked")
    }
}

async fn run(
    addr: SocketAddr,
    per_second: u32,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let samples = Rc::new(RefCell::new(Vec::<Sample>::new()));
    // (socket, message id) → index in `samples`.
    let pending = Rc::new(RefCell::new(HashMap::<(usize, u16), usize>::new()));
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind a client socket");
        socket.connect(addr).await.expect("connect a client socket");
        sockets.push(Rc::new(socket));
    }
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut readers = Vec::new();
            for (k, socket) in sockets.iter().enumerate() {
                let (socket, samples, pending) = (socket.clone(), samples.clone(), pending.clone());
                readers.push(tokio::task::spawn_local(async move {
                    let mut buf = [0u8; 1500];
                    while let Ok(n) = socket.recv(&mut buf).await {
                        let at = monotonic_ns();
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        let Some(i) = pending.borrow_mut().remove(&(k, id)) else {
                            continue;
                        };
                        let mut samples = samples.borrow_mut();
                        let sample = &mut samples[i];
                        sample.latency_ns = Some(at.saturating_sub(sample.sent_ns));
                        if let Ok(reply) = parse_reply(id, &buf[..n]) {
                            sample.rcode = Some(reply.rcode);
                            sample.generation = reply.txt.first().and_then(|t| t.parse().ok());
                        }
                    }
                }));
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let k = (seq % SOCKETS as u64) as usize;
                let id = (seq / SOCKETS as u64) as u16;
                let i = {
                    let mut samples = samples.borrow_mut();
                    samples.push(Sample {
                        sent_ns: monotonic_ns(),
                        latency_ns: None,
                        rcode: None,
                        generation: None,
                    });
                    samples.len() - 1
                };
                // An id comes back round after 65,536 × SOCKETS queries:
                // long after the timeout.
                pending.borrow_mut().insert((k, id), i);
                let _ = sockets[k].send(&query(id, GEN_NAME, TYPE_TXT)).await;
                seq += 1;
            }
            tokio::time::sleep(timeout).await;
            for reader in readers {
                reader.abort();
            }
        })
        .await;
    let timeout_ns = timeout.as_nanos() as u64;
    let mut samples = samples.borrow().clone();
    // An answer later than the timeout counts as lost, as for dnsperf.
    for s in &mut samples {
        if s.latency_ns.is_some_and(|l| l > timeout_ns) {
            s.latency_ns = None;
        }
    }
    samples
}

/// Latency of the answered queries, and how many were not answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub queries: usize,
    pub lost: usize,
    pub not_noerror: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Stats {
    pub fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Self {
        let mut stats = Self::default();
        let mut latencies = Vec::new();
        for s in samples {
            stats.queries += 1;
            match s.latency_ns {
                Some(l) => latencies.push(l as f64 / 1e6),
                None => stats.lost += 1,
            }
            if s.rcode.is_some_and(|r| r != 0) {
                stats.not_noerror += 1;
            }
        }
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        stats.p50_ms = at(0.5);
        stats.p99_ms = at(0.99);
        stats.max_ms = latencies.last().copied();
        stats
    }
}
