//! The `SK_REUSEPORT` steering program.
//!
//! Runs for every SYN that reaches a managed reuseport group and, with the
//! select-or-migrate attach type, for every queued connection of a closing
//! listener of such a group. It picks a socket of the listener's active slot
//! (or of a probe's slot) by the packet hash and returns `SK_PASS`. Whenever
//! it cannot pick one it still returns `SK_PASS` without a selection, so the
//! kernel falls back to hash selection among the group: it never drops a SYN
//! because a lookup failed (a dropped SYN costs the client a one-second
//! retransmit).
//!
//! Kernel behaviour relied on (net/core/filter.c and net/core/sock_reuseport.c,
//! v6.1):
//! - `sk_reuseport_md.sk` is a member of the group being selected from; every
//!   member has the same family, bound address and port (`bpf_sock` fields).
//! - `migrating_sk` is non-NULL only on the migrate path; there the skb may
//!   be a zero-length one the kernel allocated, so `data == data_end`.
//! - `bpf_sk_select_reuseport` fails for an empty index or a socket of
//!   another group; a closed socket's entry is already empty.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod steer {
    use core::ptr::read_volatile;

    use aya_ebpf::{
        bindings::{bpf_sock, sk_action::SK_PASS},
        macros::{map, sk_reuseport},
        maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
        programs::SkReuseportContext,
    };
    use aya_log_ebpf::debug;
    use reloader_ebpf::{
        COUNTERS_LEN, Counters, ListenerKey, ListenerState, MAX_LISTENERS, MAX_PROBES,
        MAX_SELECT_ATTEMPTS, MAX_SLOTS, NO_SLOT, ProbeKey, ProbeTarget, SOCKETS_LEN, SlotState,
        UNMANAGED_COUNTER, counter_index, socket_index,
    };

    #[map]
    static LISTENER_KEYS: HashMap<ListenerKey, u32> = HashMap::with_max_entries(MAX_LISTENERS, 0);

    #[map]
    static ACTIVE: Array<ListenerState> = Array::with_max_entries(MAX_LISTENERS, 0);

    #[map]
    static SLOT_SOCKETS: Array<SlotState> = Array::with_max_entries(MAX_LISTENERS * MAX_SLOTS, 0);

    #[map]
    static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(SOCKETS_LEN, 0);

    #[map]
    static PROBES: HashMap<ProbeKey, ProbeTarget> = HashMap::with_max_entries(MAX_PROBES, 0);

    #[map]
    static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

    #[derive(Clone, Copy)]
    enum Outcome {
        Steered,
        Migrated,
        ProbeRouted,
        Fallback,
    }

    #[sk_reuseport(migrate)]
    pub fn steer_migrate(ctx: SkReuseportContext) -> u32 {
        let migrating = ctx.migrating_sk();
        // Every field is read with its own volatile load so that each is one
        // load at a constant offset from the socket pointer: the verifier
        // rejects pointer arithmetic on PTR_TO_SOCKET, which is what LLVM
        // emits for the array field otherwise.
        // SAFETY: `sk` is a valid PTR_TO_SOCKET and `migrating_sk`, when
        // non-NULL, a valid PTR_TO_SOCK_COMMON for the whole run (5.14+).
        let key = unsafe {
            let sk = ctx.sk().sock;
            let family = read_volatile(&raw const (*sk).family);
            match &migrating {
                None => ListenerKey {
                    family,
                    port: read_volatile(&raw const (*sk).src_port),
                    addr: local_addr(sk, family),
                },
                // A request socket's next packet can arrive after its closed
                // listener was destroyed, and destruction zeroes the
                // listener's port (`__inet_put_port`). The migrating socket
                // still has the local port, and its local address is the
                // group's unless the group is bound to a wildcard.
                Some(child) => {
                    let child = child.sock;
                    let child_family = read_volatile(&raw const (*child).family);
                    let addr = if ctx.bind_inany() != 0 {
                        [0; 4]
                    } else if family == AF_INET6 && child_family == AF_INET {
                        // IPv4 request on a dual-stack listener bound to a
                        // v4-mapped address.
                        let v4 = read_volatile(&raw const (*child).src_ip4);
                        [0, 0, 0xffff_u32.to_be(), v4]
                    } else {
                        local_addr(child, family)
                    };
                    ListenerKey {
                        family,
                        port: read_volatile(&raw const (*child).src_port),
                        addr,
                    }
                }
            }
        };
        steer(&ctx, &key, migrating.is_some())
    }

    /// The bound address of `sk` as the listener key stores it.
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts field loads from.
    #[inline(always)]
    unsafe fn local_addr(sk: *mut bpf_sock, family: u32) -> [u32; 4] {
        // SAFETY: per the function contract.
        unsafe {
            if family == AF_INET {
                [read_volatile(&raw const (*sk).src_ip4), 0, 0, 0]
            } else {
                [
                    read_volatile(&raw const (*sk).src_ip6[0]),
                    read_volatile(&raw const (*sk).src_ip6[1]),
                    read_volatile(&raw const (*sk).src_ip6[2]),
                    read_volatile(&raw const (*sk).src_ip6[3]),
                ]
            }
        }
    }

    #[sk_reuseport]
    pub fn steer_select(ctx: SkReuseportContext) -> u32 {
        let Some((_, dst)) = tcp_ports(&ctx) else {
            count(UNMANAGED_COUNTER, Outcome::Fallback);
            return SK_PASS;
        };
        let key = ListenerKey {
            port: u32::from(dst),
            ..ListenerKey::default()
        };
        steer(&ctx, &key, false)
    }

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;

    #[inline(always)]
    fn steer(ctx: &SkReuseportContext, key: &ListenerKey, migrating: bool) -> u32 {
        // SAFETY: map values are plain integers; the kernel keeps them alive
        // for the duration of the program.
        let Some(&listener) = (unsafe { LISTENER_KEYS.get(key) }) else {
            count(UNMANAGED_COUNTER, Outcome::Fallback);
            return SK_PASS;
        };
        if listener >= MAX_LISTENERS {
            count(UNMANAGED_COUNTER, Outcome::Fallback);
            return SK_PASS;
        }

        let mut slot = match ACTIVE.get(listener) {
            Some(state) => state.active_slot,
            None => NO_SLOT,
        };
        let mut outcome = if migrating {
            Outcome::Migrated
        } else {
            Outcome::Steered
        };
        if !migrating && let Some((src, _)) = tcp_ports(ctx) {
            let probe = ProbeKey {
                listener,
                port: u32::from(src),
            };
            // SAFETY: as above.
            if let Some(target) = unsafe { PROBES.get(&probe) } {
                slot = target.slot;
                outcome = Outcome::ProbeRouted;
                debug!(ctx, "probe from port {} to slot {}", src, slot);
            }
        }
        if slot >= MAX_SLOTS {
            debug!(ctx, "listener {}: no active slot, kernel selects", listener);
            count(UNMANAGED_COUNTER, Outcome::Fallback);
            return SK_PASS;
        }

        let index = counter_index(listener, slot);
        let sockets = match SLOT_SOCKETS.get(index) {
            Some(state) => state.sockets,
            None => 0,
        };
        if sockets == 0 || sockets > reloader_ebpf::MAX_SOCKETS_PER_SLOT {
            debug!(
                ctx,
                "listener {} slot {}: empty, kernel selects", listener, slot
            );
            count(index, Outcome::Fallback);
            return SK_PASS;
        }

        let start = ctx.hash() % sockets;
        let mut attempt = 0;
        while attempt < MAX_SELECT_ATTEMPTS && attempt < sockets {
            let n = (start + attempt) % sockets;
            if SOCKETS
                .select_reuseport(ctx, socket_index(listener, slot, n))
                .is_ok()
            {
                debug!(
                    ctx,
                    "listener {} slot {} socket {} migrating={}",
                    listener,
                    slot,
                    n,
                    u8::from(migrating)
                );
                count(index, outcome);
                return SK_PASS;
            }
            attempt += 1;
        }
        debug!(
            ctx,
            "listener {} slot {}: no live socket, kernel selects", listener, slot
        );
        count(index, Outcome::Fallback);
        SK_PASS
    }

    /// Source and destination port of the TCP header the context points at,
    /// if the packet has one (the migrate path may pass an empty skb).
    #[inline(always)]
    fn tcp_ports(ctx: &SkReuseportContext) -> Option<(u16, u16)> {
        let data = ctx.data();
        if data + 4 > ctx.data_end() {
            return None;
        }
        // SAFETY: bounds checked against data_end just above.
        let ports = unsafe { core::ptr::read_unaligned(data as *const [u8; 4]) };
        Some((
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ))
    }

    #[inline(always)]
    fn count(index: u32, outcome: Outcome) {
        if let Some(counters) = COUNTERS.get_ptr_mut(index) {
            // SAFETY: per-CPU value, and programs of this type run with
            // preemption disabled, so nothing else writes it concurrently.
            let counters = unsafe { &mut *counters };
            match outcome {
                Outcome::Steered => counters.steered += 1,
                Outcome::Migrated => counters.migrated += 1,
                Outcome::ProbeRouted => counters.probe_routed += 1,
                Outcome::Fallback => counters.fallback += 1,
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
