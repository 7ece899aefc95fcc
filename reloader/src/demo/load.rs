//! The one load client (the demo, the tests and the benchmark use it):
//! opens new TCP connections — a fixed number at a time as fast as they
//! complete, or at a fixed rate — sends `GET /` with `Connection: close` on
//! each, and requires a complete `200` response. Every connection becomes
//! one [`Event`]: when it started (`CLOCK_MONOTONIC`, comparable between
//! processes), how long it took, how it ended ([`Kind`]), and who answered
//! ([`Answer`]: the servers reloader's tests and demo run say
//! `gen=N pid=P`). Responses are parsed with httparse; nothing is sampled
//! or estimated.

use std::{
    future::Future,
    io::{self, ErrorKind},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What every connection sends.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n";

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// A complete `200` response.
    Ok = 0,
    /// `connect` failed with `ECONNREFUSED` (no listener, or a listener
    /// that closed with the SYN in flight).
    Refused = 1,
    /// `ECONNRESET`, `ECONNABORTED` or `EPIPE`: the server side reset the
    /// connection (a closed listener's queue, a graceful stop closing an
    /// accepted connection with our request unread).
    Reset = 2,
    /// No complete response within the client's timeout.
    Timeout = 3,
    /// The server closed the connection before a complete response.
    ShortRead = 4,
    /// Anything else: a non-200 response, or a local error (for example
    /// `EADDRNOTAVAIL` when ephemeral ports run out).
    Other = 5,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 6] = [
        Kind::Ok,
        Kind::Refused,
        Kind::Reset,
        Kind::Timeout,
        Kind::ShortRead,
        Kind::Other,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ok => "ok",
            Kind::Refused => "refused",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::ShortRead => "short_read",
            Kind::Other => "other",
        }
    }

    pub fn is_failure(self) -> bool {
        self != Kind::Ok
    }

    pub fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(v)).copied()
    }
}

/// Who answered, as the body says: `gen=N pid=P thread=T caddy=L` (each
/// optional; other words are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Answer {
    pub generation: Option<u64>,
    pub pid: Option<u32>,
    pub thread: Option<u32>,
    /// A server-specific label (which Caddy binary answered).
    pub label: Option<String>,
}

impl Answer {
    pub fn parse(body: &str) -> Self {
        let mut answer = Self::default();
        for (key, value) in body
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
        {
            match key {
                "gen" => answer.generation = value.parse().ok(),
                "pid" => answer.pid = value.parse().ok(),
                "thread" => answer.thread = value.parse().ok(),
                "caddy" if !value.is_empty() => answer.label = Some(value.to_owned()),
                _ => {}
            }
        }
        answer
    }
}

/// One connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` when the connection started, in nanoseconds.
    pub start_ns: u64,
    /// Connect + request + complete response (or until the failure), µs.
    pub latency_us: u32,
    pub kind: Kind,
    /// Who answered (empty unless `kind` is `Ok`).
    pub answer: Answer,
}

impl Event {
    /// The generation that answered, when the response said.
    pub fn generation(&self) -> Option<u64> {
        self.answer.generation
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid timespec to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Classifies a failed connect, send or receive.
pub fn classify_error(error: &io::Error) -> Kind {
    match error.kind() {
        ErrorKind::ConnectionRefused => Kind::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Kind::Reset
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Kind::Timeout,
        ErrorKind::UnexpectedEof => Kind::ShortRead,
        _ => Kind::Other,
    }
}

/// Classifies everything the server sent before it closed the connection:
/// a complete `200` (its whole `Content-Length`, if it gave one) is `Ok`,
/// with the body's [`Answer`].
pub fn classify_response(response: &[u8]) -> (Kind, Answer) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return (Kind::ShortRead, Answer::default()),
        Err(_) => return (Kind::Other, Answer::default()),
    };
    if parsed.code != Some(200) {
        return (Kind::Other, Answer::default());
    }
    let body = &response[head_len..];
    let content_length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    if content_length.is_some_and(|len| body.len() < len) {
        return (Kind::ShortRead, Answer::default());
    }
    (Kind::Ok, Answer::parse(&String::from_utf8_lossy(body)))
}

/// How new connections are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// This many connections at a time, each followed at once by the next:
    /// as fast as the server completes them.
    Concurrency(usize),
    /// This many new connections per second, at most `max_in_flight` open
    /// at once (beyond that the client waits, and the rate drops: the
    /// report shows it).
    Rate {
        per_second: f64,
        max_in_flight: usize,
    },
}

/// A load to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub pace: Pace,
    /// Whole-connection timeout (connect + request + response).
    pub timeout: Duration,
    /// Stop by itself after this long, whatever the caller does.
    pub max_duration: Duration,
}

impl Config {
    /// `concurrency` connections at a time to `addr`, 5 s per connection,
    /// at most 5 minutes in all.
    pub fn concurrent(addr: SocketAddr, concurrency: usize) -> Self {
        Self {
            addr,
            pace: Pace::Concurrency(concurrency),
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(300),
        }
    }
}

/// One connection, start to finish.
pub async fn connection(addr: SocketAddr, timeout: Duration) -> Event {
    let start_ns = monotonic_ns();
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(REQUEST).await?;
        let mut response = Vec::with_capacity(256);
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let (kind, answer) = match tokio::time::timeout(timeout, attempt).await {
        Err(_) => (Kind::Timeout, Answer::default()),
        Ok(Err(error)) => (classify_error(&error), Answer::default()),
        Ok(Ok(response)) => classify_response(&response),
    };
    Event {
        start_ns,
        latency_us: u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX),
        kind,
        answer,
    }
}

/// Runs the load until `stop` completes (or `max_duration` passes), lets
/// the connections in flight finish (each is bounded by the timeout), and
/// gives every connection's event to `record` as it ends. Call inside a
/// tokio runtime with time and I/O enabled.
pub async fn run_with(
    config: Config,
    stop: impl Future<Output = ()>,
    record: impl Fn(Event) + Clone + Send + Sync + 'static,
) {
    let stopping = Arc::new(AtomicBool::new(false));
    let workers = match config.pace {
        Pace::Concurrency(n) => (0..n.max(1))
            .map(|_| {
                let (stopping, config, record) = (stopping.clone(), config.clone(), record.clone());
                tokio::spawn(async move {
                    while !stopping.load(Ordering::Relaxed) {
                        record(connection(config.addr, config.timeout).await);
                    }
                })
            })
            .collect::<Vec<_>>(),
        Pace::Rate {
            per_second,
            max_in_flight,
        } => {
            let (stopping, config) = (stopping.clone(), config.clone());
            vec![tokio::spawn(async move {
                paced(config, per_second, max_in_flight, stopping, record).await
            })]
        }
    };
    tokio::select! {
        () = stop => {}
        () = tokio::time::sleep(config.max_duration) => {}
    }
    stopping.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("load task panicked");
    }
}

/// As [`run_with`], returning every event in start order.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Vec<Event> {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    run_with(config, stop, move |e| {
        sink.lock().expect("events lock").push(e)
    })
    .await;
    let mut events = std::mem::take(&mut *events.lock().expect("events lock"));
    events.sort_by_key(|e| e.start_ns);
    events
}

async fn paced(
    config: Config,
    per_second: f64,
    max_in_flight: usize,
    stopping: Arc<AtomicBool>,
    record: impl Fn(Event) + Clone + Send + Sync + 'static,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(0.001)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    while !stopping.load(Ordering::Relaxed) {
        ticks.tick().await;
        let place = places.clone().acquire_owned().await.expect("never closed");
        let (addr, timeout, record) = (config.addr, config.timeout, record.clone());
        tasks.spawn(async move {
            record(connection(addr, timeout).await);
            drop(place);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_response_is_ok_and_names_who_answered() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\nConnection: close\r\n\r\ngen=7 pid=1234 thread=2\n";
        let (kind, answer) = classify_response(response);
        assert_eq!(kind, Kind::Ok);
        assert_eq!(answer.generation, Some(7));
        assert_eq!(answer.pid, Some(1234));
        assert_eq!(answer.thread, Some(2));
    }

    #[test]
    fn a_response_without_a_generation_is_still_ok() {
        let (kind, answer) = classify_response(b"HTTP/1.1 200 OK\r\n\r\nhello\n");
        assert_eq!((kind, answer.generation), (Kind::Ok, None));
    }

    #[test]
    fn nothing_or_a_cut_response_is_a_short_read() {
        let kind = |r: &[u8]| classify_response(r).0;
        assert_eq!(kind(b""), Kind::ShortRead);
        assert_eq!(kind(b"HTTP/1.1 200 OK\r\nContent-"), Kind::ShortRead);
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\ngen=7"),
            Kind::ShortRead
        );
    }

    #[test]
    fn a_non_200_or_garbage_response_is_other() {
        let kind = |r: &[u8]| classify_response(r).0;
        assert_eq!(
            kind(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
            Kind::Other
        );
        assert_eq!(kind(b"SSH-2.0-OpenSSH\r\n\r\n"), Kind::Other);
    }

    #[test]
    fn answers_name_generation_pid_thread_and_label() {
        let a = Answer::parse("gen=3 pid=99 thread=1 caddy=2.11\n");
        assert_eq!(
            a,
            Answer {
                generation: Some(3),
                pid: Some(99),
                thread: Some(1),
                label: Some("2.11".into()),
            }
        );
        assert_eq!(Answer::parse("hello"), Answer::default());
    }

    #[test]
    fn socket_errors_map_to_kinds() {
        let kind = |k: ErrorKind| classify_error(&io::Error::from(k));
        assert_eq!(kind(ErrorKind::ConnectionRefused), Kind::Refused);
        assert_eq!(kind(ErrorKind::ConnectionReset), Kind::Reset);
        assert_eq!(kind(ErrorKind::BrokenPipe), Kind::Reset);
        assert_eq!(kind(ErrorKind::ConnectionAborted), Kind::Reset);
        assert_eq!(kind(ErrorKind::TimedOut), Kind::Timeout);
        assert_eq!(kind(ErrorKind::UnexpectedEof), Kind::ShortRead);
        assert_eq!(
            classify_error(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)),
            Kind::Other
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_load_against_nothing_counts_every_refusal() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let events = run(
            Config::concurrent(addr, 2),
            tokio::time::sleep(Duration::from_millis(50)),
        )
        .await;
        assert!(!events.is_empty());
        assert!(events.iter().all(|e| e.kind == Kind::Refused));
        assert!(events.windows(2).all(|w| w[0].start_ns <= w[1].start_ns));
    }
}
