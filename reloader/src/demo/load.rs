//! The demo's load: `concurrency` tasks that each open a new connection,
//! send one HTTP request and require a complete `200` response naming the
//! generation that answered — as fast as they can, until told to stop.
//! Every outcome is counted; nothing is sampled or estimated.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

/// Why a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    Refused,
    Reset,
    Timeout,
    /// The connection closed before a complete response.
    ShortRead,
    Other,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::ShortRead => "short read",
            Self::Other => "other",
        }
    }

    fn of(error: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match error.kind() {
            ConnectionRefused => Self::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe => Self::Reset,
            TimedOut | WouldBlock => Self::Timeout,
            UnexpectedEof => Self::ShortRead,
            _ => Self::Other,
        }
    }
}

/// What the load saw, per second of the run.
#[derive(Debug, Default)]
pub struct Stats {
    /// `answered[s][g]`: connections generation `g` answered in second `s`.
    pub answered: Vec<BTreeMap<u64, u64>>,
    pub failures: BTreeMap<Failure, u64>,
    /// Latency of each successful connection (connect to full response).
    pub latencies_us: Vec<u32>,
}

impl Stats {
    pub fn ok(&self) -> u64 {
        self.answered.iter().flat_map(|s| s.values()).sum()
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Connections per generation over the whole run.
    pub fn per_generation(&self) -> BTreeMap<u64, u64> {
        let mut total = BTreeMap::new();
        for second in &self.answered {
            for (g, n) in second {
                *total.entry(*g).or_default() += n;
            }
        }
        total
    }

    /// The `q` quantile of latencies (0..=1).
    pub fn latency(&mut self, q: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[i]))
    }

    fn record(&mut self, second: usize, result: Result<(u64, Duration), Failure>) {
        match result {
            Ok((generation, latency)) => {
                if self.answered.len() <= second {
                    self.answered.resize_with(second + 1, BTreeMap::new);
                }
                *self.answered[second].entry(generation).or_default() += 1;
                self.latencies_us
                    .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(kind) => *self.failures.entry(kind).or_default() += 1,
        }
    }
}

/// Runs the load against `addr` until `stop` turns true.
pub async fn run(
    addr: SocketAddr,
    concurrency: usize,
    start: Instant,
    stats: Arc<Mutex<Stats>>,
    stop: watch::Receiver<bool>,
) {
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (stats, stop) = (stats.clone(), stop.clone());
            tokio::spawn(async move {
                while !*stop.borrow() {
                    let begun = Instant::now();
                    let result = one(addr).await.map(|g| (g, begun.elapsed()));
                    let second = begun.duration_since(start).as_secs() as usize;
                    stats.lock().expect("stats lock").record(second, result);
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// One connection: the generation that answered, or why it failed.
async fn one(addr: SocketAddr) -> Result<u64, Failure> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Failure::of(&e))?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| Failure::of(&e))?;
        let mut response = Vec::with_capacity(128);
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| Failure::of(&e))?;
        parse(&response)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// The generation named in a complete `200` response.
fn parse(response: &[u8]) -> Result<u64, Failure> {
    let text = std::str::from_utf8(response).map_err(|_| Failure::Other)?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(if text.is_empty() {
            Failure::ShortRead
        } else {
            Failure::Other
        });
    }
    let body = text.split_once("\r\n\r\n").ok_or(Failure::ShortRead)?.1;
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("gen="))
        .and_then(|g| g.parse().ok())
        .ok_or(Failure::ShortRead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_classified() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n\r\ngen=7 pid=1\n"), Ok(7));
        assert_eq!(parse(b""), Err(Failure::ShortRead));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n"), Err(Failure::ShortRead));
        assert_eq!(parse(b"HTTP/1.1 503 Busy\r\n\r\n"), Err(Failure::Other));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::of(&reset), Failure::Reset);
    }

    #[test]
    fn stats_add_up() {
        let mut s = Stats::default();
        s.record(0, Ok((1, Duration::from_millis(1))));
        s.record(2, Ok((2, Duration::from_millis(3))));
        s.record(2, Ok((2, Duration::from_millis(2))));
        s.record(2, Err(Failure::Reset));
        assert_eq!(s.ok(), 3);
        assert_eq!(s.failed(), 1);
        assert_eq!(s.answered.len(), 3);
        assert_eq!(s.per_generation(), BTreeMap::from([(1, 1), (2, 2)]));
        assert_eq!(s.latency(0.5), Duration::from_millis(2));
        assert_eq!(s.latency(1.0), Duration::from_millis(3));
    }
}
