//! The listener keys the program computes for a reuseport group.

use std::net::SocketAddr;

use reloader_ebpf::ListenerKey;

use super::Mode;

/// The key the program computes for a group bound to `addr`.
pub fn listener_key(mode: Mode, addr: SocketAddr) -> ListenerKey {
    match mode {
        Mode::SelectOnly => ListenerKey {
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
                port: u32::from(addr.port()),
                addr: addr_words,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_only_keys_ignore_family_and_address() {
        let a = listener_key(Mode::SelectOnly, "127.0.0.1:8080".parse().unwrap());
        let b = listener_key(Mode::SelectOnly, "[::1]:8080".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a.port, 8080);
        assert_eq!(a.family, 0);
    }

    #[test]
    fn migrate_keys_hold_address_in_kernel_byte_order() {
        let k = listener_key(Mode::SelectOrMigrate, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(k.family, libc::AF_INET as u32);
        assert_eq!(k.port, 8080);
        // The kernel stores src_ip4 as a big-endian word; read back in
        // memory order it is the octets in order.
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        let k6 = listener_key(Mode::SelectOrMigrate, "[::1]:8080".parse().unwrap());
        assert_eq!(k6.family, libc::AF_INET6 as u32);
        assert_eq!(k6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_ne!(k, k6);
    }

    #[test]
    fn wildcard_and_loopback_are_different_listeners() {
        let any = listener_key(Mode::SelectOrMigrate, "0.0.0.0:80".parse().unwrap());
        let lo = listener_key(Mode::SelectOrMigrate, "127.0.0.1:80".parse().unwrap());
        assert_ne!(any, lo);
        assert_eq!(any.addr, [0; 4]);
    }
}
