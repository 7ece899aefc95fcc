//! The managed address (`--listen`): its transport, address and, for UDP,
//! its mode. A module of its own, below both the configuration and the
//! steering maps, which each use it; parsing it from the command line is
//! the command line's (`cli::parse_listen_addr`).

use std::net::SocketAddr;

pub use reloader_ebpf::Mode as ListenerMode;

pub use crate::net::Transport;

/// A managed address: what `--listen` names, as discovery matches sockets
/// and steering keys its maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub transport: Transport,
    pub mode: ListenerMode,
}

impl From<SocketAddr> for ListenerSpec {
    /// A TCP listener.
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Tcp,
            mode: ListenerMode::Tcp,
        }
    }
}

impl ListenerSpec {
    /// A UDP listener with flow affinity (`udp://ADDR?mode=flows`) or stateless
    /// (`udp://ADDR?mode=stateless`).
    pub fn udp(addr: SocketAddr, stateless: bool) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
            mode: if stateless {
                ListenerMode::UdpStateless
            } else {
                ListenerMode::UdpFlows
            },
        }
    }

    /// (transport, address): what discovery matches sockets by.
    pub fn key(&self) -> (Transport, SocketAddr) {
        (self.transport, self.addr)
    }
}

impl std::fmt::Display for ListenerSpec {
    /// As `--listen` takes it: `IP:PORT` for TCP, `udp://IP:PORT` with
    /// `?mode=flows` or `?mode=stateless`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.transport, self.mode) {
            (Transport::Tcp, _) => write!(f, "{}", self.addr),
            (Transport::Udp, ListenerMode::UdpStateless) => {
                write!(f, "udp://{}?mode=stateless", self.addr)
            }
            (Transport::Udp, _) => write!(f, "udp://{}?mode=flows", self.addr),
        }
    }
}
