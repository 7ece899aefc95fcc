//! Support for reloader's privileged integration tests.
//!
//! Every test calls [`privileged`] first: it fails loudly when not root (so a
//! CI run can never pass by skipping) and moves the calling thread into a
//! fresh network namespace with `lo` up. Network namespaces are per thread,
//! and threads and processes started afterwards inherit the thread's, so
//! each test has its own ports and its own reuseport groups whether the
//! harness runs tests as threads or as processes.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, unshare};
use socket2::{Domain, Socket, Type};

/// Asserts the test runs as root and enters a new network namespace.
pub fn privileged() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged test: run as root (`sudo -E cargo xtask test`), or in a VM with \
         `cargo xtask integration-test --vm`"
    );
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    loopback_up();
}

/// The steering program `reloader` must load on the running kernel, by its
/// version alone (`/proc/sys/kernel/osrelease`): `select-or-migrate` from
/// Linux 5.14, `select-only` before.
pub fn expected_steering_mode() -> reloader::steering::Mode {
    if kernel_at_least(5, 14) {
        reloader::steering::Mode::SelectOrMigrate
    } else {
        reloader::steering::Mode::SelectOnly
    }
}

/// Whether the running kernel is at least `major.minor` (procfs reads
/// `/proc/sys/kernel/osrelease`).
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    let version = procfs::sys::kernel::Version::current().expect("kernel version");
    (version.major, version.minor) >= (major, minor)
}

/// Where cgroup2 is mounted here (`/sys/fs/cgroup/unified` on a hybrid
/// host, `/sys/fs/cgroup` in the test VM), if it is.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    procfs::process::Process::myself()
        .ok()?
        .mountinfo()
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// Sets `IFF_UP` on `lo` of the current network namespace.
fn loopback_up() {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket for ioctl");
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket and ifreq pointer for SIOCGIFFLAGS/SIOCSIFFLAGS.
    unsafe {
        assert_eq!(
            libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            0,
            "SIOCGIFFLAGS lo"
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req),
            0,
            "SIOCSIFFLAGS lo"
        );
    }
}

/// A TCP socket with `SO_REUSEPORT`, bound to `addr`, not yet listening.
pub fn reuseport_socket(addr: SocketAddr) -> Socket {
    reloader::net::bound_tcp(addr, true).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// A non-blocking listening socket with `SO_REUSEPORT` on `addr`.
pub fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    reloader::net::tcp_listener(addr, true).unwrap_or_else(|e| panic!("listen on {addr}: {e}"))
}

/// Opens `n` connections to `addr`; each sends `hello {i}\n`.
pub fn connect_with_greeting(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect {i} to {addr}: {e}"));
            stream
                .write_all(format!("hello {i}\n").as_bytes())
                .expect("send greeting");
            stream
        })
        .collect()
}

/// Opens `n` connections to `addr` and keeps them open.
pub fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect {i} to {addr}: {e}"))
        })
        .collect()
}

/// Accepts from every listener until `expected` connections in total were
/// accepted (or 5 s pass, then panics) and a short quiet period shows no
/// more arrive. Returns the accepted streams per listener.
pub fn accept_all(listeners: &[&TcpListener], expected: usize) -> Vec<Vec<TcpStream>> {
    let mut accepted: Vec<Vec<TcpStream>> = listeners.iter().map(|_| Vec::new()).collect();
    let mut quiet_since: Option<Instant> = None;
    wait::wait_for(
        format!("{expected} connections accepted and no more arriving"),
        Duration::from_secs(5),
        || {
            let mut progress = false;
            for (i, listener) in listeners.iter().enumerate() {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).expect("blocking stream");
                            accepted[i].push(stream);
                            progress = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            }
            let total: usize = accepted.iter().map(Vec::len).sum();
            if total >= expected {
                // Give stray connections a moment to show up, so "all on one
                // listener" is not an artefact of stopping early.
                match quiet_since {
                    Some(t) if t.elapsed() > Duration::from_millis(50) => return Ok(()),
                    Some(_) if !progress => {}
                    _ => quiet_since = Some(Instant::now()),
                }
            }
            Err(format!(
                "accepted {total} (per listener: {:?})",
                accepted.iter().map(Vec::len).collect::<Vec<_>>()
            ))
        },
    );
    accepted
}

/// Reads one `\n`-terminated line from `stream` (5 s timeout).
pub fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    String::from_utf8(line).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// The test server as the soak and the benchmark run it: two workers, each
/// with its own `SO_REUSEPORT` listener on `addr` (like nginx), and a
/// graceful stop that, like nginx's, closes accepted connections it has not
/// read a request from yet.
pub fn testserver_command(testserver: &std::path::Path, addr: &str) -> Vec<String> {
    vec![
        testserver.display().to_string(),
        "--listen".into(),
        addr.into(),
        "--workers".into(),
        "2".into(),
        "--close-idle-on-drain".into(),
    ]
}

pub mod events;
pub mod http;
pub mod instance;
pub mod keepalive;
pub mod load;
pub mod loadgen;
pub mod nginx;
pub mod process;
pub mod prometheus;
pub mod servers;
pub mod udp;
pub mod udp_load;
pub mod wait;
