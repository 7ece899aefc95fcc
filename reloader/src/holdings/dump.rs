//! The established TCP connections on the managed ports: one sock_diag
//! dump per managed address family, filtered in the kernel by local port
//! (`INET_DIAG_REQ_BYTECODE`) and read without allocating per socket —
//! `status` and every scrape run it, and with 10,000 connections the
//! namespace also holds the clients' 10,000 ends when they are local.
//!
//! Built and parsed by hand (the `netlink-packet-sock-diag` request type
//! carries no bytecode, and its parser allocates for every attribute).
//! Layouts from `include/uapi/linux/inet_diag.h`:
//! - request: `nlmsghdr`, `inet_diag_req_v2` (56 bytes), then the
//!   `INET_DIAG_REQ_BYTECODE` attribute;
//! - answer: `nlmsghdr`, `inet_diag_msg` (72 bytes: family, state, timer,
//!   retrans, `inet_diag_sockid` of 48 bytes with the cookie at 40, then
//!   expires, queues, uid, inode), then attributes, among them
//!   `INET_DIAG_CGROUP_ID` (Linux ≥ 5.7, always sent).
//!
//! The bytecode (net/ipv4/inet_diag.c, `inet_diag_bc_run`): each op is
//! `{code, yes, no}` and jumps `yes` or `no` bytes ahead; a socket is
//! dumped when the program ends exactly at its end, and skipped when it
//! jumps 4 bytes past it ([`bytecode`]).

#![allow(clippy::disallowed_methods)] // a netlink dump: on blocking threads only

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::discovery::DiscoveryError;

/// A TCP socket on a managed port, as counting and settling need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    pub cookie: u64,
    /// Its local address (a managed address's port).
    pub local: SocketAddr,
    /// Its remote address.
    pub remote: SocketAddr,
    /// The cgroup (v2 id) its socket was created in: the listener's it was
    /// accepted from.
    pub cgroup_id: Option<u64>,
    /// Its TCP state (`TCP_ESTABLISHED`, …; `TCP_NEW_SYN_RECV` for a
    /// handshake in progress).
    pub state: u8,
    /// Its socket's inode (0 while it waits in an accept queue).
    pub inode: u32,
    /// Bytes received and not read by the server (`idiag_rqueue`; for a
    /// listener, the connections in its accept queue).
    pub unread: u32,
    /// Bytes written by the server and not yet acknowledged
    /// (`idiag_wqueue`: unsent and in flight).
    pub unsent: u32,
    /// From its `tcp_info`, when asked for ([`Query::activity`]).
    pub activity: Option<Activity>,
}

/// What a connection's `tcp_info` says about its last exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Milliseconds since it last sent data (`tcpi_last_data_sent`; jiffy
    /// resolution).
    pub last_sent_ms: u32,
    /// Milliseconds since it last received data (`tcpi_last_data_recv`).
    pub last_received_ms: u32,
    /// Bytes it received (`tcpi_bytes_received`).
    pub bytes_received: u64,
    /// Bytes it sent (`tcpi_bytes_sent`, Linux ≥ 4.19; 0 before).
    pub bytes_sent: u64,
}

/// What to dump.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// A mask of `1 << state`.
    pub states: u32,
    /// Each socket's `tcp_info` too (`INET_DIAG_INFO`): costs a copy of
    /// 232 bytes per socket, so `status` does not ask for it.
    pub activity: bool,
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;
/// A request socket: a handshake in progress (`include/net/tcp_states.h`).
pub const TCP_NEW_SYN_RECV: u8 = 12;

impl Query {
    /// Established connections, without their `tcp_info` (counting).
    pub const ESTABLISHED: Self = Self {
        states: 1 << TCP_ESTABLISHED,
        activity: false,
    };
    /// Listeners only (their `unread` is the accept queue's length): the
    /// kernel then skips the established hash (`inet_diag_dump_icsk`
    /// ends after the listening hash when no other state is asked for).
    pub const LISTENERS: Self = Self {
        states: 1 << TCP_LISTEN,
        activity: false,
    };
    /// What a generation may still have to answer (settling): its
    /// listeners (their `unread` is the accept queue's length), established
    /// and close-wait connections with their `tcp_info`, and handshakes in
    /// progress (asking for `SYN_RECV` dumps the request sockets too). One
    /// dump per family: a look costs what a status does.
    pub const SETTLING: Self = Self {
        states: 1 << TCP_ESTABLISHED
            | 1 << TCP_LISTEN
            | 1 << TCP_CLOSE_WAIT
            | 1 << TCP_SYN_RECV
            | 1 << TCP_NEW_SYN_RECV,
        activity: true,
    };
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_NOP: u8 = 0;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
const HEADER: usize = 16;
const REQUEST: usize = 56;
const MESSAGE: usize = 72;
/// `struct tcp_info` up to `tcpi_bytes_received` (offsets from
/// `include/uapi/linux/tcp.h`, checked with `offsetof` on 6.18 headers).
pub(super) const TCP_INFO_MIN: usize = 136;
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_BYTES_SENT: usize = 200;

/// The established TCP connections on the `managed` addresses' ports.
pub fn established(managed: &[SocketAddr]) -> Result<Vec<Connection>, DiscoveryError> {
    sockets(managed, Query::ESTABLISHED)
}

/// The TCP sockets on the `managed` addresses' ports, as `query` asks.
///
/// One dump per address family *of the managed addresses*: a dump walks
/// the whole established hash, every socket of every namespace, whatever
/// the filter, so an IPv4-only instance skips the IPv6 walk (about half
/// the cost of a look). No connection is lost by it: a socket has the
/// family of the listener it was accepted from (an IPv4 client of a
/// dual-stack `[::]` listener is an `AF_INET6` socket with a mapped
/// address), and reuseport groups, migration and the bridges never mix
/// families.
pub fn sockets(managed: &[SocketAddr], query: Query) -> Result<Vec<Connection>, DiscoveryError> {
    let mut found = Vec::new();
    let mut ports: Vec<u16> = managed.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    for (family, wanted) in [
        (libc::AF_INET as u8, managed.iter().any(SocketAddr::is_ipv4)),
        (
            libc::AF_INET6 as u8,
            managed.iter().any(SocketAddr::is_ipv6),
        ),
    ] {
        if wanted {
            dump(family, &ports, query, &mut found)?;
        }
    }
    Ok(found)
}

/// The filter program: dumped iff the local port is one of `ports`. Per
/// port P, 20 bytes: `S_GE P`, `S_LE P` (each with P in the next word),
/// then `JMP` to the end; a failed comparison goes on to the next port's
/// test, or past the end after the last. `JMP` always takes its `no`
/// jump (16 bits: a `yes` jump is a byte); its `yes` of 4 only keeps the
/// kernel's audit, which walks the `yes` chain, going.
fn bytecode(ports: &[u16]) -> Vec<u8> {
    const CLAUSE: usize = 20;
    let len = ports.len() * CLAUSE;
    let mut code = Vec::with_capacity(len);
    let mut op = |kind: u8, yes: u8, no: usize| {
        code.push(kind);
        code.push(yes);
        code.extend_from_slice(&(no as u16).to_ne_bytes());
    };
    for (i, &port) in ports.iter().enumerate() {
        let at = i * CLAUSE;
        // Where a failed comparison goes, from the clause's start.
        let next = if i + 1 == ports.len() {
            len + 4 - at
        } else {
            CLAUSE
        };
        op(INET_DIAG_BC_S_GE, 8, next);
        op(INET_DIAG_BC_NOP, 0, usize::from(port));
        op(INET_DIAG_BC_S_LE, 8, next - 8);
        op(INET_DIAG_BC_NOP, 0, usize::from(port));
        op(INET_DIAG_BC_JMP, 4, len - (at + 16));
    }
    code
}

fn dump(
    family: u8,
    ports: &[u16],
    query: Query,
    found: &mut Vec<Connection>,
) -> Result<(), DiscoveryError> {
    let netlink = |source| DiscoveryError::NetlinkError { source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(netlink)?;
    socket.bind_auto().map_err(netlink)?;
    socket.connect(&NetlinkAddr::new(0, 0)).map_err(netlink)?;
    let code = bytecode(ports);
    let total = HEADER + REQUEST + 4 + code.len();
    let mut request = Vec::with_capacity(total);
    request.extend_from_slice(&(total as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&[0; 8]); // sequence, port id
    request.push(family);
    request.push(libc::IPPROTO_TCP as u8);
    // Extensions: a bit per attribute, `1 << (INET_DIAG_INFO - 1)`.
    request.push(if query.activity {
        1 << (INET_DIAG_INFO - 1)
    } else {
        0
    });
    request.push(0);
    request.extend_from_slice(&query.states.to_ne_bytes());
    // The socket id: any, but with one port its source port, which the
    // kernel compares before it takes a socket for the bytecode and the
    // message (the clients' ends of local connections never get that far).
    let mut id = [0u8; 48];
    if let [port] = ports {
        id[..2].copy_from_slice(&port.to_be_bytes());
    }
    request.extend_from_slice(&id);
    request.extend_from_slice(&((4 + code.len()) as u16).to_ne_bytes());
    request.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    request.extend_from_slice(&code);
    socket.send(&request, 0).map_err(netlink)?;

    let mut receive = vec![0u8; 256 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0).map_err(netlink)?;
        let mut rest = &receive[..size];
        while rest.len() >= HEADER {
            let length = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if length < HEADER || length > rest.len() {
                return Err(DiscoveryError::Decode {
                    message: format!("a sock_diag answer of {length} bytes in {}", rest.len()),
                });
            }
            let message = &rest[HEADER..length];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = message
                        .get(0..4)
                        .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                    if errno == 0 {
                        return Ok(());
                    }
                    if -errno == libc::ENOENT {
                        return Err(DiscoveryError::NoTcpDiag);
                    }
                    return Err(netlink(std::io::Error::from_raw_os_error(-errno)));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(connection) = parse(message) {
                        found.push(connection);
                    }
                }
                _ => {}
            }
            rest = &rest[(length + 3) & !3..];
        }
    }
}

/// One `inet_diag_msg` and its attributes.
fn parse(message: &[u8]) -> Option<Connection> {
    let head = message.get(..MESSAGE)?;
    let family = head[0];
    let port = u16::from_be_bytes([head[4], head[5]]);
    let remote_port = u16::from_be_bytes([head[6], head[7]]);
    let address = |at: usize| -> Option<IpAddr> {
        Some(if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(
                head[at],
                head[at + 1],
                head[at + 2],
                head[at + 3],
            ))
        } else {
            let bytes: [u8; 16] = head[at..at + 16].try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(bytes))
        })
    };
    let ip = address(8)?;
    let remote = SocketAddr::new(address(24)?, remote_port);
    let cookie = u64::from_ne_bytes(head[44..52].try_into().ok()?);
    let word = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().unwrap());
    let mut cgroup_id = None;
    let mut activity = None;
    let mut attributes = &message[MESSAGE..];
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if len < 4 || len > attributes.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = Some(u64::from_ne_bytes(attributes[4..12].try_into().ok()?));
        }
        if kind == INET_DIAG_INFO && len >= 4 + TCP_INFO_MIN {
            activity = Some(tcp_activity(&attributes[4..len]));
        }
        attributes = &attributes[((len + 3) & !3).min(attributes.len())..];
    }
    Some(Connection {
        cookie,
        local: SocketAddr::new(ip, port),
        remote,
        cgroup_id,
        state: head[1],
        unread: word(56),
        unsent: word(60),
        inode: word(68),
        activity,
    })
}

/// The fields of a `tcp_info` ([`TCP_INFO_MIN`] bytes at least) that
/// settling reads.
pub(super) fn tcp_activity(info: &[u8]) -> Activity {
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().unwrap());
    let quad = |at: usize| {
        info.get(at..at + 8)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    Activity {
        last_sent_ms: word(TCPI_LAST_DATA_SENT),
        last_received_ms: word(TCPI_LAST_DATA_RECV),
        bytes_received: quad(TCPI_BYTES_RECEIVED),
        bytes_sent: quad(TCPI_BYTES_SENT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `inet_diag_bc_run` over `code` for a socket with local port `port`
    /// (net/ipv4/inet_diag.c, the ops used here).
    fn run(code: &[u8], port: u16) -> bool {
        let mut at = 0usize;
        let mut len = code.len() as isize;
        while len > 0 {
            let op = &code[at..at + 4];
            let operand = || u16::from_ne_bytes([code[at + 6], code[at + 7]]);
            let yes = match op[0] {
                INET_DIAG_BC_NOP => true,
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_GE => port >= operand(),
                INET_DIAG_BC_S_LE => port <= operand(),
                other => panic!("op {other}"),
            };
            let jump = if yes {
                usize::from(op[1])
            } else {
                usize::from(u16::from_ne_bytes([op[2], op[3]]))
            };
            at += jump;
            len -= jump as isize;
        }
        len == 0
    }

    #[test]
    fn the_filter_dumps_exactly_the_managed_ports() {
        for ports in [
            vec![8080],
            vec![80, 443, 8443],
            (1000..1300).collect::<Vec<u16>>(),
        ] {
            let code = bytecode(&ports);
            for port in [
                0, 79, 80, 81, 443, 999, 1000, 1150, 1299, 1300, 8080, 8443, 65535,
            ] {
                assert_eq!(
                    run(&code, port),
                    ports.contains(&port),
                    "{port} in {ports:?}"
                );
            }
        }
    }

    #[test]
    fn an_answer_is_read_without_its_optional_attributes() {
        let mut message = vec![0u8; MESSAGE];
        message[0] = libc::AF_INET as u8;
        message[1] = 1;
        message[4..6].copy_from_slice(&8080u16.to_be_bytes());
        message[8..12].copy_from_slice(&[127, 0, 0, 1]);
        message[44..52].copy_from_slice(&77u64.to_ne_bytes());
        let bare = parse(&message).unwrap();
        assert_eq!(
            (bare.cookie, bare.local, bare.cgroup_id),
            (77, "127.0.0.1:8080".parse().unwrap(), None)
        );
        // A 1-byte attribute (padded to 4), then the cgroup id.
        message.extend_from_slice(&[5, 0, 8, 0, 1, 0, 0, 0]);
        message.extend_from_slice(&[12, 0, 21, 0]);
        message.extend_from_slice(&4242u64.to_ne_bytes());
        assert_eq!(parse(&message).unwrap().cgroup_id, Some(4242));
    }

    #[test]
    fn queues_and_tcp_info_are_read_where_the_kernel_puts_them() {
        let mut message = vec![0u8; MESSAGE];
        message[0] = libc::AF_INET6 as u8;
        message[1] = TCP_CLOSE_WAIT;
        message[4..6].copy_from_slice(&443u16.to_be_bytes());
        message[56..60].copy_from_slice(&5u32.to_ne_bytes());
        message[60..64].copy_from_slice(&7u32.to_ne_bytes());
        message[68..72].copy_from_slice(&99u32.to_ne_bytes());
        let mut info = vec![0u8; 232];
        info[TCPI_LAST_DATA_SENT..][..4].copy_from_slice(&12u32.to_ne_bytes());
        info[TCPI_LAST_DATA_RECV..][..4].copy_from_slice(&30u32.to_ne_bytes());
        info[TCPI_BYTES_RECEIVED..][..8].copy_from_slice(&100u64.to_ne_bytes());
        info[TCPI_BYTES_SENT..][..8].copy_from_slice(&2000u64.to_ne_bytes());
        message.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        message.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        message.extend_from_slice(&info);
        let c = parse(&message).unwrap();
        assert_eq!(
            (c.state, c.unread, c.unsent, c.inode, c.local.port()),
            (TCP_CLOSE_WAIT, 5, 7, 99, 443)
        );
        assert_eq!(
            c.activity,
            Some(Activity {
                last_sent_ms: 12,
                last_received_ms: 30,
                bytes_received: 100,
                bytes_sent: 2000,
            })
        );
        // A kernel before 4.19 sends a shorter tcp_info: no bytes_sent.
        message.truncate(MESSAGE);
        message.extend_from_slice(&((4 + 192) as u16).to_ne_bytes());
        message.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        message.extend_from_slice(&info[..192]);
        assert_eq!(parse(&message).unwrap().activity.unwrap().bytes_sent, 0);
    }
}
