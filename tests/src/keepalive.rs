//! The benchmark's keep-alive load client (binary `kaload`, run by
//! `cargo xtask bench --keepalive`): N persistent HTTP/1.1 connections,
//! each sending `GET /` back to back — the next request as soon as the
//! previous response is complete — so each connection is idle only for the
//! moment between a response and the next request.
//!
//! Every request becomes one [`Event`]. A request that does not get a
//! complete `200` fails: the connection could not be opened, the request
//! could not be sent, the server reset the connection or closed it before
//! (or while) answering, or the timeout passed. After a failure the
//! connection is dropped and the next request opens a new one.
//!
//! The client behaves as a correct HTTP/1.1 client does: a response that
//! says `Connection: close` (or an HTTP/1.0 response without
//! `keep-alive`) ends the connection after that response, and the next
//! request goes on a new connection. That is how a server can end a
//! keep-alive connection without failing a request, and it is counted
//! ([`Flags::SERVER_CLOSED`]), not failed.
//!
//! Before each request on a reused connection the client looks whether the
//! server has already closed it (a `MSG_PEEK` that sees the FIN or a
//! reset), as careful clients do (curl checks a connection before reusing
//! it; Go's transport reads idle connections in the background). It sends
//! the request anyway, so the failure is counted, but flags it
//! ([`Flags::CLOSED_BEFORE_SEND`]): such a client would have opened a new
//! connection instead.
//!
//! With `pause`, each connection waits that long between a response and
//! its next request (a client that is not saturating the server; its
//! connections are idle most of the time).
//!
//! With `retry`, a request that failed on a *reused* connection before any
//! byte of its response arrived (the server closed an idle connection while
//! the request was on its way) is sent once more on a new connection, as
//! HTTP clients do for idempotent requests (Go's `net/http` transport,
//! browsers). Both attempts are recorded, so one run says how many requests
//! failed without the retry and how many failed with it.

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

pub use reloader::demo::load::monotonic_ns;
use reloader::demo::load::{Answer, Kind, classify_error};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What every request sends: HTTP/1.1, so the connection stays open unless
/// the server says otherwise.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: load\r\n\r\n";

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Outcome {
    /// A complete `200` response.
    Ok = 0,
    /// A new connection was refused (`ECONNREFUSED`).
    Refused = 1,
    /// A new connection failed otherwise (not refused, not a timeout).
    ConnectFailed = 2,
    /// Writing the request failed (`EPIPE`, `ECONNRESET`): the server had
    /// already closed the connection and said so with a reset.
    SendFailed = 3,
    /// The server reset the connection before any byte of the response.
    Reset = 4,
    /// The server closed the connection (FIN) before any byte of the
    /// response: the request was sent on a connection the server was
    /// closing.
    Closed = 5,
    /// The connection ended after part of the response.
    ShortRead = 6,
    /// No complete response within the timeout.
    Timeout = 7,
    /// A response that is not a `200`, or not HTTP.
    Other = 8,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::Refused,
        Outcome::ConnectFailed,
        Outcome::SendFailed,
        Outcome::Reset,
        Outcome::Closed,
        Outcome::ShortRead,
        Outcome::Timeout,
        Outcome::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::SendFailed => "send_failed",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed",
            Outcome::ShortRead => "short_read",
            Outcome::Timeout => "timeout",
            Outcome::Other => "other",
        }
    }

    pub fn is_failure(self) -> bool {
        self != Outcome::Ok
    }

    /// Whether nothing of the response arrived on a connection that was
    /// open: what an HTTP client may retry for an idempotent request when
    /// the connection was reused.
    pub fn nothing_received(self) -> bool {
        matches!(self, Outcome::SendFailed | Outcome::Reset | Outcome::Closed)
    }

    pub fn from_u8(v: u8) -> Option<Outcome> {
        Outcome::ALL.get(usize::from(v)).copied()
    }
}

/// Facts about one request besides its outcome (a bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(pub u8);

impl Flags {
    /// Sent on a connection that had already carried a request.
    pub const REUSED: u8 = 1;
    /// The retry of a request that failed on a reused connection.
    pub const RETRY: u8 = 2;
    /// The response said `Connection: close`: the client closed the
    /// connection after it.
    pub const SERVER_CLOSED: u8 = 4;
    /// Sent on a reused connection the server had already closed (its FIN
    /// or reset was there before the request was written): a client that
    /// checks before reusing a connection would not have sent it there.
    pub const CLOSED_BEFORE_SEND: u8 = 8;

    pub fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` when the request started (before its connect, for
    /// the first request of a connection), in nanoseconds.
    pub start_ns: u64,
    /// Until the complete response, or the failure, µs.
    pub latency_us: u32,
    pub outcome: Outcome,
    pub flags: Flags,
    /// For a success, the generation that answered; for a failure on a
    /// reused connection, the generation that answered the previous
    /// request on it (the one that closed it).
    pub generation: Option<u32>,
}

/// How to run the load.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    /// Persistent connections, each sending requests back to back.
    pub connections: usize,
    /// Per request (connect included, for a new connection).
    pub timeout: Duration,
    /// Retry a request that failed on a reused connection before any byte
    /// of its response, once, on a new connection.
    pub retry: bool,
    /// Wait this long between a response and the next request on the same
    /// connection.
    pub pause: Duration,
    /// Stop by itself after this long.
    pub max_duration: Duration,
}

/// An open connection and what it has read beyond the last response.
struct Conn {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// The generation that answered its last request.
    generation: Option<u32>,
}

/// What reading one response gave.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub outcome: Outcome,
    pub generation: Option<u32>,
    /// The connection may carry the next request.
    pub keep_alive: bool,
    /// Bytes of the buffer the response used.
    pub used: usize,
}

/// Parses one response at the start of `buffer`. `None`: incomplete so
/// far (read more). `eof`: the server closed the connection, so a
/// response without a length ends here.
pub fn parse_response(buffer: &[u8], eof: bool) -> Option<Response> {
    let fail = |outcome| {
        Some(Response {
            outcome,
            generation: None,
            keep_alive: false,
            used: buffer.len(),
        })
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if eof && buffer.is_empty() => return fail(Outcome::Closed),
        Ok(httparse::Status::Partial) if eof => return fail(Outcome::ShortRead),
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return fail(Outcome::Other),
    };
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let connection = header("connection").unwrap_or_default();
    let mut keep_alive = if parsed.version == Some(0) {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    if header("transfer-encoding").is_some() {
        // The servers measured answer with a Content-Length.
        return fail(Outcome::Other);
    }
    let body_end = match header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(len) if buffer.len() >= head_len + len => head_len + len,
        Some(_) if eof => return fail(Outcome::ShortRead),
        Some(_) => return None,
        // No length: the body ends when the server closes.
        None if eof => {
            keep_alive = false;
            buffer.len()
        }
        None => return None,
    };
    let outcome = if parsed.code == Some(200) {
        Outcome::Ok
    } else {
        Outcome::Other
    };
    let answer = Answer::parse(&String::from_utf8_lossy(&buffer[head_len..body_end]));
    Some(Response {
        outcome,
        generation: answer.generation.and_then(|g| u32::try_from(g).ok()),
        keep_alive,
        used: body_end,
    })
}

/// Sends one request (opening a connection if `conn` is `None`) and reads
/// its response; leaves `conn` open if the connection may be reused.
async fn request(conn: &mut Option<Conn>, config: &Config, retry: bool) -> Event {
    let start_ns = monotonic_ns();
    let started = Instant::now();
    let reused = conn.is_some();
    let mut flags = if reused { Flags::REUSED } else { 0 };
    if retry {
        flags |= Flags::RETRY;
    }
    let previous = conn.as_ref().and_then(|c| c.generation);
    if conn.as_ref().is_some_and(|c| closed_by_peer(&c.stream)) {
        flags |= Flags::CLOSED_BEFORE_SEND;
    }
    let attempt = tokio::time::timeout(config.timeout, exchange(conn, config.addr)).await;
    let (outcome, generation, keep_alive) = match attempt {
        Err(_) => (Outcome::Timeout, previous, false),
        Ok(Err(outcome)) => (outcome, previous, false),
        Ok(Ok(response)) => {
            if response.outcome == Outcome::Ok && !response.keep_alive {
                flags |= Flags::SERVER_CLOSED;
            }
            let generation = if response.outcome == Outcome::Ok {
                response.generation
            } else {
                previous
            };
            (
                response.outcome,
                generation,
                response.keep_alive && response.outcome == Outcome::Ok,
            )
        }
    };
    match conn {
        Some(c) if keep_alive => c.generation = generation,
        _ => *conn = None,
    }
    Event {
        start_ns,
        latency_us: u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX),
        outcome,
        flags: Flags(flags),
        generation,
    }
}

/// Whether the peer has closed or reset the connection: the FIN (a read
/// of 0 bytes) or the reset is queued. Looks without consuming anything.
fn closed_by_peer(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a valid socket and a one-byte buffer; MSG_PEEK leaves the
    // data where it is, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => io::Error::last_os_error().kind() != ErrorKind::WouldBlock,
    }
}

/// How a failed `connect` is counted.
fn connect_outcome(error: &io::Error) -> Outcome {
    static REPORTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    match error.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Outcome::Reset,
        ErrorKind::TimedOut => Outcome::Timeout,
        _ => {
            if REPORTED.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("kaload: connect failed: {error}");
            }
            Outcome::ConnectFailed
        }
    }
}

async fn exchange(conn: &mut Option<Conn>, addr: SocketAddr) -> Result<Response, Outcome> {
    if conn.is_none() {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| connect_outcome(&e))?;
        let _ = stream.set_nodelay(true);
        *conn = Some(Conn {
            stream,
            buffer: Vec::with_capacity(512),
            generation: None,
        });
    }
    let c = conn.as_mut().expect("connected above");
    c.stream
        .write_all(REQUEST)
        .await
        .map_err(|_| Outcome::SendFailed)?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = parse_response(&c.buffer, false) {
            c.buffer.drain(..response.used);
            return Ok(response);
        }
        let n = match c.stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => {
                return Err(match (classify_error(&e), c.buffer.is_empty()) {
                    (Kind::Reset, true) => Outcome::Reset,
                    (Kind::Reset, false) => Outcome::ShortRead,
                    (Kind::Timeout, _) => Outcome::Timeout,
                    _ => Outcome::Other,
                });
            }
        };
        if n == 0 {
            let response = parse_response(&c.buffer, true).expect("complete at EOF");
            c.buffer.clear();
            return Ok(response);
        }
        c.buffer.extend_from_slice(&chunk[..n]);
    }
}

/// One connection's loop: requests back to back until `stopping`.
async fn connection_loop(
    config: Config,
    stopping: Arc<AtomicBool>,
    record: impl Fn(Event) + Send + Sync,
) {
    let mut conn = None;
    while !stopping.load(Ordering::Relaxed) {
        if !config.pause.is_zero() {
            tokio::time::sleep(config.pause).await;
        }
        let event = request(&mut conn, &config, false).await;
        let retry =
            config.retry && event.flags.has(Flags::REUSED) && event.outcome.nothing_received();
        record(event);
        if retry {
            record(request(&mut conn, &config, true).await);
        }
    }
}

/// Runs the load until `stop` completes (or `max_duration` passes), lets
/// the requests in flight finish, and returns every request's event in
/// start order. Call inside a tokio runtime with time and I/O enabled.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Vec<Event> {
    let stopping = Arc::new(AtomicBool::new(false));
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..config.connections.max(1))
        .map(|_| {
            let (config, stopping, sink) = (config.clone(), stopping.clone(), events.clone());
            tokio::spawn(connection_loop(config, stopping, move |e| {
                sink.lock().expect("events lock").push(e)
            }))
        })
        .collect();
    tokio::select! {
        () = stop => {}
        () = tokio::time::sleep(config.max_duration) => {}
    }
    stopping.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("keep-alive load task panicked");
    }
    let mut events = std::mem::take(&mut *events.lock().expect("events lock"));
    events.sort_by_key(|e| e.start_ns);
    events
}

const MAGIC: &[u8; 8] = b"RLDKEEP1";

/// Writes events: the `RLDKEEP1` header, then a record per event
/// ([`crate::events`]).
pub fn write_events(out: impl Write, events: &[Event]) -> io::Result<()> {
    crate::events::write(
        out,
        MAGIC,
        events.iter().map(|e| crate::events::Record {
            start_ns: e.start_ns,
            latency_us: e.latency_us,
            generation: e.generation,
            outcome: e.outcome as u8,
            flags: e.flags.0,
        }),
    )
}

/// Reads what [`write_events`] wrote.
pub fn read_events(input: impl Read) -> io::Result<Vec<Event>> {
    crate::events::read(input, MAGIC)?
        .into_iter()
        .map(|r| {
            Ok(Event {
                start_ns: r.start_ns,
                latency_us: r.latency_us,
                generation: r.generation,
                outcome: Outcome::from_u8(r.outcome)
                    .ok_or_else(|| crate::events::invalid("unknown outcome"))?,
                flags: Flags(r.flags),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keep_alive_response_is_ok_and_leaves_the_next_bytes() {
        let mut bytes =
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\ngen=4\n"
                .to_vec();
        let used = bytes.len();
        bytes.extend_from_slice(b"HTTP/1.1 2");
        let r = parse_response(&bytes, false).unwrap();
        assert_eq!(
            r,
            Response {
                outcome: Outcome::Ok,
                generation: Some(4),
                keep_alive: true,
                used,
            }
        );
        assert_eq!(parse_response(&bytes[used..], false), None);
    }

    #[test]
    fn connection_close_ends_the_connection_without_failing() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\ngen=2\n",
            false,
        )
        .unwrap();
        assert_eq!((r.outcome, r.keep_alive), (Outcome::Ok, false));
        let http10 = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!http10.unwrap().keep_alive);
    }

    #[test]
    fn eof_before_or_inside_a_response_fails() {
        assert_eq!(parse_response(b"", true).unwrap().outcome, Outcome::Closed);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", true)
                .unwrap()
                .outcome,
            Outcome::ShortRead
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ngen", true)
                .unwrap()
                .outcome,
            Outcome::ShortRead
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ngen", false),
            None
        );
    }

    #[test]
    fn a_response_without_length_ends_at_eof() {
        let bytes = b"HTTP/1.1 200 OK\r\n\r\ngen=3\n";
        assert_eq!(parse_response(bytes, false), None);
        let r = parse_response(bytes, true).unwrap();
        assert_eq!(
            (r.outcome, r.generation, r.keep_alive),
            (Outcome::Ok, Some(3), false)
        );
    }

    #[test]
    fn errors_and_other_statuses_are_other() {
        let r = parse_response(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(r.unwrap().outcome, Outcome::Other);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_response(chunked, false).unwrap().outcome,
            Outcome::Other
        );
        assert_eq!(
            parse_response(b"garbage\r\n\r\n", false).unwrap().outcome,
            Outcome::Other
        );
    }

    #[test]
    fn events_survive_the_file_format() {
        let events: Vec<Event> = Outcome::ALL
            .iter()
            .enumerate()
            .map(|(i, &outcome)| Event {
                start_ns: 5_000_000_000 + i as u64,
                latency_us: 3 * i as u32,
                outcome,
                flags: Flags(i as u8 & 7),
                generation: (i % 3 != 0).then_some(i as u32),
            })
            .collect();
        let mut bytes = Vec::new();
        write_events(&mut bytes, &events).unwrap();
        assert_eq!(read_events(bytes.as_slice()).unwrap(), events);
        assert!(read_events(&bytes[..bytes.len() - 2]).is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_connection_is_seen_before_sending() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!closed_by_peer(&stream));
        drop(accepted);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !closed_by_peer(&stream) {
            assert!(Instant::now() < deadline, "the FIN never showed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_server_that_closes_after_each_response_without_saying_so_fails_the_next_request() {
        // Answers one request per connection with a keep-alive response,
        // then closes: the client's next request on it fails, and with
        // retry its retry succeeds on a new connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ngen=1\n")
                        .await;
                });
            }
        });
        let config = Config {
            addr,
            connections: 1,
            timeout: Duration::from_secs(2),
            retry: true,
            pause: Duration::ZERO,
            max_duration: Duration::from_secs(10),
        };
        let events = run(config, tokio::time::sleep(Duration::from_millis(100))).await;
        let first_attempt_failures: Vec<_> = events
            .iter()
            .filter(|e| e.outcome.is_failure() && !e.flags.has(Flags::RETRY))
            .collect();
        assert!(!first_attempt_failures.is_empty());
        assert!(first_attempt_failures.iter().all(|e| {
            e.flags.has(Flags::REUSED) && e.outcome.nothing_received() && e.generation == Some(1)
        }));
        let retries = events.iter().filter(|e| e.flags.has(Flags::RETRY)).count();
        assert_eq!(retries, first_attempt_failures.len());
        assert!(events.iter().any(|e| e.outcome == Outcome::Ok));
    }
}
