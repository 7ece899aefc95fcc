//! `overhead-udp`: the cost of the steering program per UDP datagram.
//!
//! A server of a few unconnected UDP sockets in one reuseport group, each
//! read by a thread of its own, and client threads sending small datagrams
//! as fast as they can from many sockets (flows). Rounds alternate between
//! no program and the program attached with every server socket in the
//! active slot, so the same sockets share the load either way.
//!
//! On loopback the receive path, and with it the program, runs inside the
//! sender's `send` (the softirq is processed as the send path re-enables
//! bottom halves): the program's cost shows up as fewer datagrams sent and
//! delivered per second by the same client threads, and as more CPU time
//! of the client threads per datagram. On a shared machine the second is
//! the steadier measure: other work takes CPU away from a round and halves
//! its rate, but adds little to the CPU time each datagram costs.
//!
//! Modes, as `--listen` chooses them: `stateless` (every datagram to the
//! active slot: the listener and probe-port lookups, a select, a counter),
//! `flows` (every flow fits the flow table: that plus a flow lookup that
//! hits), `flows-churn` (more flows than the table holds, sent round robin,
//! so the least recently used entry is always the next one needed: a flow
//! lookup that misses and an insert that evicts), and `select-only`: not
//! the steering program but the floor under it, a program that only
//! selects a socket by the packet hash ([`super::reference`]).
//!
//! After the pairs, a few more rounds with the program attached measure its
//! own run time per datagram from the kernel's BPF statistics (enabled
//! with `BPF_ENABLE_STATS` for those rounds only: the statistics cost two
//! clock reads per run, which the pairs must not include). That number does
//! not depend on what else the machine runs; the pairs' rates and CPU times
//! do.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use reloader::steering::{ListenerSpec, Options, Steer, Steering};
use serde_json::json;

use super::{enable_bpf_stats, median, reuseport_prog_stats};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Mode {
    Stateless,
    Flows,
    FlowsChurn,
    SelectOnly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Stateless => "stateless",
            Self::Flows => "flows",
            Self::FlowsChurn => "flows-churn",
            Self::SelectOnly => "select-only",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Pairs of rounds (one without, one with the program).
    #[arg(long, default_value_t = 20)]
    pairs: usize,
    /// Length of one round, milliseconds (short rounds: the two of a pair
    /// see about the same competition for the CPUs).
    #[arg(long, default_value_t = 200)]
    round_ms: u64,
    /// Server sockets in the group.
    #[arg(long, default_value_t = 2)]
    sockets: usize,
    /// Client threads sending.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Client sockets (flows), spread over the client threads.
    #[arg(long, default_value_t = 64)]
    flows: usize,
}

/// Entries of the flow table: room for every flow in `flows` mode; a
/// quarter of them in `flows-churn`.
fn table_size(args: &Args) -> u32 {
    match args.mode {
        Mode::FlowsChurn => (args.flows / 4).max(1) as u32,
        _ => (args.flows * 4) as u32,
    }
}

/// Counts the datagrams a socket receives until `stop`, up to 32 per
/// `recvmmsg` so the readers keep up with the sender on few CPUs.
fn receive(socket: UdpSocket, received: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    const BATCH: usize = 32;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("SO_RCVTIMEO");
    let mut bufs = [[0u8; 64]; BATCH];
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; zeroed is a valid value.
    let mut headers: Vec<libc::mmsghdr> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (header, iov) in headers.iter_mut().zip(iovecs.iter_mut()) {
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: BATCH headers, each pointing at one live iovec and buffer;
        // MSG_WAITFORONE returns once one datagram arrived (the socket's
        // receive timeout bounds the wait for the first).
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Sends round robin over `sockets` until `stop`.
fn send(sockets: Vec<UdpSocket>, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let payload = [0x5au8; 32];
    while !stop.load(Ordering::Relaxed) {
        let mut n = 0;
        for socket in &sockets {
            if socket.send(&payload).is_ok() {
                n += 1;
            }
        }
        sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// The program whose cost is measured.
enum Program {
    Steering(Box<Steering>),
    SelectOnly(super::reference::SelectOnly),
}

impl Program {
    fn attach(&self, socket: BorrowedFd<'_>) {
        match self {
            Self::Steering(steering) => steering.attach(socket).expect("attach"),
            Self::SelectOnly(program) => program.attach(socket).expect("attach the reference"),
        }
    }
}

pub fn overhead(args: &Args) -> String {
    let addr: SocketAddr = "127.0.0.1:9200".parse().unwrap();
    let servers: Vec<UdpSocket> = (0..args.sockets)
        .map(|_| {
            let socket = reloader::net::udp_socket(addr, true).expect("bind a UDP server socket");
            // Room for bursts while a reader waits for a CPU.
            socket2::SockRef::from(&socket)
                .set_recv_buffer_size(4 << 20)
                .expect("SO_RCVBUF");
            socket
        })
        .collect();
    let fds: Vec<_> = servers.iter().map(|s| s.as_fd()).collect();
    let program = if let Mode::SelectOnly = args.mode {
        Program::SelectOnly(
            super::reference::SelectOnly::load(&fds).expect("load the reference program"),
        )
    } else {
        let mut steering = Steering::load(&Options {
            udp_flows: table_size(args),
            ..Options::default()
        })
        .expect("load the steering program");
        let stateless = matches!(args.mode, Mode::Stateless);
        steering
            .add_listener(0, ListenerSpec::udp(addr, stateless))
            .expect("add listener");
        steering
            .set_slot_sockets(0, 0, 1, &fds)
            .expect("slot 0 sockets");
        steering.set_active(0, Some(0)).expect("activate slot 0");
        Program::Steering(Box::new(steering))
    };
    drop(fds);
    let attach_fd = servers[0].try_clone().expect("dup a server socket");

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for socket in servers {
        let (received, stop) = (received.clone(), stop.clone());
        threads.push(thread::spawn(move || receive(socket, received, stop)));
    }
    let clients = args.clients.max(1);
    let mut sender_clocks = Vec::new();
    for c in 0..clients {
        let sockets: Vec<UdpSocket> = (c..args.flows.max(clients))
            .step_by(clients)
            .map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a client socket");
                socket.connect(addr).expect("connect a client socket");
                socket
            })
            .collect();
        let (sent, stop) = (sent.clone(), stop.clone());
        let sender = thread::spawn(move || send(sockets, sent, stop));
        sender_clocks.push(thread_clock(&sender));
        threads.push(sender);
    }
    let senders_cpu_ns = || sender_clocks.iter().map(|&c| cpu_ns(c)).sum::<u64>();

    let round = Duration::from_millis(args.round_ms);
    let measure = || {
        let (r0, s0, c0, p0, t0) = (
            received.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed),
            senders_cpu_ns(),
            cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID),
            Instant::now(),
        );
        thread::sleep(round);
        let seconds = t0.elapsed().as_secs_f64();
        let (r, s) = (
            received.load(Ordering::Relaxed) - r0,
            sent.load(Ordering::Relaxed) - s0,
        );
        Round {
            received_per_s: r as f64 / seconds,
            sent_per_s: s as f64 / seconds,
            sender_cpu_ns_per_datagram: (senders_cpu_ns() - c0) as f64 / s.max(1) as f64,
            process_cpu_ns_per_datagram: (cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - p0) as f64
                / s.max(1) as f64,
            lost: s.saturating_sub(r),
        }
    };
    // Warm up without measuring.
    thread::sleep(round * 2);
    let mut none = Vec::new();
    let mut steered = Vec::new();
    for pair in 0..args.pairs {
        // Alternate which goes first, so a trend favours neither.
        for with_program in [pair % 2 == 1, pair % 2 == 0] {
            if with_program {
                program.attach(attach_fd.as_fd());
                steered.push(measure());
            } else {
                Steering::detach(attach_fd.as_fd()).ok();
                none.push(measure());
            }
        }
    }
    // The program's own time per run, in rounds of their own (see the
    // module's doc).
    program.attach(attach_fd.as_fd());
    let stats = enable_bpf_stats();
    let (mut run_ns, mut runs) = (0u64, 0u64);
    let mut run_ns_per_round = Vec::new();
    for _ in 0..args.pairs.div_ceil(2).max(3) {
        let (ns0, n0) = reuseport_prog_stats();
        thread::sleep(round);
        let (ns1, n1) = reuseport_prog_stats();
        let (ns, n) = (ns1.saturating_sub(ns0), n1.saturating_sub(n0));
        if n > 0 {
            run_ns_per_round.push(ns as f64 / n as f64);
        }
        run_ns += ns;
        runs += n;
    }
    drop(stats);
    Steering::detach(attach_fd.as_fd()).ok();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // The reference counts nothing: its decisions are its runs in the
    // statistics' rounds.
    let counters = match &program {
        Program::Steering(steering) => steering.counters(0, 0).expect("counters"),
        Program::SelectOnly(_) => reloader::steering::Counters {
            steered: runs,
            ..Default::default()
        },
    };
    let decisions = counters.steered + counters.affinity + counters.fallback;
    assert!(decisions > 0, "the program made no decision while attached");
    let ratio = |f: fn(&Round) -> f64| -> Vec<f64> {
        none.iter()
            .zip(&steered)
            .map(|(n, s)| f(s) / f(n))
            .collect()
    };
    let column =
        |rounds: &[Round], f: fn(&Round) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
    // What the program adds to the sender's CPU time per datagram, pair by
    // pair.
    let added_ns: Vec<f64> = none
        .iter()
        .zip(&steered)
        .map(|(n, s)| s.sender_cpu_ns_per_datagram - n.sender_cpu_ns_per_datagram)
        .collect();
    json!({
        "mode": args.mode.name(),
        "received_without_program_per_s": column(&none, |r| r.received_per_s),
        "received_with_program_per_s": column(&steered, |r| r.received_per_s),
        "sent_without_program_per_s": column(&none, |r| r.sent_per_s),
        "sent_with_program_per_s": column(&steered, |r| r.sent_per_s),
        "median_received_without_per_s": median(&column(&none, |r| r.received_per_s)),
        "median_received_with_per_s": median(&column(&steered, |r| r.received_per_s)),
        "median_pair_ratio_received": median(&ratio(|r| r.received_per_s)),
        "median_pair_ratio_sent": median(&ratio(|r| r.sent_per_s)),
        "pair_ratios_received": ratio(|r| r.received_per_s),
        "sender_cpu_ns_per_datagram_without": median(&column(&none, |r| r.sender_cpu_ns_per_datagram)),
        "sender_cpu_ns_per_datagram_with": median(&column(&steered, |r| r.sender_cpu_ns_per_datagram)),
        "median_pair_ratio_sender_cpu": median(&ratio(|r| r.sender_cpu_ns_per_datagram)),
        "pair_ratios_sender_cpu": ratio(|r| r.sender_cpu_ns_per_datagram),
        "median_pair_sender_cpu_ns_added": median(&added_ns),
        "pair_sender_cpu_ns_added": added_ns,
        "bpf_stats": runs > 0,
        "program_runs": runs,
        "program_ns_per_run": if runs > 0 { run_ns as f64 / runs as f64 } else { f64::NAN },
        "program_ns_per_run_rounds": run_ns_per_round,
        "process_cpu_ns_per_datagram_without": median(&column(&none, |r| r.process_cpu_ns_per_datagram)),
        "process_cpu_ns_per_datagram_with": median(&column(&steered, |r| r.process_cpu_ns_per_datagram)),
        "median_pair_ratio_process_cpu": median(&ratio(|r| r.process_cpu_ns_per_datagram)),
        "not_received": none.iter().chain(&steered).map(|r| r.lost).sum::<u64>(),
        "program_decisions": decisions,
        "steered": counters.steered,
        "affinity": counters.affinity,
        "fallback": counters.fallback,
        "flow_table_entries": table_size(args),
        "flows": args.flows,
        "server_sockets": args.sockets,
        "clients": clients,
        "round_ms": args.round_ms,
        "pairs": args.pairs,
    })
    .to_string()
}

/// One round's rates, and CPU time per datagram sent: of the client
/// threads (their `send` runs the kernel's receive path, and the program,
/// on loopback) and of the whole process (the readers too).
struct Round {
    received_per_s: f64,
    sent_per_s: f64,
    sender_cpu_ns_per_datagram: f64,
    process_cpu_ns_per_datagram: f64,
    lost: u64,
}

/// The CPU-time clock of `thread`.
fn thread_clock<T>(thread: &thread::JoinHandle<T>) -> libc::clockid_t {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: a live thread (joined only at the end) and a valid pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
    assert_eq!(rc, 0, "pthread_getcpuclockid");
    clock
}

/// `clock` (a CPU-time clock) in ns. Without `CONFIG_IRQ_TIME_ACCOUNTING`
/// a task's CPU time includes the softirq work done in its context.
fn cpu_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec pointer.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
