//! The listener keys the program computes for a reuseport group.

use std::net::SocketAddr;

use reloader_ebpf::ListenerKey;

use super::{ListenerSpec, Mode};

/// The key the program computes for a group bound to `addr`.
pub fn listener_key(mode: Mode, spec: &ListenerSpec) -> ListenerKey {
    let (addr, protocol) = (spec.addr, spec.transport.protocol());
    match mode {
        Mode::SelectOnly => ListenerKey {
            protocol,
            port: u32::from(addr.port()),
            ..ListenerKey::default()
        },
        Mode::SelectOrMigrate => {
            let (family, addr_words) = match addr {
                SocketAddr::V4(v4) => (
                    libc::AF_INET as u32,
                    [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
                ),
                SocketAddr::V6(v6) => {
                    let o = v6.ip().octets();
                    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    (libc::AF_INET6 as u32, [word(0), word(4), word(8), word(12)])
                }
            };
            ListenerKey {
                family,
                protocol,
                port: u32::from(addr.port()),
                addr: addr_words,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::steering::Transport;

    fn tcp(addr: &str) -> ListenerSpec {
        addr.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn tcp_and_udp_on_one_port_are_different_listeners() {
        let addr: SocketAddr = "0.0.0.0:443".parse().unwrap();
        let udp = ListenerSpec {
            addr,
            transport: Transport::Udp,
            mode: crate::steering::ListenerMode::UdpFlows,
        };
        for mode in [Mode::SelectOnly, Mode::SelectOrMigrate] {
            assert_ne!(listener_key(mode, &addr.into()), listener_key(mode, &udp));
        }
    }

    #[test]
    fn select_only_keys_ignore_family_and_address() {
        let a = listener_key(Mode::SelectOnly, &tcp("127.0.0.1:8080"));
        let b = listener_key(Mode::SelectOnly, &tcp("[::1]:8080"));
        assert_eq!(a, b);
        assert_eq!(a.port, 8080);
        assert_eq!(a.family, 0);
        assert_eq!(a.protocol, libc::IPPROTO_TCP as u32);
    }

    #[test]
    fn migrate_keys_hold_address_in_kernel_byte_order() {
        let k = listener_key(Mode::SelectOrMigrate, &tcp("127.0.0.1:8080"));
        assert_eq!(k.family, libc::AF_INET as u32);
        assert_eq!(k.port, 8080);
        // The kernel stores src_ip4 as a big-endian word; read back in
        // memory order it is the octets in order.
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        let k6 = listener_key(Mode::SelectOrMigrate, &tcp("[::1]:8080"));
        assert_eq!(k6.family, libc::AF_INET6 as u32);
        assert_eq!(k6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_ne!(k, k6);
    }

    #[test]
    fn wildcard_and_loopback_are_different_listeners() {
        let any = listener_key(Mode::SelectOrMigrate, &tcp("0.0.0.0:80"));
        let lo = listener_key(Mode::SelectOrMigrate, &tcp("127.0.0.1:80"));
        assert_ne!(any, lo);
        assert_eq!(any.addr, [0; 4]);
    }
}
