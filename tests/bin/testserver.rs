//! A small HTTP server for reloader's tests: listens with `SO_REUSEPORT` and
//! answers every request with `gen=G pid=P` (G from `RELOADER_GENERATION`),
//! then closes (the serving loop is the demo server's,
//! `reloader::demo::server`). Its modes reproduce what real servers do
//! during a reload.
//!
//! `--mode-file PATH`: extra flags read from PATH at start, so a test can
//! change how the *next* generation behaves without restarting reloader.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
    time::Duration,
};

use clap::Parser;
use nix::{
    sys::signal::{SigSet, Signal},
    unistd::{ForkResult, fork},
};
use reloader::demo::server;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Address to listen on (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// UDP address to answer on (repeatable): `ping…` gets `gen=G pid=P`,
    /// a DNS query an empty NOERROR response.
    #[arg(long)]
    udp: Vec<SocketAddr>,
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
    /// Exit with status 70 on SIGUSR2 (a crash a test triggers when it
    /// wants, whatever the machine's speed).
    #[arg(long)]
    crash_on_usr2: bool,
    /// On SIGUSR2, stop accepting, answer what was accepted and exit with
    /// status 70, leaving queued connections to the kernel (a server that
    /// fails between requests).
    #[arg(long)]
    fail_on_usr2: bool,
    /// Milliseconds to wait before answering each datagram.
    #[arg(long, default_value_t = 0)]
    udp_reply_delay_ms: u64,
    /// On drain, close UDP sockets at once, dropping what is queued (like
    /// unbound and Knot on SIGTERM).
    #[arg(long)]
    udp_close_on_drain: bool,
    /// Keep connections that send no request open until their clients
    /// close them, also while draining (long-lived connections).
    #[arg(long)]
    hold_connections: bool,
    /// On SIGUSR1, stop accepting (listeners stay open: new connections
    /// queue until the drain closes them, and migrate).
    #[arg(long)]
    pause_accept_on_usr1: bool,
    /// Allocate and touch this many MiB at start (and keep them).
    #[arg(long, default_value_t = 0)]
    allocate_mib: usize,
    /// Drain signal name.
    #[arg(long, default_value = "SIGTERM")]
    drain_signal: String,
    /// Milliseconds to wait before answering each request.
    #[arg(long, default_value_t = 0)]
    reply_delay_ms: u64,
    /// Serve only sockets passed by socket activation (LISTEN_FDS, with
    /// LISTEN_PID equal to this process); exit 1 without them.
    #[arg(long)]
    inherited: bool,
    /// Send READY=1 to NOTIFY_SOCKET once listening.
    #[arg(long)]
    notify_ready: bool,
    /// Write this many stderr lines per second (a chatty server).
    #[arg(long, default_value_t = 0)]
    chatty: u32,
    /// Put SIGPIPE back to its default action, as a C server has it: a
    /// write to a pipe without a reader kills the process.
    #[arg(long)]
    sigpipe_default: bool,
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
    let chatty_generation = generation.clone();
    eprintln!(
        "testserver gen {generation} pid {} starting",
        std::process::id()
    );
    if args.allocate_mib > 0 {
        let mut memory = vec![0u8; args.allocate_mib << 20];
        for page in memory.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&memory);
        std::mem::forget(memory);
    }
    if args.exit_on_start {
        eprintln!("testserver: exiting on start as asked (--exit-on-start)");
        std::process::exit(3);
    }
    let drain: Signal = args.drain_signal.parse().expect("drain signal name");
    // Block the drain signal everywhere; one thread waits for it.
    let mut mask = SigSet::empty();
    mask.add(drain);
    mask.thread_block().expect("block drain signal");

    if args.pause_accept_on_usr1 {
        let mut usr1 = SigSet::empty();
        usr1.add(Signal::SIGUSR1);
        usr1.thread_block().expect("block SIGUSR1");
    }
    if args.fail_on_usr2 {
        let mut usr2 = SigSet::empty();
        usr2.add(Signal::SIGUSR2);
        usr2.thread_block().expect("block SIGUSR2");
    }
    if args.crash_on_usr2 {
        let mut usr2 = SigSet::empty();
        usr2.add(Signal::SIGUSR2);
        usr2.thread_block().expect("block SIGUSR2");
        thread::spawn(move || {
            let _ = usr2.wait();
            eprintln!("testserver: crashing on SIGUSR2 (--crash-on-usr2)");
            std::process::exit(70);
        });
    }
    if let Some(ms) = args.crash_after_ms {
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            eprintln!("testserver: crashing as asked (--crash-after-ms)");
            std::process::exit(70);
        });
    }
    if args.sigpipe_default {
        // SAFETY: restoring a signal's default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if args.chatty > 0 {
        let per_tick = (args.chatty / 100).max(1);
        thread::spawn(move || {
            let mut n = 0u64;
            loop {
                for _ in 0..per_tick {
                    n += 1;
                    eprintln!(
                        "testserver gen {chatty_generation}: chatter line {n} {}",
                        "x".repeat(120)
                    );
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
    }
    thread::sleep(Duration::from_millis(args.start_delay_ms));
    if args.never_listen {
        eprintln!("testserver: not listening (--never-listen)");
        loop {
            let _ = mask.wait();
        }
    }

    if args.inherited {
        let listeners = inherited();
        notify_ready(&args);
        serve(listeners, Vec::new(), &args, mask);
    }
    if args.workers == 0 {
        let listeners: Vec<TcpListener> = args.listen.iter().map(|a| listen(a, &args)).collect();
        let udp: Vec<UdpSocket> = args.udp.iter().map(|a| bind_udp(a, &args)).collect();
        notify_ready(&args);
        serve(listeners, udp, &args, mask);
    }

    // Master: one socket per (worker, address), then fork.
    let sockets: Vec<(Vec<TcpListener>, Vec<UdpSocket>)> = (0..args.workers)
        .map(|_| {
            (
                args.listen.iter().map(|a| listen(a, &args)).collect(),
                args.udp.iter().map(|a| bind_udp(a, &args)).collect(),
            )
        })
        .collect();
    let mut children = Vec::new();
    for (i, (own, own_udp)) in sockets.into_iter().enumerate() {
        // SAFETY: single-threaded here (the crash thread only sleeps and
        // exits), and the child only uses async-signal-safe state first.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                eprintln!(
                    "testserver gen {generation} worker {i} pid {}",
                    std::process::id()
                );
                serve(own, own_udp, &args, mask);
            }
            ForkResult::Parent { child } => {
                children.push(child);
                drop(own);
                drop(own_udp);
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

/// The sockets systemd-style socket activation passed, checked.
fn inherited() -> Vec<TcpListener> {
    use std::os::fd::FromRawFd;
    // listen_fds() checks LISTEN_PID against our pid.
    let fds: Vec<i32> = match sd_notify::listen_fds() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            eprintln!("testserver: no inherited sockets (--inherited): {e}");
            std::process::exit(1);
        }
    };
    if fds.is_empty() {
        eprintln!("testserver: LISTEN_FDS is missing or LISTEN_PID is not this process");
        std::process::exit(1);
    }
    eprintln!(
        "testserver: {} inherited sockets named {:?}",
        fds.len(),
        std::env::var("LISTEN_FDNAMES").unwrap_or_default()
    );
    fds.into_iter()
        .map(|fd| {
            // SAFETY: the fd was passed to us as a listening socket.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true).expect("nonblocking");
            listener
        })
        .collect()
}

fn notify_ready(args: &Args) {
    if args.notify_ready {
        sd_notify::notify(&[sd_notify::NotifyState::Ready]).expect("notify READY=1");
    }
}

fn listen(addr: &SocketAddr, args: &Args) -> TcpListener {
    match reloader::net::tcp_listener(*addr, !args.no_reuseport) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("testserver: bind {addr}: {e}");
            std::process::exit(1);
        }
    }
}

fn bind_udp(addr: &SocketAddr, args: &Args) -> UdpSocket {
    match reloader::net::udp_socket(*addr, !args.no_reuseport) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("testserver: bind udp {addr}: {e}");
            std::process::exit(1);
        }
    }
}

fn serve(listeners: Vec<TcpListener>, udp: Vec<UdpSocket>, args: &Args, mask: SigSet) -> ! {
    let behaviour = server::Behaviour {
        close_idle_on_drain: args.close_idle_on_drain,
        ignore_drain: args.ignore_drain,
        reply_delay: Duration::from_millis(args.reply_delay_ms),
        fail_on: args.fail_on_usr2.then_some(Signal::SIGUSR2),
        udp_reply_delay: Duration::from_millis(args.udp_reply_delay_ms),
        udp_close_on_drain: args.udp_close_on_drain,
        hold_connections: args.hold_connections,
        pause_accept_on: args.pause_accept_on_usr1.then_some(Signal::SIGUSR1),
    };
    server::serve(listeners, udp, &behaviour, mask)
}
