//! A settling generation's connections read through its processes'
//! descriptors instead of a sock_diag dump.
//!
//! A dump walks the kernel's whole established hash (every socket of
//! every namespace, TIME_WAIT ones included), and under a high rate of new
//! connections that hash holds tens of thousands of TIME_WAIT sockets: a
//! look then costs milliseconds however few connections the generation
//! holds (3–9 ms in the bench). Its processes hold few descriptors: each
//! socket among them is copied (`pidfd_getfd`, Linux ≥ 5.6), asked for
//! what a dump reports (`getsockname`, `getpeername`, `SO_COOKIE`,
//! `TCP_INFO`, `SIOCINQ`, `SIOCOUTQ`) and closed at once — a copy must not
//! outlive the look (a listener's copy would keep its queue alive).
//!
//! What this cannot see, the caller gets otherwise: connections still in
//! an accept queue (no descriptor yet) from a dump of the listeners,
//! which skips the established hash, taken *before* the descriptors are
//! read, so a connection accepted in between is in a descriptor by then;
//! handshakes in progress, which only a dump shows (not needed where the
//! kernel migrates them).

#![allow(clippy::disallowed_methods)] // procfs and socket calls: on blocking threads only

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

use super::dump::{self, Connection, TCP_INFO_MIN, tcp_activity};

/// More descriptors than this among the processes, and a dump is cheaper.
pub const MAX_SOCKETS: usize = 256;

/// The TCP connections on `managed` ports that `pids` hold, but not the
/// sockets `skip` (the generation's listeners, by inode); `None` when
/// reading descriptors is not possible here (no `pidfd_getfd`, not
/// allowed) or they are too many ([`MAX_SOCKETS`]).
pub fn connections(
    pids: &[u32],
    managed: &[SocketAddr],
    skip: &BTreeSet<u64>,
) -> Option<Vec<Connection>> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for &pid in pids {
        let Ok(process) = procfs::process::Process::new(pid as i32) else {
            continue;
        };
        let Ok(fds) = process.fd() else { continue };
        let Some(pid_arg) = Pid::from_raw(pid as i32) else {
            continue;
        };
        // An exited process has nothing left to answer.
        let Ok(pidfd) = pidfd_open(pid_arg, PidfdFlags::empty()) else {
            continue;
        };
        for fd in fds.flatten() {
            let procfs::process::FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            if skip.contains(&inode) || !seen.insert(inode) {
                continue;
            }
            if seen.len() > MAX_SOCKETS {
                return None;
            }
            let copy = match pidfd_getfd(&pidfd, fd.fd, PidfdGetfdFlags::empty()) {
                Ok(copy) => copy,
                // Closed since the listing.
                Err(rustix::io::Errno::BADF) => continue,
                Err(_) => return None,
            };
            if let Some(c) = connection(&copy, inode, managed) {
                found.push(c);
            }
        }
    }
    Some(found)
}

/// What a dump would report of TCP socket `socket` on a `managed` port
/// (`None` for any other socket).
fn connection(socket: &OwnedFd, inode: u64, managed: &[SocketAddr]) -> Option<Connection> {
    use rustix::net::{SocketAddrAny, getpeername, getsockname, sockopt};
    let fd = socket.as_raw_fd();
    if sockopt::socket_protocol(socket)
        .ok()?
        .map(|p| p.as_raw().get())
        != Some(libc::IPPROTO_TCP as u32)
    {
        return None;
    }
    let local: SocketAddr = SocketAddrAny::try_into(getsockname(socket).ok()?).ok()?;
    if !super::is_managed(managed, local) {
        return None;
    }
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a valid buffer of `len` bytes for the kernel's tcp_info.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < TCP_INFO_MIN {
        return None;
    }
    let state = info[0];
    if state == dump::TCP_LISTEN {
        return None;
    }
    // A closed connection has no peer: it is no longer one to wait for.
    let remote: SocketAddr = SocketAddrAny::try_into(getpeername(socket).ok()??).ok()?;
    let queue = |request: libc::c_ulong| -> u32 {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ / SIOCOUTQ write one int.
        let rc = unsafe { libc::ioctl(fd, request, &mut n) };
        if rc == 0 { n.max(0) as u32 } else { 0 }
    };
    Some(Connection {
        cookie: sockopt::socket_cookie(socket).unwrap_or(0),
        local,
        remote,
        cgroup_id: None,
        state,
        inode: inode as u32,
        unread: queue(libc::FIONREAD),
        unsent: queue(libc::TIOCOUTQ),
        activity: Some(tcp_activity(&info[..len as usize])),
    })
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::fs::MetadataExt};

    use super::*;

    fn inode(fd: &impl std::os::fd::AsFd) -> u64 {
        let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
        std::fs::metadata(path).unwrap().ino()
    }

    /// This process as a generation: its listener skipped, its accepted
    /// connection read as a dump would show it, its client end (not on
    /// the managed port) left out.
    #[test]
    fn the_connections_a_process_holds_are_read_through_its_descriptors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let skip = BTreeSet::from([inode(&listener)]);
        let me = std::process::id();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = connections(&[me], &[addr], &skip).expect("descriptors readable");
            if found.first().is_some_and(|c| c.unread == 5) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        let c = found[0];
        assert_eq!(c.local, addr);
        assert_eq!(c.remote, client.local_addr().unwrap());
        assert_eq!(c.state, dump::TCP_ESTABLISHED);
        assert_eq!((c.unread, u64::from(c.inode)), (5, inode(&server)));
        assert_eq!(c.activity.map(|a| a.bytes_received), Some(5));
        // The dump agrees on its cookie.
        let dumped = dump::sockets(&[addr], dump::Query::SETTLING).unwrap();
        assert!(
            dumped
                .iter()
                .any(|d| d.cookie == c.cookie && d.remote == c.remote)
        );
        // Only managed ports.
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(connections(&[me], &[other], &skip), Some(vec![]));
    }
}
