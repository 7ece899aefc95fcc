//! The listener keys the program computes for a reuseport group, and the
//! `LISTENER_INDEX` cache of them.

use std::net::SocketAddr;

use reloader_ebpf::{IndexEntry, ListenerKey, index_slot, index_tag};

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

/// What `LISTENER_INDEX` (`entries` long, a power of two) should hold for
/// `listeners` (index and key): at each entry the one listener whose tag
/// lands there, if exactly one does and no other listener has its tag;
/// empty where none or several do (the program then asks `LISTENER_KEYS`).
pub fn index_table(
    entries: u32,
    listeners: impl IntoIterator<Item = (u32, ListenerKey)>,
) -> Vec<IndexEntry> {
    debug_assert!(entries.is_power_of_two());
    let mask = entries - 1;
    // Per entry: the tag and listener seen there, or a conflict.
    let mut seen: Vec<Option<Result<IndexEntry, ()>>> = vec![None; entries as usize];
    for (listener, key) in listeners {
        let tag = index_tag(key.family, key.protocol, key.port);
        let at = &mut seen[index_slot(tag, mask) as usize];
        *at = match at {
            None => Some(Ok(IndexEntry { tag, listener })),
            Some(_) => Some(Err(())),
        };
    }
    seen.into_iter()
        .map(|entry| match entry {
            Some(Ok(entry)) => entry,
            _ => IndexEntry::default(),
        })
        .collect()
}

/// The writes that turn `LISTENER_INDEX` from `from` into `to`, `(index,
/// value)` in order, such that a program reading an entry during a write
/// never pairs a tag with a listener it does not belong to, even if the
/// kernel's copy of the value is not atomic: each write changes the tag or
/// the listener, never both, and changes the listener only while the tag
/// is empty ([`IndexEntry`]).
pub fn index_writes(from: &[IndexEntry], to: &[IndexEntry]) -> Vec<(u32, IndexEntry)> {
    let mut writes = Vec::new();
    for (i, (&old, &new)) in from.iter().zip(to).enumerate() {
        let i = i as u32;
        let mut now = old;
        let mut write = |value: IndexEntry, now: &mut IndexEntry| {
            if *now != value {
                writes.push((i, value));
                *now = value;
            }
        };
        if now.listener != new.listener || new.tag == 0 {
            write(IndexEntry { tag: 0, ..now }, &mut now);
            write(
                IndexEntry {
                    tag: 0,
                    listener: new.listener,
                },
                &mut now,
            );
        }
        write(new, &mut now);
    }
    writes
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

    fn key(mode: Mode, addr: &str) -> ListenerKey {
        listener_key(mode, &tcp(addr))
    }

    fn slot_of(k: &ListenerKey, entries: u32) -> usize {
        index_slot(index_tag(k.family, k.protocol, k.port), entries - 1) as usize
    }

    #[test]
    fn listeners_with_an_entry_of_their_own_are_in_the_index() {
        let mode = Mode::SelectOrMigrate;
        let udp = |addr: &str| {
            listener_key(
                mode,
                &ListenerSpec {
                    addr: addr.parse().unwrap(),
                    transport: Transport::Udp,
                    mode: crate::steering::ListenerMode::UdpStateless,
                },
            )
        };
        // What a web server and a DNS server typically listen on: one entry
        // each at the smallest size.
        let keys = [
            (0, key(mode, "0.0.0.0:443")),
            (1, key(mode, "[::]:443")),
            (2, udp("0.0.0.0:443")),
            (3, key(mode, "0.0.0.0:80")),
            (4, udp("127.0.0.1:53")),
        ];
        let table = index_table(16, keys);
        for (listener, k) in keys {
            let entry = table[slot_of(&k, 16)];
            assert_eq!(entry.listener, listener, "{k:?}");
            assert_eq!(entry.tag, index_tag(k.family, k.protocol, k.port));
        }
        assert_eq!(table.iter().filter(|e| e.tag != 0).count(), keys.len());
    }

    #[test]
    fn listeners_that_share_an_entry_are_left_to_the_hash_map() {
        let mode = Mode::SelectOrMigrate;
        // Same port, two addresses: one tag, two listeners.
        let same_tag = index_table(
            16,
            [
                (0, key(mode, "127.0.0.1:80")),
                (1, key(mode, "127.0.0.2:80")),
            ],
        );
        assert!(same_tag.iter().all(|e| e.tag == 0));
        // Two ports whose tags land on one entry of 16 (found, not assumed).
        let a = key(mode, "0.0.0.0:80");
        let b = (81..)
            .map(|port| key(mode, &format!("0.0.0.0:{port}")))
            .find(|b| slot_of(b, 16) == slot_of(&a, 16))
            .unwrap();
        let third = (81..)
            .map(|port| key(mode, &format!("0.0.0.0:{port}")))
            .find(|c| slot_of(c, 16) != slot_of(&a, 16))
            .unwrap();
        let collide = index_table(16, [(0, a), (1, b), (2, third)]);
        assert_eq!(collide[slot_of(&a, 16)], IndexEntry::default());
        assert_eq!(collide[slot_of(&third, 16)].listener, 2);
        assert_eq!(collide.iter().filter(|e| e.tag != 0).count(), 1);
    }

    /// Each write changes the tag or the listener, never both, and the
    /// listener only while the tag is empty: then even a torn copy shows a
    /// tag only with the listener it had before or has after the write.
    #[test]
    fn index_writes_never_pair_a_tag_with_another_listener() {
        let mode = Mode::SelectOrMigrate;
        let a = key(mode, "0.0.0.0:80");
        let b = key(mode, "0.0.0.0:443");
        let tables = [
            index_table(16, []),
            index_table(16, [(0, a)]),
            index_table(16, [(1, a)]),
            index_table(16, [(0, a), (1, b)]),
            index_table(16, [(1, a), (0, b)]),
            index_table(16, [(2, b)]),
        ];
        for from in &tables {
            for to in &tables {
                let mut now = from.clone();
                for (i, value) in index_writes(from, to) {
                    let old = now[i as usize];
                    assert_ne!(old, value, "a write that changes nothing");
                    let tag_changes = old.tag != value.tag;
                    let listener_changes = old.listener != value.listener;
                    assert!(
                        !(tag_changes && listener_changes),
                        "{old:?} -> {value:?} changes both"
                    );
                    if listener_changes {
                        assert_eq!((old.tag, value.tag), (0, 0), "{old:?} -> {value:?}");
                    }
                    now[i as usize] = value;
                }
                assert_eq!(&now, to);
            }
        }
    }
}
