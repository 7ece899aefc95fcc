//! A bounded load of new connections for the privileged tests, driven by
//! the one load client ([`reloader::demo::load`]) on a thread of its own:
//! each connection sends an HTTP request and must read a complete `200`
//! response naming the generation that served it. Every connection's
//! outcome is kept, so tests can assert "no failure" and "answered by the
//! expected generation".

use std::{
    net::SocketAddr,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use reloader::demo::load::{self as client, Answer, Config, Kind};
use tokio::sync::oneshot;

/// Hard limit on how long a load may run, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(300);

/// One connection's outcome.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When the connection started, from the start of the load.
    pub started: Duration,
    /// The generation that answered, or what went wrong.
    pub result: Result<u64, String>,
    /// Who answered (pid, thread), when the server said.
    pub answer: Answer,
}

/// A running load.
pub struct Load {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Vec<client::Event>>,
    pub start: Instant,
    start_ns: u64,
    start_wall: std::time::SystemTime,
}

/// A finished load.
#[derive(Debug, Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Wall-clock time of the load's start (to place failures on the
    /// controller log's timeline).
    start_wall: Option<std::time::SystemTime>,
}

impl Load {
    /// Starts `concurrency` connection loops against `addr`.
    pub fn start(addr: SocketAddr, concurrency: usize) -> Self {
        Self::start_bounded(addr, concurrency, MAX_RUN)
    }

    /// As [`Load::start`], stopping by itself after `max_run`.
    pub fn start_bounded(addr: SocketAddr, concurrency: usize, max_run: Duration) -> Self {
        let (stop, stopped) = oneshot::channel();
        let config = Config {
            max_duration: max_run,
            ..Config::concurrent(addr, concurrency)
        };
        let start = Instant::now();
        let start_ns = client::monotonic_ns();
        let start_wall = std::time::SystemTime::now();
        let thread = std::thread::spawn(move || {
            runtime().block_on(client::run(config, async {
                let _ = stopped.await;
            }))
        });
        Self {
            stop,
            thread,
            start,
            start_ns,
            start_wall,
        }
    }

    /// Stops the clients and collects every outcome.
    pub fn finish(self) -> Report {
        let _ = self.stop.send(());
        let events = self.thread.join().expect("load thread");
        let start_ns = self.start_ns;
        Report {
            outcomes: events.iter().map(|e| outcome(e, start_ns)).collect(),
            start_wall: Some(self.start_wall),
        }
    }
}

fn outcome(event: &client::Event, start_ns: u64) -> Outcome {
    let result = match (event.kind, event.generation()) {
        (Kind::Ok, Some(generation)) => Ok(generation),
        (Kind::Ok, None) => Err("a 200 that does not say which generation answered".into()),
        (kind, _) => Err(kind.name().to_owned()),
    };
    Outcome {
        started: Duration::from_nanos(event.start_ns.saturating_sub(start_ns)),
        result,
        answer: event.answer.clone(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime")
}

impl Report {
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// Asserts that no connection failed, listing the first failures and
    /// the kernel's TCP counters of the test's network namespace (which
    /// says what happened where no tracer runs, e.g. in the VM).
    pub fn assert_no_failures(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} of {} connections failed; first ones: {:?}\nthey started at (UTC, the \
             controller log's clock): {}\nTCP counters of this network namespace (non-zero): {}",
            failures.len(),
            self.total(),
            &failures[..failures.len().min(10)],
            failures
                .iter()
                .take(10)
                .filter_map(|f| Some(utc_time(self.start_wall? + f.started)))
                .collect::<Vec<_>>()
                .join(", "),
            tcp_counters()
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

/// One connection: who answered a complete `200`, or what went wrong.
pub fn answer(addr: SocketAddr) -> Result<Answer, String> {
    answer_within(addr, Duration::from_secs(5))
}

/// As [`answer`], for a client that waits up to `timeout`.
pub fn answer_within(addr: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    let event = runtime().block_on(client::connection(addr, timeout));
    match event.kind {
        Kind::Ok => Ok(event.answer),
        kind => Err(kind.name().to_owned()),
    }
}

/// One connection: the generation that answered.
pub fn request(addr: SocketAddr) -> Result<u64, String> {
    let answer = answer(addr)?;
    answer
        .generation
        .ok_or_else(|| format!("no generation in the answer {answer:?}"))
}

/// `HH:MM:SS.ffffff` of `time`, in UTC.
fn utc_time(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let day = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        since.subsec_micros()
    )
}

/// The non-zero `Tcp` and `TcpExt` counters of the calling thread's network
/// namespace (`/proc/thread-self/net/snmp` and `netstat`): a reset's kind
/// shows there (`TCPAbortOnData`, `TCPMigrateReqFailure`, `OutRsts`, ...).
pub fn tcp_counters() -> String {
    let mut counters = Vec::new();
    for file in ["snmp", "netstat"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut names = names.split_whitespace();
            let prefix = names.next().unwrap_or_default();
            if prefix != "Tcp:" && prefix != "TcpExt:" {
                continue;
            }
            for (name, value) in names.zip(values.split_whitespace().skip(1)) {
                if value != "0" {
                    counters.push(format!("{name}={value}"));
                }
            }
        }
    }
    counters.join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_counters_name_the_non_zero_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let counters = super::tcp_counters();
        assert!(counters.contains("ActiveOpens="), "{counters}");
        assert!(!counters.contains("=0 "), "{counters}");
    }

    #[test]
    fn utc_time_reads_like_the_controller_log() {
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::from_micros(86_400_000_000 + 3_723_000_042);
        assert_eq!(super::utc_time(t), "01:02:03.000042");
    }
}
