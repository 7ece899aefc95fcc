//! A small HTTP server for reloader's tests: listens with `SO_REUSEPORT` and
//! answers every request with `gen=G pid=P` (G from `RELOADER_GENERATION`),
//! then closes. Its modes reproduce what real servers do during a reload.
//!
//! `--mode-file PATH`: extra flags read from PATH at start, so a test can
//! change how the *next* generation behaves without restarting reloader.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use nix::{
    sys::signal::{SigSet, Signal},
    unistd::{ForkResult, fork},
};
use socket2::{Domain, Socket, Type};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Address to listen on (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Worker processes, each with its own reuseport socket per address,
    /// opened by the master before forking (like nginx). 0: serve here.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Sleep this many milliseconds before listening.
    #[arg(long, default_value_t = 0)]
    start_delay_ms: u64,
    /// Exit with status 3 at once.
    #[arg(long)]
    exit_on_start: bool,
    /// Never open a listener.
    #[arg(long)]
    never_listen: bool,
    /// Bind without SO_REUSEPORT.
    #[arg(long)]
    no_reuseport: bool,
    /// Keep serving when the drain signal arrives.
    #[arg(long)]
    ignore_drain: bool,
    /// On drain, close accepted connections that have not sent a request
    /// yet (what many servers' graceful stop does).
    #[arg(long)]
    close_idle_on_drain: bool,
    /// Exit with status 70 this many milliseconds after start.
    #[arg(long)]
    crash_after_ms: Option<u64>,
    /// Drain signal name.
    #[arg(long, default_value = "SIGTERM")]
    drain_signal: String,
    /// Milliseconds to wait before answering each request.
    #[arg(long, default_value_t = 0)]
    reply_delay_ms: u64,
    /// File with extra flags for this start.
    #[arg(long)]
    mode_file: Option<std::path::PathBuf>,
}

fn main() {
    let mut args = Args::parse();
    if let Some(path) = &args.mode_file
        && let Ok(extra) = std::fs::read_to_string(path)
    {
        let mut argv: Vec<String> = std::env::args().collect();
        argv.extend(extra.split_whitespace().map(str::to_owned));
        args = Args::parse_from(argv);
    }
    let generation = std::env::var("RELOADER_GENERATION").unwrap_or_else(|_| "0".into());
    eprintln!(
        "testserver gen {generation} pid {} starting",
        std::process::id()
    );
    if args.exit_on_start {
        eprintln!("testserver: exiting on start as asked (--exit-on-start)");
        std::process::exit(3);
    }
    let drain: Signal = args.drain_signal.parse().expect("drain signal name");
    // Block the drain signal everywhere; one thread waits for it.
    let mut mask = SigSet::empty();
    mask.add(drain);
    mask.thread_block().expect("block drain signal");

    if let Some(ms) = args.crash_after_ms {
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            eprintln!("testserver: crashing as asked (--crash-after-ms)");
            std::process::exit(70);
        });
    }
    thread::sleep(Duration::from_millis(args.start_delay_ms));
    if args.never_listen {
        eprintln!("testserver: not listening (--never-listen)");
        loop {
            let _ = mask.wait();
        }
    }

    if args.workers == 0 {
        let listeners: Vec<TcpListener> = args.listen.iter().map(|a| listen(a, &args)).collect();
        serve(listeners, &args, &generation, mask);
    }

    // Master: one socket per (worker, address), then fork.
    let sockets: Vec<Vec<TcpListener>> = (0..args.workers)
        .map(|_| args.listen.iter().map(|a| listen(a, &args)).collect())
        .collect();
    let mut children = Vec::new();
    for (i, own) in sockets.into_iter().enumerate() {
        // SAFETY: single-threaded here (the crash thread only sleeps and
        // exits), and the child only uses async-signal-safe state first.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                eprintln!(
                    "testserver gen {generation} worker {i} pid {}",
                    std::process::id()
                );
                serve(own, &args, &generation, mask);
            }
            ForkResult::Parent { child } => {
                children.push(child);
                drop(own);
            }
        }
    }
    // The master holds no listener: they live in the workers, like nginx's.
    let _ = mask.wait();
    for child in &children {
        let _ = nix::sys::signal::kill(*child, drain);
    }
    for child in &children {
        let _ = nix::sys::wait::waitpid(*child, None);
    }
    std::process::exit(0);
}

fn listen(addr: &SocketAddr, args: &Args) -> TcpListener {
    let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None).expect("socket");
    if !args.no_reuseport {
        socket.set_reuse_port(true).expect("SO_REUSEPORT");
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    if let Err(e) = socket.bind(&(*addr).into()) {
        eprintln!("testserver: bind {addr}: {e}");
        std::process::exit(1);
    }
    socket.listen(1024).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

fn serve(listeners: Vec<TcpListener>, args: &Args, generation: &str, mask: SigSet) -> ! {
    let draining = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    {
        let draining = draining.clone();
        let ignore = args.ignore_drain;
        thread::spawn(move || {
            loop {
                let _ = mask.wait();
                if ignore {
                    eprintln!("testserver: ignoring the drain signal (--ignore-drain)");
                    continue;
                }
                draining.store(true, Ordering::SeqCst);
            }
        });
    }
    let body = format!("gen={generation} pid={}\n", std::process::id());
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !draining.load(Ordering::SeqCst) {
        // SAFETY: valid pollfd array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        for listener in &listeners {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let body = body.clone();
                        let draining = draining.clone();
                        let in_flight = in_flight.clone();
                        let args = args.clone();
                        thread::spawn(move || {
                            handle(stream, &body, &draining, &args);
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("testserver: accept: {e}");
                        break;
                    }
                }
            }
        }
        for fd in &mut fds {
            fd.revents = 0;
        }
    }
    // Drain: stop listening (queued connections migrate to the new
    // generation), finish what was accepted, exit.
    drop(listeners);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    std::process::exit(0);
}

fn handle(mut stream: TcpStream, body: &str, draining: &AtomicBool, args: &Args) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
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
                if request.is_empty() && args.close_idle_on_drain && draining.load(Ordering::SeqCst)
                {
                    // The graceful-stop behaviour steering protects against.
                    return;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    if args.reply_delay_ms > 0 {
        thread::sleep(Duration::from_millis(args.reply_delay_ms));
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
