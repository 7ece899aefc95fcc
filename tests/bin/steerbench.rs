//! Micro-measurements of the steering program for `cargo xtask bench`, in a
//! network namespace of its own (run as root). Prints one JSON object.
//!
//! - `overhead`: the new-connection rate against one reuseport group of two
//!   listeners with no program attached, and with the steering program
//!   attached and both listeners in the active slot (so the same two
//!   sockets share the load either way). Rounds alternate between the two
//!   so drift on a shared machine hits both alike.
//! - `cutover`: two listeners in slots A and B, a client connecting in a
//!   tight loop while A is active; the time from just before the map update
//!   that makes B active to the first connection that reaches B. On
//!   loopback the SYN is processed inside the client's `connect`, so the
//!   client's own clock brackets the steering decision, free of the
//!   acceptors' scheduling; B's first `accept` is reported too.
//! - `overhead-udp`: the same for UDP datagrams ([`udp`]).
//! - `overhead-many`: as `overhead`, with N listening addresses (N reuseport
//!   groups of two listeners each), the maps sized for N listeners as
//!   `reloader run` sizes them, and the program attached to every group (or
//!   to none); the clients connect to one address (`--target one`) or to
//!   all of them in turn (`--target all`). Two acceptor threads wait on
//!   all the listeners with epoll, so N = 1 measured the same way is the
//!   comparison. It also reports the program's own run time per run, from
//!   the kernel's BPF statistics (enabled with `BPF_ENABLE_STATS` for as
//!   long as the measurement holds the returned descriptor): unlike the
//!   connection rate, that does not depend on what else the machine runs.

#[path = "steerbench/reference.rs"]
mod reference;
#[path = "steerbench/udp.rs"]
mod udp;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use reloader::steering::{Limits, Options, Steer, Steering};
use reloader_tests::{loadgen::monotonic_ns, privileged, reuseport_listener};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Connection rate with the program attached vs. without.
    Overhead {
        /// Pairs of rounds (one without, one with the program).
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        /// Length of one round, milliseconds.
        #[arg(long, default_value_t = 1000)]
        round_ms: u64,
        /// Client threads.
        #[arg(long, default_value_t = 2)]
        clients: usize,
    },
    /// Map update to the first connection accepted by the new slot.
    Cutover {
        #[arg(long, default_value_t = 100)]
        rounds: usize,
    },
    /// Datagrams per second with the program attached vs. without.
    OverheadUdp(udp::Args),
    /// Connection rate with the program attached to N groups vs. none.
    OverheadMany {
        /// Listening addresses (127.0.0.1:21000 and up), two listeners each.
        #[arg(long, default_value_t = 256)]
        listeners: usize,
        /// Which addresses the clients connect to.
        #[arg(long, value_enum, default_value_t = Target::All)]
        target: Target,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        #[arg(long, default_value_t = 1000)]
        round_ms: u64,
        #[arg(long, default_value_t = 2)]
        clients: usize,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Target {
    /// The first address only.
    One,
    /// Every address in turn.
    All,
}

fn main() {
    let args = Args::parse();
    privileged();
    let load = || Steering::load(&Options::default()).expect("load the steering program");
    let result = match args.what {
        What::Overhead {
            pairs,
            round_ms,
            clients,
        } => overhead(load(), pairs, Duration::from_millis(round_ms), clients),
        What::Cutover { rounds } => cutover(load(), rounds),
        What::OverheadUdp(args) => udp::overhead(&args),
        What::OverheadMany {
            listeners,
            target,
            pairs,
            round_ms,
            clients,
        } => {
            // Sized as `reloader run` sizes them for this many --listen
            // addresses (default --max-draining 4, --max-sockets-per-listener).
            let options = Options {
                limits: Limits {
                    listeners: listeners as u32,
                    slots: 6,
                    sockets_per_slot: 256,
                },
                ..Options::default()
            };
            let steering = Steering::load(&options).expect("load the steering program");
            let round = Duration::from_millis(round_ms);
            overhead_many(steering, listeners, target, pairs, round, clients)
        }
    };
    println!("{result}");
}

fn borrowed(listener: &TcpListener) -> BorrowedFd<'_> {
    listener.as_fd()
}

/// Accepts and closes at once (the server closes first, so clients do not
/// pile up TIME_WAIT sockets and run out of ports).
/// Blocking `accept`s that give up every 100 ms (`SO_RCVTIMEO` applies to
/// `accept` on Linux), so the thread sees `stop` without being woken by a
/// connection, which the reuseport hash may send to the other listener.
fn accept_timeout(listener: &TcpListener) {
    listener.set_nonblocking(false).expect("blocking listener");
    socket2::SockRef::from(listener)
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("SO_RCVTIMEO on the listener");
}

fn accept_and_close(listener: TcpListener, stop: Arc<AtomicBool>) {
    accept_timeout(&listener);
    while !stop.load(Ordering::Relaxed) {
        let _ = listener.accept();
    }
}

fn overhead(mut steering: Steering, pairs: usize, round: Duration, clients: usize) -> String {
    let addr: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    let a = reuseport_listener(addr);
    let b = reuseport_listener(addr);
    steering.add_listener(0, addr).expect("add listener");
    steering
        .set_slot_sockets(0, 0, 1, &[borrowed(&a), borrowed(&b)])
        .expect("slot 0 sockets");
    steering.set_active(0, Some(0)).expect("activate slot 0");
    let attach_fd = a.try_clone().expect("dup listener");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for listener in [a, b] {
        let stop = stop.clone();
        threads.push(thread::spawn(move || accept_and_close(listener, stop)));
    }
    for _ in 0..clients {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                // Wait for the server's close: the connection is done.
                let outcome = TcpStream::connect(addr).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.read(&mut buf)
                });
                match outcome {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    // One in flight when the acceptors stopped is not a
                    // failure of what was measured.
                    Err(_) if stop.load(Ordering::Relaxed) => 0,
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let measure = |done: &AtomicU64| {
        let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
        thread::sleep(round);
        (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64()
    };
    // Warm up without measuring.
    thread::sleep(round / 2);
    let mut none = Vec::new();
    let mut steered = Vec::new();
    for pair in 0..pairs {
        // Alternate which goes first, so a trend (other work on the
        // machine, TIME_WAIT sockets piling up) favours neither.
        for with_program in [pair % 2 == 1, pair % 2 == 0] {
            if with_program {
                steering.attach(attach_fd.as_fd()).expect("attach");
                steered.push(measure(&done));
            } else {
                Steering::detach(attach_fd.as_fd()).ok();
                none.push(measure(&done));
            }
        }
    }
    Steering::detach(attach_fd.as_fd()).ok();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let counters = steering.counters(0, 0).expect("counters");
    assert!(
        counters.steered > 0,
        "the program made no decision while attached"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let pair_ratios: Vec<f64> = none.iter().zip(&steered).map(|(n, s)| s / n).collect();
    json!({
        "rounds_without_program_per_s": none,
        "rounds_with_program_per_s": steered,
        "rate_without_program_per_s": mean(&none),
        "rate_with_program_per_s": mean(&steered),
        "ratio": mean(&steered) / mean(&none),
        "median_pair_ratio": median(&pair_ratios),
        "steered_by_program": counters.steered,
        "fallback": counters.fallback,
        "failed_connections": failed.load(Ordering::Relaxed),
        "round_ms": round.as_millis() as u64,
        "clients": clients,
    })
    .to_string()
}

/// Turns on the kernel's BPF run-time statistics until the returned
/// descriptor is closed (`BPF_ENABLE_STATS`, Linux ≥ 5.8).
fn enable_bpf_stats() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }, type
    // BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 1];
    // SAFETY: a valid attribute buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    // SAFETY: the kernel returned a new descriptor, owned here.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// (run_time_ns, run_cnt) summed over the SK_REUSEPORT programs this
/// process holds, from /proc/self/fdinfo.
fn reuseport_prog_stats() -> (u64, u64) {
    const BPF_PROG_TYPE_SK_REUSEPORT: &str = "21";
    let (mut ns, mut runs) = (0, 0);
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return (0, 0);
    };
    for fd in fds.flatten() {
        let is_prog = std::fs::read_link(fd.path())
            .is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        if field("prog_type") == BPF_PROG_TYPE_SK_REUSEPORT {
            ns += field("run_time_ns").parse::<u64>().unwrap_or(0);
            runs += field("run_cnt").parse::<u64>().unwrap_or(0);
        }
    }
    (ns, runs)
}

/// Accepts and closes on every listener in `listeners` (non-blocking),
/// woken by an epoll set (only the ready listeners, whatever their number;
/// `poll` over hundreds of listeners would cost the acceptor more than the
/// steering costs the kernel); gives up every 100 ms so `stop` is seen.
fn epoll_accept_and_close(listeners: Vec<TcpListener>, stop: Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain epoll syscalls on descriptors this function owns or
    // borrows for its whole run; the event buffer outlives each wait.
    unsafe {
        let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(epoll >= 0, "epoll_create1");
        for (i, l) in listeners.iter().enumerate() {
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            let rc = libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, l.as_raw_fd(), &mut event);
            assert_eq!(rc, 0, "epoll_ctl");
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        while !stop.load(Ordering::Relaxed) {
            let n = libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 100);
            for event in events.iter().take(n.max(0) as usize) {
                while listeners[event.u64 as usize].accept().is_ok() {}
            }
        }
        libc::close(epoll);
    }
}

fn overhead_many(
    mut steering: Steering,
    n: usize,
    target: Target,
    pairs: usize,
    round: Duration,
    clients: usize,
) -> String {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 21000 + i as u16)))
        .collect();
    let mut groups = Vec::new();
    let mut attach_fds = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let a = reuseport_listener(*addr);
        let b = reuseport_listener(*addr);
        steering
            .add_listener(i as u32, *addr)
            .expect("add listener");
        steering
            .set_slot_sockets(i as u32, 0, 1, &[borrowed(&a), borrowed(&b)])
            .expect("slot 0 sockets");
        steering
            .set_active(i as u32, Some(0))
            .expect("activate slot 0");
        attach_fds.push(a.try_clone().expect("dup listener"));
        groups.push(a);
        groups.push(b);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Two acceptors, each waiting on half of the listeners.
    let half = groups.len().div_ceil(2);
    let mut rest = groups;
    let second = rest.split_off(half.min(rest.len()));
    for listeners in [rest, second] {
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            epoll_accept_and_close(listeners, stop)
        }));
    }
    for c in 0..clients {
        let (stop, done, failed, addrs) =
            (stop.clone(), done.clone(), failed.clone(), addrs.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 16];
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                let addr = match target {
                    Target::One => addrs[0],
                    Target::All => addrs[k % addrs.len()],
                };
                k += 1;
                let outcome = TcpStream::connect(addr).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.read(&mut buf)
                });
                match outcome {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) if stop.load(Ordering::Relaxed) => 0,
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let measure = |done: &AtomicU64| {
        let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
        thread::sleep(round);
        (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64()
    };
    thread::sleep(round / 2);
    let stats = enable_bpf_stats();
    let mut none = Vec::new();
    let mut steered = Vec::new();
    let mut attach_us = Vec::new();
    let (mut run_ns, mut runs) = (0u64, 0u64);
    for pair in 0..pairs {
        for with_program in [pair % 2 == 1, pair % 2 == 0] {
            if with_program {
                let t = Instant::now();
                for fd in &attach_fds {
                    steering.attach(fd.as_fd()).expect("attach");
                }
                attach_us.push(t.elapsed().as_secs_f64() * 1e6);
                let (ns0, n0) = reuseport_prog_stats();
                steered.push(measure(&done));
                let (ns1, n1) = reuseport_prog_stats();
                run_ns += ns1.saturating_sub(ns0);
                runs += n1.saturating_sub(n0);
            } else {
                for fd in &attach_fds {
                    Steering::detach(fd.as_fd()).ok();
                }
                none.push(measure(&done));
            }
        }
    }
    for fd in &attach_fds {
        Steering::detach(fd.as_fd()).ok();
    }
    drop(stats);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let mut steered_total = 0;
    let mut fallback = 0;
    for i in 0..n {
        let counters = steering.counters(i as u32, 0).expect("counters");
        steered_total += counters.steered;
        fallback += counters.fallback;
    }
    assert!(
        steered_total > 0,
        "the program made no decision while attached"
    );
    let stats_available = runs > 0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let pair_ratios: Vec<f64> = none.iter().zip(&steered).map(|(n, s)| s / n).collect();
    json!({
        "listeners": n,
        "target": format!("{target:?}").to_lowercase(),
        "rounds_without_program_per_s": none,
        "rounds_with_program_per_s": steered,
        "rate_without_program_per_s": mean(&none),
        "rate_with_program_per_s": mean(&steered),
        "ratio": mean(&steered) / mean(&none),
        "median_pair_ratio": median(&pair_ratios),
        "attach_all_groups_us": summary(&attach_us),
        "bpf_stats": stats_available,
        "program_runs": runs,
        "program_ns_per_run": if runs > 0 { run_ns as f64 / runs as f64 } else { f64::NAN },
        "steered_by_program": steered_total,
        "fallback": fallback,
        "failed_connections": failed.load(Ordering::Relaxed),
        "round_ms": round.as_millis() as u64,
        "clients": clients,
    })
    .to_string()
}

/// One client connection of the cutover measurement.
struct Attempt {
    /// `CLOCK_MONOTONIC` before `connect` and after it returned, ns. On
    /// loopback the SYN is processed (and the program runs) inside the
    /// client's `connect` call, so this brackets the steering decision.
    connect_start: u64,
    connect_end: u64,
    /// Which slot's listener answered: b'A' or b'B'.
    slot: u8,
}

/// Accepts, tells the client which listener it reached, closes (the server
/// closes first, so the client's tight loop leaves no TIME_WAIT behind).
/// B also notes when it accepted its first connection after being armed.
fn accept_and_name(listener: TcpListener, name: u8, stop: Arc<AtomicBool>, first: Arc<AtomicU64>) {
    accept_timeout(&listener);
    while !stop.load(Ordering::Relaxed) {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = first.compare_exchange(0, monotonic_ns(), Ordering::SeqCst, Ordering::SeqCst);
            let _ = stream.write_all(&[name]);
        }
    }
}

fn cutover(mut steering: Steering, rounds: usize) -> String {
    let addr: SocketAddr = "127.0.0.1:9101".parse().unwrap();
    let a = reuseport_listener(addr);
    let b = reuseport_listener(addr);
    steering.attach(a.as_fd()).expect("attach");
    steering.add_listener(0, addr).expect("add listener");
    steering
        .set_slot_sockets(0, 0, 1, &[borrowed(&a)])
        .expect("slot A");
    steering
        .set_slot_sockets(0, 1, 1, &[borrowed(&b)])
        .expect("slot B");
    steering.set_active(0, Some(0)).expect("activate A");

    let stop = Arc::new(AtomicBool::new(false));
    let first_accept_b = Arc::new(AtomicU64::new(u64::MAX));
    let mut acceptors = Vec::new();
    for (listener, name, first) in [
        (a, b'A', Arc::new(AtomicU64::new(u64::MAX))),
        (b, b'B', first_accept_b.clone()),
    ] {
        let stop = stop.clone();
        acceptors.push(thread::spawn(move || {
            accept_and_name(listener, name, stop, first)
        }));
    }
    let client = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut attempts = Vec::new();
            let mut buf = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                let connect_start = monotonic_ns();
                let Ok(mut stream) = TcpStream::connect(addr) else {
                    continue;
                };
                let connect_end = monotonic_ns();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                if let Ok(1) = stream.read(&mut buf) {
                    attempts.push(Attempt {
                        connect_start,
                        connect_end,
                        slot: buf[0],
                    });
                }
            }
            attempts
        })
    };

    // (update started, update returned, B's first accept) per round.
    let mut updates = Vec::new();
    for _ in 0..rounds {
        steering.set_active(0, Some(0)).expect("activate A");
        thread::sleep(Duration::from_millis(10));
        first_accept_b.store(0, Ordering::SeqCst);
        let t0 = monotonic_ns();
        steering.set_active(0, Some(1)).expect("activate B");
        let t1 = monotonic_ns();
        thread::sleep(Duration::from_millis(10));
        updates.push((t0, t1, first_accept_b.swap(u64::MAX, Ordering::SeqCst)));
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = client.join().expect("client thread");
    for t in acceptors {
        let _ = t.join();
    }

    let mut first_syn_us = Vec::new();
    let mut first_accept_us = Vec::new();
    let mut update_us = Vec::new();
    let mut stale = 0;
    let mut missed = 0;
    for &(t0, t1, accepted) in &updates {
        update_us.push((t1 - t0) as f64 / 1000.0);
        if accepted != 0 && accepted != u64::MAX {
            first_accept_us.push(accepted.saturating_sub(t0) as f64 / 1000.0);
        }
        let round_end = t0 + 10_000_000;
        let in_round = attempts
            .iter()
            .filter(|x| x.connect_end >= t0 && x.connect_start < round_end);
        // Connections that began after the update returned must all reach B.
        stale += in_round
            .clone()
            .filter(|x| x.connect_start > t1 && x.slot == b'A')
            .count();
        // The first connection that reached B: its SYN was steered before
        // its connect returned.
        match in_round
            .filter(|x| x.slot == b'B')
            .map(|x| x.connect_end)
            .min()
        {
            Some(end) => first_syn_us.push(end.saturating_sub(t0) as f64 / 1000.0),
            None => missed += 1,
        }
    }
    json!({
        "rounds": rounds,
        "rounds_without_a_connection_to_b": missed,
        "connections": attempts.len(),
        "stale_connections_to_a_after_update": stale,
        "update_to_first_connection_on_b_us": summary(&first_syn_us),
        "update_to_first_accept_on_b_us": summary(&first_accept_us),
        "map_update_syscall_us": summary(&update_us),
    })
    .to_string()
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(v: &[f64]) -> serde_json::Value {
    json!({
        "n": v.len(),
        "median": median(v),
        "p99": percentile(v, 0.99),
        "max": v.iter().copied().fold(f64::NAN, f64::max),
    })
}
