//! What a socket must be before steering registers it or attaches the
//! program through it, read with `getsockname`/`getsockopt`, and its cookie
//! (`SO_COOKIE`), which identifies it in a slot's layout for as long as it
//! lives.
//!
//! Kernel behaviour this relies on: only sockets with `SO_REUSEPORT` set
//! before bind join a reuseport group, and the kernel lets no `SK_REUSEPORT`
//! program attach to an MPTCP socket (`SO_PROTOCOL` 262, what Go >= 1.24
//! listens with by default) or select it.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};

use crate::steering::{ListenerSpec, Result, SteeringError, Transport};

/// Checks that `socket` can be steered to: `SO_REUSEPORT` set, not MPTCP
/// and, when `expected` is given, of the listener's transport (a listening
/// TCP socket, or a bound UDP socket) and bound to its address.
pub(super) fn check_socket(
    socket: BorrowedFd<'_>,
    expected: Option<(u32, &ListenerSpec)>,
) -> Result<()> {
    let fd = socket.as_raw_fd();
    let query = |source| SteeringError::SocketError { fd, source };
    let local: SockaddrStorage = getsockname(fd).map_err(query)?;
    let local_text = local.to_string();
    if protocol(socket).map_err(query)? == IPPROTO_MPTCP {
        return Err(SteeringError::MptcpListener {
            fd,
            addr: local_text,
        });
    }
    if !getsockopt(&socket, sockopt::ReusePort).map_err(query)? {
        return Err(SteeringError::NotReuseport {
            fd,
            addr: local_text,
        });
    }
    if let Some((listener, spec)) = expected {
        let kind = getsockopt(&socket, sockopt::SockType).map_err(query)?;
        let fits = match spec.transport {
            Transport::Tcp => {
                kind == nix::sys::socket::SockType::Stream
                    && getsockopt(&socket, sockopt::AcceptConn).map_err(query)?
            }
            Transport::Udp => kind == nix::sys::socket::SockType::Datagram,
        };
        if !fits {
            return Err(SteeringError::WrongKind {
                fd,
                expected: spec.transport,
            });
        }
        if to_std(&local) != Some(spec.addr) {
            return Err(SteeringError::WrongAddress {
                fd,
                listener,
                expected: spec.addr,
                found: local_text,
            });
        }
    }
    Ok(())
}

/// The socket's cookie (`SO_COOKIE`): its identity for as long as it lives.
pub(super) fn cookie(socket: BorrowedFd<'_>) -> Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, a u64 buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    nix::errno::Errno::result(rc)
        .map(|_| value)
        .map_err(|source| SteeringError::SocketError {
            fd: socket.as_raw_fd(),
            source,
        })
}

/// `IPPROTO_MPTCP` (not in libc for every target).
const IPPROTO_MPTCP: i32 = 262;

/// The socket's `SO_PROTOCOL`.
fn protocol(socket: BorrowedFd<'_>) -> nix::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, an int-sized buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    nix::errno::Errno::result(rc).map(|_| value)
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        addr.as_sockaddr_in6()
            .map(|v6| SocketAddr::V6((*v6).into()))
    }
}
