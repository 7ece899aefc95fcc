//! The demo's built-in HTTP server (`reloader __serve`, hidden): what the
//! demo runs as the managed child, so the demo needs nothing installed.
//!
//! It answers every request with `gen=G pid=P` (G from
//! `RELOADER_GENERATION`) and closes. Its graceful stop (SIGTERM) behaves
//! like HAProxy's soft-stop: it stops listening at once (what was still
//! queued in its listener is reset unless the kernel migrates it), closes
//! accepted connections that have not sent a request yet, finishes the
//! requests it has, and exits. Those are the two ways a plain reuseport
//! reload fails clients; the demo shows reloader avoiding both.

#![allow(clippy::disallowed_methods)] // the demo server: thread-per-connection blocking code, no runtime

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::{SigSet, Signal};

/// How a server started by [`serve`] behaves.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// On drain, close accepted connections that have not sent a request
    /// yet (the demo server does; servers commonly do).
    pub close_idle_on_drain: bool,
    /// Keep serving when the drain signal arrives (tests).
    pub ignore_drain: bool,
    /// Wait this long before answering each request (tests).
    pub reply_delay: Duration,
    /// On this signal (blocked by the caller in every thread), stop
    /// accepting, answer what was accepted, and exit with status 70
    /// without closing the listeners first: a server that fails between
    /// requests, leaving its accept queues to the kernel (tests).
    pub fail_on: Option<Signal>,
    /// Wait this long before answering each datagram (tests: a server
    /// starved of CPU).
    pub udp_reply_delay: Duration,
    /// On drain, close UDP sockets at once instead of answering what is
    /// queued first (what unbound and Knot do on SIGTERM).
    pub udp_close_on_drain: bool,
    /// Keep a connection that sends no request open until its client
    /// closes it, also while draining (tests: long-lived connections, as a
    /// WebSocket or gRPC stream holds them).
    pub hold_connections: bool,
    /// On this signal (blocked by the caller in every thread), stop
    /// accepting but keep the listeners open, so new connections queue in
    /// them until the drain closes them (tests: connections a closing
    /// listener migrates).
    pub pause_accept_on: Option<Signal>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            close_idle_on_drain: true,
            ignore_drain: false,
            reply_delay: Duration::ZERO,
            fail_on: None,
            udp_reply_delay: Duration::ZERO,
            udp_close_on_drain: false,
            hold_connections: false,
            pause_accept_on: None,
        }
    }
}

/// The demo server: listens on `addr` and serves until SIGTERM or SIGINT.
pub fn run(addr: SocketAddr) -> ! {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().expect("block SIGTERM");
    match crate::net::tcp_listener(addr, true) {
        Ok(listener) => serve(vec![listener], Vec::new(), &Behaviour::default(), mask),
        Err(e) => {
            eprintln!("demo server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}

/// Serves `listeners` (TCP) and `udp` sockets until a signal in `drain`
/// (blocked by the caller in every thread) arrives, then drains and exits
/// the process. A UDP socket answers `ping…` with `gen=G pid=P` and a DNS
/// query with an empty NOERROR response; drained, it answers what is still
/// queued, then closes (a closing UDP socket's queue is lost, not
/// migrated).
pub fn serve(
    listeners: Vec<TcpListener>,
    udp: Vec<std::net::UdpSocket>,
    behaviour: &Behaviour,
    drain: SigSet,
) -> ! {
    let draining = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(InFlight::default());
    // The drain signal wakes the accept loop's poll at once (a byte on
    // this pair): a server whose listeners no longer receive anything —
    // every old generation after a cutover — exits as soon as it is told
    // to, not at its poll's next timeout.
    let (wake, woken) = UnixStream::pair().expect("socketpair for the drain wake-up");
    {
        let draining = draining.clone();
        let ignore = behaviour.ignore_drain;
        thread::spawn(move || {
            loop {
                let _ = drain.wait();
                if ignore {
                    eprintln!("server: ignoring the drain signal");
                    continue;
                }
                draining.store(true, Ordering::SeqCst);
                let _ = (&wake).write_all(&[1]);
            }
        });
    }
    let failing = Arc::new(AtomicBool::new(false));
    if let Some(signal) = behaviour.fail_on {
        let failing = failing.clone();
        thread::spawn(move || {
            let mut set = SigSet::empty();
            set.add(signal);
            let _ = set.wait();
            failing.store(true, Ordering::SeqCst);
        });
    }
    let paused = Arc::new(AtomicBool::new(false));
    if let Some(signal) = behaviour.pause_accept_on {
        let paused = paused.clone();
        thread::spawn(move || {
            let mut set = SigSet::empty();
            set.add(signal);
            let _ = set.wait();
            paused.store(true, Ordering::SeqCst);
        });
    }
    let mut said_paused = false;
    let generation = std::env::var("RELOADER_GENERATION").unwrap_or_else(|_| "0".into());
    let body: Arc<str> = format!("gen={generation} pid={}\n", std::process::id()).into();
    let udp_threads: Vec<_> = udp
        .into_iter()
        .map(|socket| {
            let (body, draining) = (body.clone(), draining.clone());
            let behaviour = behaviour.clone();
            thread::spawn(move || serve_udp(&socket, &body, &draining, &behaviour))
        })
        .collect();
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain([woken.as_raw_fd()])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !draining.load(Ordering::SeqCst) {
        if failing.load(Ordering::SeqCst) {
            in_flight.wait_none(Instant::now() + Duration::from_secs(30));
            eprintln!("server: failing as asked (exit status 70)");
            std::process::exit(70);
        }
        if paused.load(Ordering::SeqCst) {
            if !said_paused {
                eprintln!("server: accepting paused; new connections queue");
                said_paused = true;
            }
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        // SAFETY: a valid pollfd array of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        for listener in &listeners {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        in_flight.add(1);
                        let (body, draining, in_flight) =
                            (body.clone(), draining.clone(), in_flight.clone());
                        let behaviour = behaviour.clone();
                        thread::spawn(move || {
                            handle(stream, &body, &draining, &behaviour);
                            in_flight.add(-1);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("server: accept: {e}");
                        break;
                    }
                }
            }
        }
        for fd in &mut fds {
            fd.revents = 0;
        }
    }
    // Stop listening first: queued connections migrate to the new
    // generation (or are reset without steering), then finish the rest.
    drop(listeners);
    let deadline = Instant::now()
        + if behaviour.hold_connections {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(30)
        };
    in_flight.wait_none(deadline);
    for thread in udp_threads {
        let _ = thread.join();
    }
    std::process::exit(0);
}

/// The connections being answered, and a wait for none.
#[derive(Default)]
struct InFlight {
    count: Mutex<isize>,
    changed: Condvar,
}

impl InFlight {
    fn add(&self, n: isize) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += n;
        self.changed.notify_all();
    }

    /// Until none is in flight, or `deadline`.
    fn wait_none(&self, deadline: Instant) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            count = match self.changed.wait_timeout(count, left) {
                Ok((count, _)) => count,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Answers datagrams on `socket` until draining and its queue is empty
/// (or at once when draining, with `udp_close_on_drain`).
fn serve_udp(
    socket: &std::net::UdpSocket,
    body: &str,
    draining: &AtomicBool,
    behaviour: &Behaviour,
) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 1500];
    loop {
        if behaviour.udp_close_on_drain && draining.load(Ordering::SeqCst) {
            return;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let request = &buf[..n];
                let reply = if request.starts_with(b"ping") {
                    body.as_bytes().to_vec()
                } else if let Some(answer) = crate::dns::empty_answer(request) {
                    answer
                } else {
                    continue;
                };
                if !behaviour.udp_reply_delay.is_zero() {
                    thread::sleep(behaviour.udp_reply_delay);
                }
                let _ = socket.send_to(&reply, from);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if draining.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn handle(mut stream: TcpStream, body: &str, draining: &AtomicBool, behaviour: &Behaviour) {
    let _ = stream.set_nonblocking(false);
    // Held connections wait for their client without waking: thousands of
    // them must cost nothing while idle.
    let timeout = (!behaviour.hold_connections).then(|| Duration::from_millis(10));
    let _ = stream.set_read_timeout(timeout);
    let started = Instant::now();
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                request.extend_from_slice(&buf[..n]);
                if request.windows(4).any(|w| w == b"\r\n\r\n") || request.ends_with(b"\n\n") {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // Graceful stop closes connections with no request yet.
                if request.is_empty()
                    && behaviour.close_idle_on_drain
                    && draining.load(Ordering::SeqCst)
                {
                    return;
                }
                if started.elapsed() > Duration::from_secs(10) && !behaviour.hold_connections {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    if !behaviour.reply_delay.is_zero() {
        thread::sleep(behaviour.reply_delay);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
