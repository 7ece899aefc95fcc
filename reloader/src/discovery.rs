//! Discovery: which listening sockets does a server's process tree hold?
//!
//! An unmodified server opens its listeners itself, often in worker
//! processes (nginx with `reuseport` opens one socket per worker in the
//! master; HAProxy opens them per thread). We find them without the
//! server's help:
//!
//! 1. `NETLINK_SOCK_DIAG` lists the TCP sockets in state LISTEN of our
//!    network namespace with inode, cookie, local address and current
//!    accept-queue length (for listeners `idiag_rqueue` is the queue length,
//!    `idiag_wqueue` the backlog; net/ipv4/tcp_diag.c), and the bound,
//!    unconnected UDP sockets (state `TCP_CLOSE`; `idiag_rqueue` is the bytes
//!    waiting in the receive buffer, not datagrams). Connected UDP sockets
//!    are left out: the kernel matches their 4-tuple before the reuseport
//!    group and removes them from a `REUSEPORT_SOCKARRAY` at `connect`.
//! 2. `/proc/PID/fd` of every process in the tree maps socket inodes to the
//!    (pid, fd) that holds them.
//! 3. `pidfd_open` + `pidfd_getfd` (Linux ≥ 5.6, needs `CAP_SYS_PTRACE` or
//!    root) copy the descriptor into our process so steering can put it in
//!    its map; the copy is closed right after.

#![allow(clippy::disallowed_methods)] // /proc walks and netlink dumps: called on blocking threads only (`reload::System`, start-up)

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    os::fd::{OwnedFd, RawFd},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use serde::Serialize;
use thiserror::Error;

pub use crate::net::Transport;

/// A listening TCP socket or a bound, unconnected UDP socket of this
/// network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub inode: u64,
    pub cookie: u64,
    pub transport: Transport,
    pub addr: SocketAddr,
    /// TCP: connections waiting in the accept queue now; UDP: bytes waiting
    /// in the receive buffer.
    pub accept_queue: u32,
    /// The listen backlog (TCP).
    pub backlog: u32,
}

/// Where a process holds a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub fd: RawFd,
}

/// Errors of discovery.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// Talking to `NETLINK_SOCK_DIAG` failed.
    #[error("sock_diag netlink query failed")]
    NetlinkError {
        #[source]
        source: io::Error,
    },
    /// The kernel has no TCP sock_diag handler (`tcp_diag` is a module on
    /// many distribution kernels, normally loaded on demand).
    #[error(
        "the kernel cannot list TCP sockets over sock_diag (ENOENT): load its modules with \
         `modprobe tcp_diag` (needs CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG)"
    )]
    NoTcpDiag,
    /// A sock_diag answer could not be decoded.
    #[error("could not decode a sock_diag answer: {message}")]
    Decode { message: String },
    /// Reading `/proc` failed.
    #[error("failed to read /proc")]
    ProcError {
        #[source]
        source: procfs::ProcError,
    },
    /// The descriptor copied is no longer the socket the scan found there
    /// (the process closed it and reused the number: HAProxy's master
    /// closes its listeners once its worker runs).
    #[error(
        "fd {fd} of pid {pid} is no longer the socket {inode} the scan found there: the process \
         closed it meanwhile"
    )]
    Moved { pid: u32, fd: RawFd, inode: u64 },
    /// `pidfd_open` or `pidfd_getfd` failed.
    #[error("failed to copy fd {fd} of pid {pid} ({call}): {}", copy_hint(source))]
    CopyError {
        pid: u32,
        fd: RawFd,
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

impl DiscoveryError {
    /// Whether a process or descriptor found by a scan was gone by the time
    /// it was copied: a server that daemonizes, or re-execs, moves its
    /// sockets between processes while it starts. Scanning again finds the
    /// holder of now.
    pub fn vanished(&self) -> bool {
        match self {
            Self::CopyError { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ESRCH | libc::EBADF))
            }
            Self::Moved { .. } => true,
            _ => false,
        }
    }
}

/// Every TCP socket in state LISTEN in this network namespace.
pub fn listeners() -> Result<Vec<Listener>, DiscoveryError> {
    let mut all = Vec::new();
    for family in [AF_INET, AF_INET6] {
        all.extend(dump(family, Transport::Tcp)?);
        match dump(family, Transport::Udp) {
            Ok(udp) => all.extend(udp),
            // No udp_diag module: reloader manages no UDP then, and says so
            // when asked to (`udp_sockets_needed`).
            Err(DiscoveryError::NoTcpDiag) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(all)
}

/// `TCP_CLOSE`: the state a bound, unconnected UDP socket reports.
const UDP_UNCONNECTED: u8 = 7;

fn dump(family: u8, transport: Transport) -> Result<Vec<Listener>, DiscoveryError> {
    let states = match transport {
        Transport::Tcp => StateFlags::LISTEN,
        Transport::Udp => StateFlags::all(),
    };
    let mut found = Vec::new();
    diag(family, transport, states, |response| {
        let h = &response.header;
        if transport == Transport::Tcp || h.state == UDP_UNCONNECTED {
            found.push(Listener {
                inode: u64::from(h.inode),
                cookie: u64::from_ne_bytes(h.socket_id.cookie),
                transport,
                addr: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                accept_queue: h.recv_queue,
                backlog: h.send_queue,
            });
        }
    })?;
    Ok(found)
}

/// One sock_diag dump of `family`/`transport` sockets in `states`; `each`
/// sees every answer.
fn diag(
    family: u8,
    transport: Transport,
    states: StateFlags,
    mut each: impl FnMut(&netlink_packet_sock_diag::inet::InetResponse),
) -> Result<(), DiscoveryError> {
    let netlink = |source| DiscoveryError::NetlinkError { source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(netlink)?;
    socket.bind_auto().map_err(netlink)?;
    socket.connect(&NetlinkAddr::new(0, 0)).map_err(netlink)?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: match transport {
                Transport::Tcp => IPPROTO_TCP,
                Transport::Udp => IPPROTO_UDP,
            },
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(netlink)?;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0).map_err(netlink)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| DiscoveryError::Decode {
                    message: e.to_string(),
                })?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response);
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    let source = error.to_io();
                    if source.raw_os_error() == Some(libc::ENOENT) {
                        return Err(DiscoveryError::NoTcpDiag);
                    }
                    return Err(DiscoveryError::NetlinkError { source });
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// `root` and all its descendants (by parent pid, from `/proc`).
pub fn process_tree(root: u32) -> Result<Vec<u32>, DiscoveryError> {
    let proc_error = |source| DiscoveryError::ProcError { source };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for process in procfs::process::all_processes().map_err(proc_error)? {
        // Processes vanish while we read: skip them.
        let Ok(process) = process else { continue };
        let Ok(stat) = process.stat() else { continue };
        children
            .entry(stat.ppid as u32)
            .or_default()
            .push(stat.pid as u32);
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        if let Some(kids) = children.get(&tree[i]) {
            tree.extend(kids);
        }
        i += 1;
    }
    Ok(tree)
}

/// Socket inode → the first (pid, fd) found holding it, for `pids`.
pub fn socket_holders(pids: &[u32]) -> BTreeMap<u64, Holder> {
    let mut holders = BTreeMap::new();
    for &pid in pids {
        let Ok(process) = procfs::process::Process::new(pid as i32) else {
            continue;
        };
        let Ok(fds) = process.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                holders.entry(inode).or_insert(Holder { pid, fd: fd.fd });
            }
        }
    }
    holders
}

/// The listening sockets a process tree holds, per wanted address.
#[derive(Debug, Default)]
pub struct Found {
    /// For each wanted address (same order), its sockets and holders.
    pub per_address: Vec<Vec<(Listener, Holder)>>,
    /// Every (transport, address) the tree listens on (wanted or not),
    /// sorted.
    pub tree_listens_on: Vec<(Transport, SocketAddr)>,
}

/// Finds the sockets for `wanted` (transport, address) held by the tree of
/// `root`.
pub fn find(root: u32, wanted: &[(Transport, SocketAddr)]) -> Result<Found, DiscoveryError> {
    let tree = process_tree(root)?;
    find_among(&tree, wanted)
}

/// As [`find`], among the processes `pids` (a generation's cgroup).
pub fn find_among(
    pids: &[u32],
    wanted: &[(Transport, SocketAddr)],
) -> Result<Found, DiscoveryError> {
    let listening = listeners()?;
    let holders = socket_holders(pids);
    let per_address = wanted
        .iter()
        .map(|(transport, addr)| {
            listening
                .iter()
                .filter(|l| l.addr == *addr && l.transport == *transport)
                .filter_map(|l| holders.get(&l.inode).map(|h| (l.clone(), *h)))
                .collect()
        })
        .collect();
    let mut tree_listens_on: Vec<(Transport, SocketAddr)> = listening
        .iter()
        .filter(|l| holders.contains_key(&l.inode))
        .map(|l| (l.transport, l.addr))
        .collect();
    tree_listens_on.sort();
    tree_listens_on.dedup();
    Ok(Found {
        per_address,
        tree_listens_on,
    })
}

/// Copies fd `fd` of process `pid` into this process.
pub fn copy_fd(pid: u32, fd: RawFd) -> Result<OwnedFd, DiscoveryError> {
    let error = |call, source| DiscoveryError::CopyError {
        pid,
        fd,
        call,
        source,
    };
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| error("pidfd_open", io::Error::from_raw_os_error(libc::ESRCH)))?;
    let pidfd = pidfd_open(target, PidfdFlags::empty())
        .map_err(|e| error("pidfd_open", io::Error::from(e)))?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())
        .map_err(|e| error("pidfd_getfd", io::Error::from(e)))
}

/// Whether `pid` runs a Go program: its executable (`/proc/PID/exe`) is an
/// ELF file with a `.go.buildinfo` section, which the Go linker writes
/// into every binary (also stripped ones: `-s -w` drops symbols, not
/// sections). Reads the ELF and section headers only.
pub fn is_go_program(pid: u32) -> bool {
    is_go_executable(std::path::Path::new(&format!("/proc/{pid}/exe")))
}

/// As [`is_go_program`], for the executable at `path`.
pub fn is_go_executable(path: &std::path::Path) -> bool {
    use object::{Object, read::ReadCache};
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let cache = ReadCache::new(file);
    object::File::parse(&cache).is_ok_and(|elf| elf.section_by_name(".go.buildinfo").is_some())
}

/// Copies the socket with inode `inode` that a scan found as fd `fd` of
/// `pid`: [`copy_fd`], then checks the copy is that socket (the number may
/// have been closed and reused since the scan).
pub fn copy_socket(pid: u32, fd: RawFd, inode: u64) -> Result<OwnedFd, DiscoveryError> {
    let copy = copy_fd(pid, fd)?;
    match rustix::fs::fstat(&copy) {
        Ok(stat) if stat.st_ino == inode => Ok(copy),
        _ => Err(DiscoveryError::Moved { pid, fd, inode }),
    }
}

/// The command name of `pid` (for messages), if it still exists.
pub fn process_name(pid: u32) -> Option<String> {
    procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.comm)
}

/// Who holds listening sockets on `addr` in this namespace, outside the
/// process trees in `ours`: for naming the holder of a port in errors.
pub fn holders_of(
    transport: Transport,
    addr: SocketAddr,
) -> Result<Vec<(Listener, Option<Holder>)>, DiscoveryError> {
    let listening: Vec<Listener> = listeners()?
        .into_iter()
        .filter(|l| l.transport == transport && l.addr.port() == addr.port())
        .collect();
    if listening.is_empty() {
        return Ok(Vec::new());
    }
    let pids: Vec<u32> = procfs::process::all_processes()
        .map_err(|source| DiscoveryError::ProcError { source })?
        .flatten()
        .map(|p| p.pid as u32)
        .collect();
    let holders = socket_holders(&pids);
    Ok(listening
        .into_iter()
        .map(|l| {
            let holder = holders.get(&l.inode).copied();
            (l, holder)
        })
        .collect())
}

/// What to do about a failed `pidfd_open`/`pidfd_getfd`, by its errno.
fn copy_hint(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => format!(
            "the controller's file descriptor limit is reached ({error}): raise it (`ulimit -n`, \
             systemd `LimitNOFILE=`); reloader holds a pidfd per generation and copies every \
             listening socket it registers"
        ),
        Some(libc::EPERM | libc::EACCES) => {
            format!("{error}: reloader needs root or CAP_SYS_PTRACE to copy a server's sockets")
        }
        Some(libc::ENOSYS) => format!("{error}: pidfd_getfd needs Linux >= 5.6"),
        Some(libc::ESRCH | libc::EBADF) => {
            format!("{error}: the process exited or closed it meanwhile")
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::is_go_executable;

    /// Neither a Rust binary nor a text file nor a missing one is a Go
    /// program (the privileged `operator` tests see a real Go server).
    #[test]
    fn only_go_binaries_are_go_programs() {
        assert!(!is_go_executable(&std::env::current_exe().unwrap()));
        assert!(!is_go_executable(std::path::Path::new("/etc/passwd")));
        assert!(!is_go_executable(std::path::Path::new("/nonexistent")));
    }
}
