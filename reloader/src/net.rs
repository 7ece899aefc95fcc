//! The one place that opens listening sockets the way reloader's servers
//! must: `SO_REUSEPORT` set before `bind(2)` (the kernel checks it there,
//! and TCP sockets join the reuseport group at `listen(2)`), IPv6 sockets
//! `IPV6_V6ONLY` so `[::]:P` and `0.0.0.0:P` are separate groups.
//! `--pass-fds`, the demo server, the test server and the tests use it.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

/// The transport of a managed address.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

impl Transport {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub fn protocol(self) -> u32 {
        match self {
            Self::Tcp => libc::IPPROTO_TCP as u32,
            Self::Udp => libc::IPPROTO_UDP as u32,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A bound UDP socket on `addr` (`SO_REUSEPORT` if `reuseport`).
pub fn udp_socket(addr: SocketAddr, reuseport: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Backlog of the listeners opened here.
pub const BACKLOG: i32 = 1024;

/// A TCP socket bound to `addr`, not yet listening; `SO_REUSEPORT` if
/// `reuseport`.
pub fn bound_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A non-blocking TCP listener on `addr` (`SO_REUSEPORT` if `reuseport`).
pub fn tcp_listener(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let socket = bound_tcp(addr, reuseport)?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Backoff for a failing `accept` (EMFILE, ENFILE, ENOBUFS): from 10 ms,
/// doubling to 1 s, so a full fd table does not spin the controller.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// Logs `error` (once per backoff series) and sleeps.
    pub async fn wait(&mut self, error: &io::Error, what: &str) {
        if self.next == Self::FIRST {
            tracing::warn!(%error, "{what}: accept failed; backing off");
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuseport_listeners_share_a_port_and_plain_ones_do_not() {
        let first = tcp_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = tcp_listener(addr, true).expect("a second SO_REUSEPORT listener");
        assert_eq!(second.local_addr().unwrap(), addr);
        let plain = tcp_listener(addr, false).unwrap_err();
        assert_eq!(plain.kind(), io::ErrorKind::AddrInUse);
    }
}
