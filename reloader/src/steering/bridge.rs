//! Bridge listeners: the controller's own listener in a managed TCP group,
//! which holds connections while no generation listens.
//!
//! A server can leave its address without a listener for a moment while it
//! runs: gunicorn `--max-requests` recycles its workers, each with its own
//! listener, and workers that started together reach their limit together;
//! a crashed generation is not yet restarted. With no live listener in the
//! target slot, a new connection has nowhere to go (the kernel's hash picks
//! a closing member or none: refused), and the queue of a closing listener
//! cannot migrate (`reuseport_migrate_sock` fails when the group has no
//! listening member: reset). Measured on 6.18 with gunicorn `-w 3
//! --max-requests 1000` under `wrk -c8 -H 'Connection: close'` and a reload
//! every 0.6 s: `TcpExtTCPMigrateReqFailure` 8–16 and as many connections
//! reset per 8 s run, every one while all three workers of a generation had
//! exited and their replacements were still booting.
//!
//! The program sends such connections to the listener's bridge instead
//! (`BRIDGES`); they wait in its accept queue, which nobody accepts from.
//! Once the target slot has a live socket again, [`Bridge::replace`] opens
//! a new bridge, puts it in the map, and closes the old one: the kernel
//! migrates the old one's queue through the program, to the generation.
//!
//! Kernel rules relied on (net/ipv4/inet_hashtables.c
//! `inet_reuseport_add_sock`, 6.1–6.18): a listener joins the reuseport
//! group of a listening socket with the same family, `IPV6_V6ONLY`, bound
//! device, bind bucket (port), local address and owner uid (the socket
//! inode's, `fstat`); otherwise it starts a group of its own, and two
//! groups on one address compete in the lookup. So a bridge copies those
//! from a registered socket of the server and is only made when the
//! server's socket belongs to the controller's uid. The program is also
//! attached through the bridge, so a group the bridge happens to start
//! (every server socket closing at that instant) steers too, and the
//! server's next sockets join it.
//!
//! Only with the select-or-migrate program: without migration, closing a
//! bridge would reset what it holds.

use std::{
    io,
    net::SocketAddr,
    num::NonZeroU32,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use socket2::{Domain, SockRef, Socket, Type};

/// What a bridge must share with the server's listeners to join their
/// group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub addr: SocketAddr,
    pub v6only: bool,
    pub device: Option<NonZeroU32>,
}

/// Why no bridge is made for a listener.
#[derive(Debug, thiserror::Error)]
pub enum NoBridge {
    #[error(
        "the server's socket belongs to uid {owner} and the controller runs as uid {ours}: a \
         socket of the controller would not join its reuseport group"
    )]
    OtherOwner { owner: u32, ours: u32 },
    #[error("cannot read the server's socket: {0}")]
    Inspect(#[source] io::Error),
    #[error("cannot open a listener on {addr}: {source}")]
    Open {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl Shape {
    /// The shape of `socket`, a listener of the server, if the controller
    /// can join its group.
    pub fn of(socket: BorrowedFd<'_>) -> Result<Self, NoBridge> {
        let stat = nix::sys::stat::fstat(socket).map_err(|e| NoBridge::Inspect(e.into()))?;
        let ours = nix::unistd::geteuid().as_raw();
        if stat.st_uid != ours {
            return Err(NoBridge::OtherOwner {
                owner: stat.st_uid,
                ours,
            });
        }
        let sock = SockRef::from(&socket);
        let addr = sock
            .local_addr()
            .map_err(NoBridge::Inspect)?
            .as_socket()
            .ok_or_else(|| NoBridge::Inspect(io::Error::other("not an IP socket")))?;
        let v6only = addr.is_ipv6() && sock.only_v6().map_err(NoBridge::Inspect)?;
        let device = sock.device_index_v4().map_err(NoBridge::Inspect)?;
        Ok(Self {
            addr,
            v6only,
            device,
        })
    }
}

/// One bridge listener.
#[derive(Debug)]
pub struct Bridge {
    fd: OwnedFd,
    shape: Shape,
}

impl Bridge {
    /// Opens a listener of `shape` (close-on-exec: no server inherits it).
    pub fn open(shape: Shape) -> Result<Self, NoBridge> {
        let open = || -> io::Result<OwnedFd> {
            let socket = Socket::new(
                Domain::for_address(shape.addr),
                Type::STREAM.cloexec(),
                None,
            )?;
            socket.set_nonblocking(true)?;
            socket.set_reuse_port(true)?;
            if shape.addr.is_ipv6() {
                socket.set_only_v6(shape.v6only)?;
            }
            if shape.device.is_some() {
                socket.bind_device_by_index_v4(shape.device)?;
            }
            socket.bind(&shape.addr.into())?;
            // The kernel caps it at net.core.somaxconn.
            socket.listen(i32::MAX)?;
            Ok(socket.into())
        };
        open()
            .map(|fd| Self { fd, shape })
            .map_err(|source| NoBridge::Open {
                addr: shape.addr,
                source,
            })
    }

    /// Connections waiting in its accept queue (`tcpi_unacked` of a
    /// listener is its accept backlog).
    pub fn queued(&self) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        // SAFETY: `tcp_info` is plain integers; the kernel writes at most
        // `len` bytes of it and `len` says how many.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info.tcpi_unacked)
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }
}

impl AsFd for Bridge {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
