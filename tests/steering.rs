//! The steering program against the real kernel: each test in its own
//! network namespace, real sockets, and the program's own counters read back
//! to prove the BPF path made the decisions.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, BorrowedFd},
};

use reloader::steering::{Mode, Options, Steer, Steering};
use reloader_tests::{
    accept_all, connect, connect_with_greeting, privileged, read_line, reuseport_listener,
    reuseport_socket, wait::wait_for,
};

const N: usize = 50;

fn load() -> Steering {
    Steering::load(&Options::default()).expect("load steering program")
}

fn fds(listeners: &[&TcpListener]) -> Vec<BorrowedFd<'static>> {
    // SAFETY: the listeners outlive every use in these tests; the map does
    // not keep the descriptors.
    listeners
        .iter()
        .map(|l| unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(*l)) })
        .collect()
}

/// Two listeners of one group in slots 0 and 1, listener 0 registered.
fn two_slots(steering: &mut Steering, addr: SocketAddr) -> (TcpListener, TcpListener) {
    let a = reuseport_listener(addr);
    let b = reuseport_listener(addr);
    steering.attach(a.as_fd()).expect("attach");
    steering.add_listener(0, addr).expect("add listener");
    steering
        .set_slot_sockets(0, 0, 1, &fds(&[&a]))
        .expect("slot 0");
    steering
        .set_slot_sockets(0, 1, 1, &fds(&[&b]))
        .expect("slot 1");
    (a, b)
}

/// Loads the program and asserts it is select-or-migrate. The tests that
/// use this need it (Linux >= 5.14): on an older kernel they fail here
/// instead of passing without testing anything. The VM runner skips them
/// there and lists them as not applicable (`NEEDS_SELECT_OR_MIGRATE` in
/// xtask/src/vm.rs names each of them).
fn load_select_or_migrate() -> Steering {
    let steering = load();
    assert_eq!(
        steering.mode(),
        Mode::SelectOrMigrate,
        "this test needs the select-or-migrate program (Linux >= 5.14); this kernel only \
         accepted {}",
        steering.mode()
    );
    steering
}

#[test]
fn loads_select_or_migrate_on_this_kernel() {
    privileged();
    // On >= 5.14 a fallback would silently turn off migration, so it is a
    // failure (older kernels are expected to load select-only).
    load_select_or_migrate();
}

#[test]
fn new_connections_follow_the_active_slot() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let (a, b) = two_slots(&mut steering, addr);

    steering.set_active(0, Some(0)).unwrap();
    let _first = connect(addr, N);
    let got = accept_all(&[&a, &b], N);
    assert_eq!((got[0].len(), got[1].len()), (N, 0), "all on slot 0");

    steering.set_active(0, Some(1)).unwrap();
    let _second = connect(addr, N);
    let got = accept_all(&[&a, &b], N);
    assert_eq!((got[0].len(), got[1].len()), (0, N), "all on slot 1");

    assert_eq!(steering.counters(0, 0).unwrap().steered, N as u64);
    assert_eq!(steering.counters(0, 1).unwrap().steered, N as u64);
    assert_eq!(steering.counters(0, 0).unwrap().fallback, 0);
    assert_eq!(steering.active(0).unwrap(), Some(1));
}

/// Connections the kernel completed but the old server never accepted (the
/// clients already sent their request) move to the new listener when the old
/// one closes, and every client gets its reply.
#[test]
fn accept_queue_migrates_when_the_old_listener_closes() {
    privileged();
    let mut steering = load_select_or_migrate();
    let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let (old, new) = two_slots(&mut steering, addr);
    steering.set_active(0, Some(0)).unwrap();

    let mut clients = connect_with_greeting(addr, 20);
    // Wait until the kernel queued all of them on the old listener.
    wait_for_queue(&old, 20);

    steering.set_active(0, Some(1)).unwrap();
    drop(old);

    let mut got = accept_all(&[&new], 20).remove(0);
    assert_eq!(got.len(), 20);
    for stream in &mut got {
        let line = read_line(stream).expect("greeting arrives intact");
        assert!(line.starts_with("hello "), "unexpected data {line:?}");
        stream
            .write_all(format!("reply to {line}\n").as_bytes())
            .unwrap();
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let reply = read_line(client).unwrap_or_else(|e| panic!("client {i}: {e} (reset?)"));
        assert_eq!(reply, format!("reply to hello {i}"));
    }
    let counters = steering.counters(0, 1).unwrap();
    assert_eq!(counters.migrated, 20, "the program chose the new listener");
    assert_eq!(counters.fallback, 0);
}

/// Half-open connections migrate too. `TCP_DEFER_ACCEPT` on the old listener
/// keeps each connection a request socket after the client's bare final ACK
/// (until data arrives), which makes the kernel's "packet for a request of a
/// closed listener" path deterministic: the client's data arrives after the
/// old listener closed and the request is migrated then.
#[test]
fn half_open_requests_migrate_on_their_next_packet() {
    half_open_migration("127.0.0.1:8082", "127.0.0.1:8082");
}

/// The same through a wildcard-bound group (the program must find the
/// listener from the group's `bind_inany` flag, not the request's address).
#[test]
fn half_open_requests_migrate_through_a_wildcard_listener() {
    half_open_migration("[::]:8089", "[::1]:8089");
}

fn half_open_migration(bind: &str, target: &str) {
    privileged();
    let mut steering = load_select_or_migrate();
    let addr: SocketAddr = bind.parse().unwrap();
    let target: SocketAddr = target.parse().unwrap();
    let old_socket = reuseport_socket(addr);
    let seconds: libc::c_int = 30;
    // SAFETY: valid socket and int option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&old_socket),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_DEFER_ACCEPT");
    old_socket.listen(1024).unwrap();
    old_socket.set_nonblocking(true).unwrap();
    let old: TcpListener = old_socket.into();
    let new = reuseport_listener(addr);
    steering.attach(old.as_fd()).unwrap();
    steering.add_listener(0, addr).unwrap();
    steering.set_slot_sockets(0, 0, 1, &fds(&[&old])).unwrap();
    steering.set_slot_sockets(0, 1, 1, &fds(&[&new])).unwrap();
    steering.set_active(0, Some(0)).unwrap();

    let mut clients = connect(target, 10);
    assert_eq!(
        queue_len(&old),
        0,
        "deferred: nothing in the accept queue yet"
    );
    assert_eq!(steering.counters(0, 0).unwrap().steered, 10);

    steering.set_active(0, Some(1)).unwrap();
    drop(old);
    for (i, client) in clients.iter_mut().enumerate() {
        client.write_all(format!("hello {i}\n").as_bytes()).unwrap();
    }
    let mut got = accept_all(&[&new], 10).remove(0);
    for stream in &mut got {
        let line = read_line(stream).unwrap();
        stream
            .write_all(format!("reply to {line}\n").as_bytes())
            .unwrap();
    }
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(read_line(client).unwrap(), format!("reply to hello {i}"));
    }
    let counters = steering.counters(0, 1).unwrap();
    assert_eq!(counters.migrated, 10, "the program moved every request");
    assert_eq!(steering.unmanaged_counters().unwrap().fallback, 0);
}

#[test]
fn empty_active_slot_falls_back_to_the_kernel_instead_of_dropping() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8083".parse().unwrap();
    let (a, b) = two_slots(&mut steering, addr);
    steering.set_active(0, Some(2)).unwrap(); // slot 2 holds no socket

    // connect() would take a second per dropped SYN; a short timeout turns a
    // drop into a failure here.
    let _clients = connect(addr, N);
    let got = accept_all(&[&a, &b], N);
    assert_eq!(got[0].len() + got[1].len(), N);
    assert_eq!(steering.counters(0, 2).unwrap().fallback, N as u64);
    assert_eq!(steering.counters(0, 0).unwrap().steered, 0);
}

#[test]
fn probe_from_registered_source_port_reaches_the_candidate_slot() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8084".parse().unwrap();
    let (active, candidate) = two_slots(&mut steering, addr);
    steering.set_active(0, Some(0)).unwrap();

    let probe = reuseport_probe_socket();
    let port = probe.local_addr().unwrap().as_socket().unwrap().port();
    steering.add_probe(0, port, 1).unwrap();
    probe.connect(&addr.into()).expect("probe connects");
    let _others = connect(addr, N);

    let got = accept_all(&[&active, &candidate], N + 1);
    assert_eq!(got[1].len(), 1, "only the probe reaches the candidate");
    assert_eq!(got[0].len(), N);
    assert_eq!(
        got[1][0].peer_addr().unwrap().port(),
        port,
        "the candidate got the probe"
    );
    assert_eq!(steering.counters(0, 1).unwrap().probe_routed, 1);
    assert_eq!(steering.counters(0, 0).unwrap().steered, N as u64);

    steering.remove_probe(0, port).unwrap();
}

fn reuseport_probe_socket() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket
}

#[test]
fn a_generation_with_several_sockets_gets_connections_spread_over_all() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8085".parse().unwrap();
    let workers: Vec<TcpListener> = (0..4).map(|_| reuseport_listener(addr)).collect();
    let old = reuseport_listener(addr);
    steering.attach(old.as_fd()).unwrap();
    steering.add_listener(0, addr).unwrap();
    let refs: Vec<&TcpListener> = workers.iter().collect();
    steering.set_slot_sockets(0, 3, 1, &fds(&refs)).unwrap();
    steering.set_slot_sockets(0, 0, 1, &fds(&[&old])).unwrap();
    steering.set_active(0, Some(3)).unwrap();

    let total = 200;
    let _clients = connect(addr, total);
    let mut all = refs.clone();
    all.push(&old);
    let got = accept_all(&all, total);
    assert_eq!(got[4].len(), 0, "nothing to the inactive generation");
    for (i, worker) in got[..4].iter().enumerate() {
        // 200 hashed connections over 4 sockets: an empty one would mean
        // the hash spread is broken (chance of that at random: ~1e-24).
        assert!(!worker.is_empty(), "worker {i} got no connection");
    }
    assert_eq!(steering.counters(0, 3).unwrap().steered, total as u64);
}

#[test]
fn several_listeners_have_independent_active_slots() {
    privileged();
    let mut steering = load();
    independent_active_slots(
        &mut steering,
        &[
            "127.0.0.1:9001",
            "[::1]:9002",
            "127.0.0.1:9003",
            "[::1]:9004",
        ],
    );
}

/// Same port, both families: two groups the program must tell apart by
/// address, which only the select-or-migrate program can (it reads the
/// listener's address from `sk_reuseport_md.sk`, Linux >= 5.14; select-only
/// keys listeners by port).
#[test]
fn one_port_in_both_families_is_two_listeners() {
    privileged();
    let mut steering = load_select_or_migrate();
    independent_active_slots(&mut steering, &["127.0.0.1:9003", "[::1]:9003"]);
}

/// Same port and family, two addresses: one `LISTENER_INDEX` tag for two
/// listeners, so the program finds them through `LISTENER_KEYS` (the
/// other tests' listeners each have an index entry of their own).
#[test]
fn one_port_on_two_addresses_is_two_listeners() {
    privileged();
    let mut steering = load_select_or_migrate();
    independent_active_slots(&mut steering, &["127.0.0.1:9005", "127.0.0.2:9005"]);
}

/// Registers two listeners per address, makes even ones active on slot 0
/// and odd ones on slot 1, and checks each address's connections follow.
fn independent_active_slots(steering: &mut Steering, addrs: &[&str]) {
    let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    let mut pairs = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let i = i as u32;
        let a = reuseport_listener(*addr);
        let b = reuseport_listener(*addr);
        steering.attach(a.as_fd()).unwrap();
        steering.add_listener(i, *addr).unwrap();
        steering.set_slot_sockets(i, 0, 1, &fds(&[&a])).unwrap();
        steering.set_slot_sockets(i, 1, 1, &fds(&[&b])).unwrap();
        steering.set_active(i, Some(i % 2)).unwrap();
        pairs.push((a, b));
    }
    for (i, (addr, (a, b))) in addrs.iter().zip(&pairs).enumerate() {
        let _clients = connect(*addr, 20);
        let got = accept_all(&[a, b], 20);
        let expected = if i % 2 == 0 { (20, 0) } else { (0, 20) };
        assert_eq!(
            (got[0].len(), got[1].len()),
            expected,
            "listener {i} ({addr})"
        );
        let counters = steering.counters(i as u32, i as u32 % 2).unwrap();
        assert_eq!(counters.steered, 20, "listener {i} counters");
    }
}

#[test]
fn forced_select_only_still_steers_new_connections() {
    privileged();
    let mut steering = Steering::load(&Options {
        force_select_only: true,
        ..Options::default()
    })
    .unwrap();
    assert_eq!(steering.mode(), Mode::SelectOnly);
    let addr: SocketAddr = "127.0.0.1:8086".parse().unwrap();
    let (a, b) = two_slots(&mut steering, addr);
    steering.set_active(0, Some(1)).unwrap();
    let _clients = connect(addr, N);
    let got = accept_all(&[&a, &b], N);
    assert_eq!((got[0].len(), got[1].len()), (0, N));
    assert_eq!(steering.counters(0, 1).unwrap().steered, N as u64);

    // Port-only keys cannot tell two addresses on one port apart: refused.
    let err = steering
        .add_listener(1, "[::1]:8086".parse::<SocketAddr>().unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("port only"), "{err}");
}

#[test]
fn a_socket_without_reuseport_is_refused_with_the_fix() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8087".parse().unwrap();
    steering.add_listener(0, addr).unwrap();
    let plain = TcpListener::bind(addr).unwrap();
    let err = steering
        .set_slot_sockets(0, 0, 1, &fds(&[&plain]))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("SO_REUSEPORT"), "{text}");
    assert!(text.contains("reuseport"), "names the nginx fix: {text}");
}

#[test]
fn detach_returns_the_group_to_kernel_selection() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:8088".parse().unwrap();
    let (a, b) = two_slots(&mut steering, addr);
    steering.set_active(0, Some(0)).unwrap();
    Steering::detach(a.as_fd()).unwrap();
    let _clients = connect(addr, 100);
    let got = accept_all(&[&a, &b], 100);
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "hash selection uses both: {} / {}",
        got[0].len(),
        got[1].len()
    );
    assert_eq!(
        steering.counters(0, 0).unwrap().steered,
        0,
        "program no longer ran"
    );
}

fn queue_len(listener: &TcpListener) -> u32 {
    // TCP_INFO on a listener reports the accept queue length in
    // tcpi_unacked (net/ipv4/tcp.c, tcp_get_info).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd and buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO");
    info.tcpi_unacked
}

fn wait_for_queue(listener: &TcpListener, n: u32) {
    wait_for(
        format!("{n} connections in the accept queue"),
        std::time::Duration::from_secs(5),
        || match queue_len(listener) {
            queued if queued >= n => Ok(()),
            queued => Err(format!("{queued} queued")),
        },
    );
}

// ---- UDP.

/// A bound UDP socket with `SO_REUSEPORT` (a server's) on `addr`.
fn udp_member(addr: SocketAddr) -> std::net::UdpSocket {
    let socket = reloader::net::udp_socket(addr, true).expect("bind udp");
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    socket
}

fn udp_fd(socket: &std::net::UdpSocket) -> BorrowedFd<'static> {
    // SAFETY: the sockets outlive every use in these tests.
    unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(socket)) }
}

/// Which of `members` received `payload` (each drained of datagrams).
fn received_by(members: &[&std::net::UdpSocket], payload: &[u8]) -> Vec<usize> {
    let mut got = Vec::new();
    for (i, member) in members.iter().enumerate() {
        member
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = member.recv(&mut buf) {
            if &buf[..n] == payload {
                got.push(i);
            }
        }
    }
    got
}

/// Flow affinity: a flow (remote address and port) stays with the slot that
/// got its first datagram while that slot holds its socket, new flows go to
/// the active slot, and when the pinned socket closes the flow falls
/// through to the active slot. The program's own counters say which path.
#[test]
fn udp_flows_stay_with_their_generation_and_new_ones_go_to_the_active_one() {
    privileged();
    let mut steering = Steering::load(&Options {
        udp_flows: 64,
        ..Options::default()
    })
    .expect("load steering program");
    let addr: SocketAddr = "127.0.0.1:5301".parse().unwrap();
    let old = udp_member(addr);
    let new = udp_member(addr);
    steering.attach(old.as_fd()).expect("attach to a UDP group");
    steering
        .add_listener(0, reloader::steering::ListenerSpec::udp(addr, false))
        .unwrap();
    steering.set_slot_sockets(0, 0, 1, &[udp_fd(&old)]).unwrap();
    steering.set_slot_sockets(0, 1, 2, &[udp_fd(&new)]).unwrap();
    steering.set_active(0, Some(0)).unwrap();

    let flow_a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..5 {
        flow_a.send_to(format!("a{i}").as_bytes(), addr).unwrap();
    }
    assert_eq!(received_by(&[&old, &new], b"a4"), vec![0]);

    // Cutover: flow A stays with the old slot, a new flow goes to the new.
    steering.set_active(0, Some(1)).unwrap();
    let flow_b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..5 {
        flow_a
            .send_to(format!("a-after{i}").as_bytes(), addr)
            .unwrap();
        flow_b.send_to(format!("b{i}").as_bytes(), addr).unwrap();
    }
    assert_eq!(received_by(&[&old, &new], b"a-after4"), vec![0], "affinity");
    // (received_by drained both: check b's last datagram went to the new)
    flow_b.send_to(b"b-last", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"b-last"), vec![1]);
    let old_counters = steering.counters(0, 0).unwrap();
    assert!(old_counters.affinity >= 9, "{old_counters:?}");
    assert_eq!(old_counters.steered, 1, "one new flow pinned to slot 0");

    // The old generation's socket closes: flow A falls through to the
    // active slot (and is pinned there).
    drop(old);
    flow_a.send_to(b"a-moved", addr).unwrap();
    assert_eq!(received_by(&[&new], b"a-moved"), vec![0]);
    let flows = steering.flows(0).unwrap();
    assert_eq!(
        flows.get(&1),
        Some(&2),
        "flows A and B on slot 1: {flows:?}"
    );
}

/// A full flow table forgets the least recently used flow: its next
/// datagram goes to the active slot (and is pinned there anew).
#[test]
fn a_full_flow_table_forgets_the_oldest_flow() {
    privileged();
    let mut steering = load();
    assert_eq!(
        steering.flow_capacity(),
        1,
        "the default table holds one flow"
    );
    let addr: SocketAddr = "127.0.0.1:5304".parse().unwrap();
    let old = udp_member(addr);
    let new = udp_member(addr);
    steering.attach(old.as_fd()).unwrap();
    steering
        .add_listener(0, reloader::steering::ListenerSpec::udp(addr, false))
        .unwrap();
    steering.set_slot_sockets(0, 0, 1, &[udp_fd(&old)]).unwrap();
    steering.set_slot_sockets(0, 1, 2, &[udp_fd(&new)]).unwrap();
    steering.set_active(0, Some(0)).unwrap();
    let flow_a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    flow_a.send_to(b"a", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"a"), vec![0]);
    steering.set_active(0, Some(1)).unwrap();
    let flow_b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    flow_b.send_to(b"b", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"b"), vec![1]);
    // B took the only entry: A is forgotten and lands on the active slot.
    flow_a.send_to(b"a2", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"a2"), vec![1]);
}

/// A stateless UDP listener (DNS): every datagram goes to the active slot,
/// whatever flow it belongs to, and the flow table stays empty.
#[test]
fn stateless_udp_listeners_send_every_datagram_to_the_active_slot() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:5302".parse().unwrap();
    let old = udp_member(addr);
    let new = udp_member(addr);
    steering.attach(old.as_fd()).unwrap();
    steering
        .add_listener(0, reloader::steering::ListenerSpec::udp(addr, true))
        .unwrap();
    steering.set_slot_sockets(0, 0, 1, &[udp_fd(&old)]).unwrap();
    steering.set_slot_sockets(0, 1, 2, &[udp_fd(&new)]).unwrap();
    steering.set_active(0, Some(0)).unwrap();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"q1", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"q1"), vec![0]);
    steering.set_active(0, Some(1)).unwrap();
    client.send_to(b"q2", addr).unwrap();
    assert_eq!(received_by(&[&old, &new], b"q2"), vec![1], "no affinity");
    assert!(steering.flows(0).unwrap().is_empty());
    assert_eq!(steering.counters(0, 1).unwrap().steered, 1);
}

/// TCP and UDP on one port are two groups the program tells apart (HTTP/1
/// and HTTP/2 on TCP 443, HTTP/3 on UDP 443).
#[test]
fn tcp_and_udp_on_one_port_are_steered_independently() {
    privileged();
    let mut steering = load();
    let addr: SocketAddr = "127.0.0.1:5303".parse().unwrap();
    let (tcp_old, tcp_new) = (reuseport_listener(addr), reuseport_listener(addr));
    let (udp_old, udp_new) = (udp_member(addr), udp_member(addr));
    steering.attach(tcp_old.as_fd()).unwrap();
    steering.attach(udp_old.as_fd()).unwrap();
    steering.add_listener(0, addr).unwrap();
    steering
        .add_listener(1, reloader::steering::ListenerSpec::udp(addr, true))
        .unwrap();
    steering
        .set_slot_sockets(0, 0, 1, &fds(&[&tcp_old]))
        .unwrap();
    steering
        .set_slot_sockets(0, 1, 2, &fds(&[&tcp_new]))
        .unwrap();
    steering
        .set_slot_sockets(1, 0, 1, &[udp_fd(&udp_old)])
        .unwrap();
    steering
        .set_slot_sockets(1, 1, 2, &[udp_fd(&udp_new)])
        .unwrap();
    // TCP on the new slot, UDP still on the old one.
    steering.set_active(0, Some(1)).unwrap();
    steering.set_active(1, Some(0)).unwrap();
    let _clients = connect(addr, 10);
    let got = accept_all(&[&tcp_old, &tcp_new], 10);
    assert_eq!((got[0].len(), got[1].len()), (0, 10));
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"udp", addr).unwrap();
    assert_eq!(received_by(&[&udp_old, &udp_new], b"udp"), vec![0]);
}
