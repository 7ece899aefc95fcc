//! A bounded load of new connections: each opens a TCP connection, sends an
//! HTTP request, and must read a complete `200` response naming the
//! generation that served it. Every connection's outcome is kept, so tests
//! can assert "no failure" and "answered by the expected generation".

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Hard limit on how long a load may run, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(300);

/// One connection's outcome.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When the connection started, from the start of the load.
    pub started: Duration,
    /// The generation that answered, or what went wrong.
    pub result: Result<u64, String>,
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
    pub start: Instant,
}

/// A finished load.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Load {
    /// Starts `concurrency` client threads against `addr`.
    pub fn start(addr: SocketAddr, concurrency: usize) -> Self {
        Self::start_bounded(addr, concurrency, MAX_RUN)
    }

    /// As [`Load::start`], stopping by itself after `max_run`.
    pub fn start_bounded(addr: SocketAddr, concurrency: usize, max_run: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..concurrency)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < max_run {
                        let started = start.elapsed();
                        outcomes.push(Outcome {
                            started,
                            result: request(addr),
                        });
                    }
                    outcomes
                })
            })
            .collect();
        Self {
            stop,
            threads,
            start,
        }
    }

    /// Stops the clients and collects every outcome.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut outcomes: Vec<Outcome> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        outcomes.sort_by_key(|o| o.started);
        Report { outcomes }
    }
}

impl Report {
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// Asserts that no connection failed, listing the first failures.
    pub fn assert_no_failures(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} of {} connections failed; first ones: {:?}",
            failures.len(),
            self.total(),
            &failures[..failures.len().min(10)]
        );
    }

    /// How many connections each generation answered.
    pub fn by_generation(&self) -> std::collections::BTreeMap<u64, usize> {
        let mut map = std::collections::BTreeMap::new();
        for o in &self.outcomes {
            if let Ok(g) = o.result {
                *map.entry(g).or_default() += 1;
            }
        }
        map
    }
}

/// One connection: request, full response, the generation that answered.
pub fn request(addr: SocketAddr) -> Result<u64, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read ({} bytes so far): {e}", response.len()))?;
    let text = String::from_utf8_lossy(&response);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("short or bad response: {text:?}"));
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let generation = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gen="))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("no generation in {body:?}"))?;
    Ok(generation)
}
