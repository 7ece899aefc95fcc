//! The benchmark's load client (binary `loadgen`, driven by `cargo xtask
//! bench`): opens new TCP connections continuously — a fixed number at a
//! time as fast as they complete, or at a fixed rate — sends a small HTTP
//! request on each and requires a complete response. Every connection
//! becomes one [`Event`]: when it started (`CLOCK_MONOTONIC`, so the
//! orchestrating process can cut reload windows out of it), how long
//! connect + response took, how it ended, and which generation answered
//! (`gen=N` in the body, as the test server and the bench's nginx say).
//!
//! Events are written to a file in a fixed little-endian layout
//! ([`write_events`], [`read_events`]) and aggregated by the bench.

use std::{
    future::Future,
    io::{self, ErrorKind, Read, Write},
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
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

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

    fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(v)).copied()
    }
}

/// One connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` when the connection started, in nanoseconds.
    pub start_ns: u64,
    /// Connect + request + complete response (or until the failure), µs.
    pub latency_us: u32,
    pub kind: Kind,
    /// The generation that answered, when the response said.
    pub generation: Option<u32>,
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
        ErrorKind::TimedOut => Kind::Timeout,
        ErrorKind::UnexpectedEof => Kind::ShortRead,
        _ => Kind::Other,
    }
}

/// Classifies everything the server sent before it closed the connection,
/// and reads the generation that answered from a `gen=N` word of the body.
pub fn classify_response(response: &[u8]) -> (Kind, Option<u32>) {
    let Some(header_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (Kind::ShortRead, None);
    };
    let head = String::from_utf8_lossy(&response[..header_end]);
    let body = &response[header_end + 4..];
    let mut lines = head.split("\r\n");
    let status_ok = lines.next().is_some_and(|status| {
        let mut words = status.split_whitespace();
        words.next().is_some_and(|v| v.starts_with("HTTP/1.")) && words.next() == Some("200")
    });
    if !status_ok {
        return (Kind::Other, None);
    }
    let content_length = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if content_length.is_some_and(|len| body.len() < len) {
        return (Kind::ShortRead, None);
    }
    let generation = String::from_utf8_lossy(body)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gen=")?.parse().ok());
    (Kind::Ok, generation)
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
    let (kind, generation) = match tokio::time::timeout(timeout, attempt).await {
        Err(_) => (Kind::Timeout, None),
        Ok(Err(error)) => (classify_error(&error), None),
        Ok(Ok(response)) => classify_response(&response),
    };
    Event {
        start_ns,
        latency_us: u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX),
        kind,
        generation,
    }
}

/// Runs the load until `stop` completes (or `max_duration` passes), lets
/// the connections in flight finish (each is bounded by the timeout), and
/// returns every connection's event in start order. Call inside a tokio
/// runtime with time and I/O enabled.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Vec<Event> {
    let stopping = Arc::new(AtomicBool::new(false));
    let workers = match config.pace {
        Pace::Concurrency(n) => (0..n.max(1))
            .map(|_| {
                let stopping = stopping.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    let mut events = Vec::new();
                    while !stopping.load(Ordering::Relaxed) {
                        events.push(connection(config.addr, config.timeout).await);
                    }
                    events
                })
            })
            .collect::<Vec<_>>(),
        Pace::Rate {
            per_second,
            max_in_flight,
        } => {
            let stopping = stopping.clone();
            let config = config.clone();
            vec![tokio::spawn(async move {
                paced(config, per_second, max_in_flight, stopping).await
            })]
        }
    };
    tokio::select! {
        () = stop => {}
        () = tokio::time::sleep(config.max_duration) => {}
    }
    stopping.store(true, Ordering::Relaxed);
    let mut events = Vec::new();
    for worker in workers {
        events.extend(worker.await.expect("load task panicked"));
    }
    events.sort_by_key(|e| e.start_ns);
    events
}

async fn paced(
    config: Config,
    per_second: f64,
    max_in_flight: usize,
    stopping: Arc<AtomicBool>,
) -> Vec<Event> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(0.001)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let mut events = Vec::new();
    while !stopping.load(Ordering::Relaxed) {
        ticks.tick().await;
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (addr, timeout) = (config.addr, config.timeout);
        tasks.spawn(async move {
            let event = connection(addr, timeout).await;
            drop(permit);
            event
        });
        while let Some(done) = tasks.try_join_next() {
            events.push(done.expect("connection task panicked"));
        }
    }
    while let Some(done) = tasks.join_next().await {
        events.push(done.expect("connection task panicked"));
    }
    events
}

const MAGIC: &[u8; 8] = b"RLDLOAD1";
const RECORD: usize = 24;

/// Writes events: a magic header, then 24 bytes per event (start_ns u64,
/// latency_us u32, generation u32 with 0 for unknown, kind u8, 7 zero
/// bytes), little-endian.
pub fn write_events(mut out: impl Write, events: &[Event]) -> io::Result<()> {
    out.write_all(MAGIC)?;
    for e in events {
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&e.start_ns.to_le_bytes());
        record[8..12].copy_from_slice(&e.latency_us.to_le_bytes());
        record[12..16].copy_from_slice(&e.generation.unwrap_or(0).to_le_bytes());
        record[16] = e.kind as u8;
        out.write_all(&record)?;
    }
    out.flush()
}

/// Reads what [`write_events`] wrote.
pub fn read_events(mut input: impl Read) -> io::Result<Vec<Event>> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, format!("event file: {what}"));
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes)?;
    let records = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| bad("no RLDLOAD1 header"))?;
    if records.len() % RECORD != 0 {
        return Err(bad("truncated record"));
    }
    records
        .chunks_exact(RECORD)
        .map(|r| {
            let generation = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            Ok(Event {
                start_ns: u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                latency_us: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
                generation: (generation != 0).then_some(generation),
                kind: Kind::from_u8(r[16]).ok_or_else(|| bad("unknown outcome kind"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_response_is_ok_and_names_its_generation() {
        let response =
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\ngen=7 pid=1234\r\n";
        assert_eq!(classify_response(response), (Kind::Ok, Some(7)));
    }

    #[test]
    fn a_response_without_a_generation_is_still_ok() {
        let response = b"HTTP/1.1 200 OK\r\n\r\nhello\n";
        assert_eq!(classify_response(response), (Kind::Ok, None));
    }

    #[test]
    fn nothing_or_a_cut_response_is_a_short_read() {
        assert_eq!(classify_response(b""), (Kind::ShortRead, None));
        assert_eq!(
            classify_response(b"HTTP/1.1 200 OK\r\nContent-"),
            (Kind::ShortRead, None)
        );
        assert_eq!(
            classify_response(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\ngen=7"),
            (Kind::ShortRead, None)
        );
    }

    #[test]
    fn a_non_200_response_is_other() {
        let response = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(classify_response(response), (Kind::Other, None));
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

    #[test]
    fn events_survive_the_file_format() {
        let events: Vec<Event> = Kind::ALL
            .iter()
            .enumerate()
            .map(|(i, &kind)| Event {
                start_ns: 1_000_000_000_000 + i as u64,
                latency_us: 17 * i as u32,
                kind,
                generation: (i % 2 == 0).then_some(i as u32 + 1),
            })
            .collect();
        let mut bytes = Vec::new();
        write_events(&mut bytes, &events).unwrap();
        assert_eq!(bytes.len(), MAGIC.len() + RECORD * events.len());
        assert_eq!(read_events(bytes.as_slice()).unwrap(), events);
        assert!(read_events(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_events(&b"garbage!"[..]).is_err());
    }
}
