//! The steering programs.
//!
//! `SK_REUSEPORT` (`steer_migrate`, `steer_select`): runs for every SYN and
//! every UDP datagram that reaches a managed reuseport group and, with the
//! select-or-migrate attach type, for every queued connection of a closing
//! listener of such a group. It picks a socket of the listener's slot — the
//! probe's slot for a registered probe port, the pinned slot of a known UDP
//! flow, otherwise the active slot or (by the packet hash, for a share of
//! new connections) the canary slot — and returns `SK_PASS`. Whenever it
//! cannot pick one it still returns `SK_PASS` without a selection, so the
//! kernel falls back to hash selection among the group: it never drops a
//! packet because a lookup failed (a dropped SYN costs the client a
//! one-second retransmit). One exception to the fallback, for TCP: when the
//! target slot has no live socket and the controller keeps a *bridge*
//! listener in the group (`BRIDGES`), the connection goes there and waits
//! until a generation listens again (the kernel's hash would pick any
//! member, and with every listener of the generation closing there may be
//! none: a closing listener's queue is then reset).
//!
//! `sock_ops` (`notify_listen`): attached to the controller's cgroup, runs
//! when a socket of a process in it starts listening; for a managed address
//! in the controller's own network namespace it writes a [`ListenEvent`] so
//! userspace registers the new socket at once. A cgroup spans network
//! namespaces (the privileged tests run many instances, each in a
//! namespace of its own, in one cgroup): the same address in another
//! namespace is another reuseport group, and its listen must not wake this
//! instance. The namespace is read with `bpf_get_netns_cookie`, which
//! `sock_ops` programs may call from Linux 5.15 (the patch
//! "bpf: Allow bpf_get_netns_cookie in BPF_PROG_TYPE_SOCK_OPS"); the
//! verifier of older kernels rejects the call, and userspace loads
//! `notify_listen_any_netns` there, which filters by address only.
//! It asks for no other callbacks: a listener's state callback
//! (`BPF_SOCK_OPS_STATE_CB_FLAG`) would run inside `tcp_set_state(listener,
//! TCP_CLOSE)`, after `__tcp_close` set the listener's `sk_shutdown` and
//! before it leaves the group, and a connection completing its handshake
//! in that window is cloned with that `sk_shutdown` and sends a FIN as
//! soon as it is established (docs/how-it-works.md, "Design notes": measured with
//! gunicorn `--max-requests`). Userspace learns of closed listeners from
//! the exits of the processes that hold them, and from the steering
//! program: a connection held on a bridge is a [`ListenEvent`] too.
//!
//! Kernel behaviour relied on (net/core/filter.c, net/core/sock_reuseport.c,
//! net/ipv4/udp.c, v6.1; verified on 6.18, docs/how-it-works.md, "Design notes"):
//! - `sk_reuseport_md.sk` is a member of the group being selected from; every
//!   member has the same family, protocol, bound address and port.
//! - `migrating_sk` is non-NULL only on the migrate path (TCP); there the skb
//!   may be a zero-length one the kernel allocated, so `data == data_end`.
//! - `data` points at the transport header, for TCP and for UDP; the remote
//!   address is read relative to the network header.
//! - `bpf_sk_select_reuseport` fails for an empty index or a socket of
//!   another group; a closed socket's entry is already empty.
//! - A UDP socket's queued datagrams are not migrated when it closes, and
//!   connected UDP sockets are matched before the group is consulted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod inject;

#[cfg(target_arch = "bpf")]
mod steer {
    use core::{
        ffi::c_void,
        mem::MaybeUninit,
        ptr::{read_volatile, write_volatile},
    };

    use aya_ebpf::{
        EbpfContext, Global,
        bindings::{BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_hdr_start_off, bpf_sock, sk_action::SK_PASS},
        helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_load_bytes_relative},
        macros::{map, sk_reuseport, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, ReusePortSockArray, RingBuf},
        programs::{SkReuseportContext, SockOpsContext},
    };
    use aya_log_ebpf::debug;
    use reloader_ebpf::{
        BRIDGE_EPOCH, Counters, Flow, FlowKey, IndexEntry, Limits, ListenEvent, ListenerHints,
        ListenerKey, ListenerState, MAX_SELECT_ATTEMPTS, Mode, NO_SLOT, ProbeKey, ProbeTarget,
        SlotState, WEIGHT_SCALE, counter_index, index_slot, index_tag, limits, socket_index,
    };

    // Sizes, set by the loader (`reloader_ebpf::global`); the maps are
    // created with matching `max_entries`.
    #[unsafe(no_mangle)]
    static LISTENERS_MAX: Global<u32> = Global::new(1);
    #[unsafe(no_mangle)]
    static SLOTS: Global<u32> = Global::new(1);
    #[unsafe(no_mangle)]
    static SOCKETS_PER_SLOT: Global<u32> = Global::new(1);
    /// The controller's network namespace (`SO_NETNS_COOKIE`), set by the
    /// loader: `notify_listen` reports listens there only.
    #[unsafe(no_mangle)]
    static NETNS_COOKIE: Global<u64> = Global::new(0);
    /// `LISTENER_INDEX`'s size − 1, set by the loader.
    #[unsafe(no_mangle)]
    static INDEX_MASK: Global<u32> = Global::new(0);

    #[map]
    static LISTENER_KEYS: HashMap<ListenerKey, u32> = HashMap::with_max_entries(1, 0);

    #[map]
    static LISTENERS: HashMap<u32, ListenerState> = HashMap::with_max_entries(1, 0);

    #[map]
    static SLOT_SOCKETS: Array<SlotState> = Array::with_max_entries(1, 0);

    #[map]
    static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(1, 0);

    #[map]
    static PROBES: HashMap<ProbeKey, ProbeTarget> =
        HashMap::with_max_entries(limits::MAX_PROBES, 0);

    #[map]
    static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1, 0);

    #[map]
    static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static LISTEN_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

    #[map]
    static BRIDGES: ReusePortSockArray = ReusePortSockArray::with_max_entries(1, 0);

    #[map]
    static BRIDGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static MIGRATED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(limits::MIGRATED, 0);

    #[map]
    static LISTENER_HINTS: Array<ListenerHints> = Array::with_max_entries(1, 0);

    #[map]
    static LISTENER_INDEX: Array<IndexEntry> = Array::with_max_entries(1, 0);

    #[derive(Clone, Copy)]
    enum Outcome {
        Steered,
        Migrated,
        ProbeRouted,
        Fallback,
        Affinity,
    }

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const IPPROTO_TCP: u32 = 6;
    const IPPROTO_UDP: u32 = 17;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;

    #[inline(always)]
    fn limits() -> Limits {
        Limits {
            listeners: LISTENERS_MAX.load(),
            slots: SLOTS.load(),
            sockets_per_slot: SOCKETS_PER_SLOT.load(),
        }
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
            let protocol = read_volatile(&raw const (*sk).protocol);
            match &migrating {
                None => ListenerKey {
                    family,
                    protocol,
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
                        protocol: IPPROTO_TCP,
                        port: read_volatile(&raw const (*child).src_port),
                        addr,
                    }
                }
            }
        };
        // The migrating connection's cookie (the one sock_diag reports for
        // it), so userspace can tell where it went. `get_socket_cookie`
        // takes any socket pointer in this program type (5.14+: the same
        // release as `migrating_sk`).
        let migrating = migrating.map(|child| {
            // SAFETY: a valid, non-NULL socket pointer (checked above).
            unsafe { bpf_get_socket_cookie(child.sock as *mut c_void) }
        });
        steer(&ctx, &key, migrating)
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
        let Some((_, dst)) = ports(&ctx) else {
            count(limits().unmanaged_counter(), Outcome::Fallback);
            return SK_PASS;
        };
        let mut key = MaybeUninit::uninit();
        let key = port_only_key(&mut key, ctx.ip_protocol(), u32::from(dst));
        steer(&ctx, key, None)
    }

    /// The key of a listener known by protocol and port only, written field
    /// by field in place: zeroing its 16-byte address as one (or copying
    /// the key) compiles to a call of a byte-wise `memset`, once per packet.
    #[inline(always)]
    fn port_only_key(key: &mut MaybeUninit<ListenerKey>, protocol: u32, port: u32) -> &ListenerKey {
        let p = key.as_mut_ptr();
        // SAFETY: every field of `key` is written before it is read.
        unsafe {
            write_volatile(&raw mut (*p).family, 0);
            write_volatile(&raw mut (*p).protocol, protocol);
            write_volatile(&raw mut (*p).port, port);
            write_volatile(&raw mut (*p).addr[0], 0);
            write_volatile(&raw mut (*p).addr[1], 0);
            write_volatile(&raw mut (*p).addr[2], 0);
            write_volatile(&raw mut (*p).addr[3], 0);
            key.assume_init_ref()
        }
    }

    /// `migrating`: the cookie of the connection being migrated, on the
    /// migrate path.
    ///
    /// The work per packet, by path (each hash map lookup and helper is a
    /// call into the kernel; array lookups are inlined by the verifier):
    /// every path finds the listener (the array `LISTENER_INDEX`, and
    /// `LISTENER_KEYS` only where that has no answer) and its hints
    /// (array); a known UDP flow then reads the remote address (helper),
    /// its flow (`FLOWS`) and selects (helper), without reading the
    /// listener's state; everything else reads the state (`LISTENERS`) and
    /// selects, and a new flow writes its entry. `PROBES` is looked at only
    /// while the listener has a probe route.
    #[inline(always)]
    fn steer(ctx: &SkReuseportContext, key: &ListenerKey, migrating: Option<u64>) -> u32 {
        let limits = limits();
        let Some(listener) = listener_of(key) else {
            count(limits.unmanaged_counter(), Outcome::Fallback);
            return SK_PASS;
        };
        if listener >= limits.listeners {
            count(limits.unmanaged_counter(), Outcome::Fallback);
            return SK_PASS;
        }
        let hints = match LISTENER_HINTS.get(listener) {
            Some(hints) => *hints,
            None => ListenerHints::default(),
        };
        let ports = if migrating.is_some() {
            None
        } else {
            ports(ctx)
        };
        // Plain values with sentinels rather than `Option`s of them: LLVM
        // may read an `Option`'s payload on a path where it is `None`, an
        // uninitialised stack slot, which verifiers before 5.12 reject.
        let mut probe = NO_SLOT;
        let mut flow = None;
        let mut pinned = Flow {
            slot: NO_SLOT,
            epoch: 0,
        };
        if let Some((src, _)) = ports {
            if hints.probes > 0 {
                let key = ProbeKey {
                    listener,
                    port: u32::from(src),
                };
                // SAFETY: as above.
                if let Some(target) = unsafe { PROBES.get(&key) } {
                    probe = target.slot;
                }
            }
            if probe == NO_SLOT && hints.mode == Mode::UdpFlows as u32 {
                flow = flow_key(ctx, listener, src);
                if let Some(key) = &flow
                    // SAFETY: as above.
                    && let Some(&known) = unsafe { FLOWS.get(key) }
                {
                    if select(ctx, &limits, listener, known.slot, Some(known.epoch)).is_some() {
                        count_slot(&limits, listener, known.slot, Outcome::Affinity);
                        return SK_PASS;
                    }
                    pinned = known;
                }
            }
        }

        // A new connection, flow or stateless datagram, a probe, or a
        // migrating connection: the listener's state decides.
        // SAFETY: as above.
        let state = match unsafe { LISTENERS.get(&listener) } {
            Some(state) => *state,
            None => ListenerState::default(),
        };
        let mut slot = state.active_slot;
        let mut outcome = if migrating.is_some() {
            Outcome::Migrated
        } else {
            Outcome::Steered
        };
        if let (true, Some((src, _))) = (probe != NO_SLOT, ports) {
            slot = probe;
            outcome = Outcome::ProbeRouted;
            debug!(ctx, "probe from port {} to slot {}", src, slot);
        } else if ports.is_some()
            && state.canary_slot < limits.slots
            && state.canary_weight > 0
            // A share of new connections and flows goes to the canary, by
            // the packet hash (bits other than those that spread it over
            // the slot's sockets), so a retransmitted SYN lands alike.
            && ctx.hash().rotate_left(16) % WEIGHT_SCALE < state.canary_weight
        {
            slot = state.canary_slot;
        }
        if slot == NO_SLOT || slot >= limits.slots {
            if bridge(ctx, key, listener, outcome) {
                record_migration(migrating, Some(BRIDGE_EPOCH));
                return SK_PASS;
            }
            debug!(ctx, "listener {}: no slot, kernel selects", listener);
            count(limits.unmanaged_counter(), Outcome::Fallback);
            return SK_PASS;
        }
        if let Some(key) = &flow {
            // A new UDP flow, or one whose slot is gone (UDP: no bridge).
            if let Some(epoch) = select(ctx, &limits, listener, slot, None) {
                count_slot(&limits, listener, slot, outcome);
                let value = Flow { slot, epoch };
                // An entry that already says so is not written again.
                if pinned != value {
                    let _ = FLOWS.insert(key, &value, 0);
                    // A volatile read after the update gives this path a
                    // tail of its own: LLVM would otherwise merge the call
                    // with `record_migration`'s into one call site, which
                    // the verifier then cannot bind to one map (it calls
                    // the generic update helper, an indirect call, there).
                    // SAFETY: a local.
                    unsafe { read_volatile(&value.slot) };
                }
                return SK_PASS;
            }
        } else if let Some(epoch) = select(ctx, &limits, listener, slot, None) {
            count_slot(&limits, listener, slot, outcome);
            record_migration(migrating, Some(epoch));
            return SK_PASS;
        }
        if bridge(ctx, key, listener, outcome) {
            record_migration(migrating, Some(BRIDGE_EPOCH));
            return SK_PASS;
        }
        debug!(
            ctx,
            "listener {} slot {}: no live socket, kernel selects", listener, slot
        );
        count_slot(&limits, listener, slot, Outcome::Fallback);
        SK_PASS
    }

    /// The listener of `key`: from its `LISTENER_INDEX` entry if that
    /// names it, else from `LISTENER_KEYS` (lib.rs, "Map layout").
    #[inline(always)]
    fn listener_of(key: &ListenerKey) -> Option<u32> {
        let tag = index_tag(key.family, key.protocol, key.port);
        if let Some(entry) = LISTENER_INDEX.get(index_slot(tag, INDEX_MASK.load())) {
            // One copy of the entry: tag and listener come from one read.
            // SAFETY: a valid map value of plain integers.
            let entry = unsafe { read_volatile(entry) };
            if entry.tag == tag {
                return Some(entry.listener);
            }
        }
        // SAFETY: map values are plain integers; the kernel keeps them alive
        // for the duration of the program.
        unsafe { LISTENER_KEYS.get(key) }.copied()
    }

    /// Remembers where a migrated connection went (`MIGRATED`). A full map
    /// forgets the least recently written record, and a lost record costs
    /// only the count of one connection in `status`.
    #[inline(always)]
    fn record_migration(cookie: Option<u64>, epoch: Option<u32>) {
        if let (Some(cookie), Some(epoch)) = (cookie, epoch) {
            let _ = MIGRATED.insert(&cookie, &epoch, 0);
        }
    }

    /// Sends a TCP connection (new or migrating, not a probe's) whose slot
    /// has no live socket to the listener's bridge, if the controller keeps
    /// one.
    #[inline(always)]
    fn bridge(
        ctx: &SkReuseportContext,
        key: &ListenerKey,
        listener: u32,
        outcome: Outcome,
    ) -> bool {
        if key.protocol != IPPROTO_TCP || matches!(outcome, Outcome::ProbeRouted) {
            return false;
        }
        if BRIDGES.select_reuseport(ctx, listener).is_err() {
            return false;
        }
        if let Some(bridged) = BRIDGED.get_ptr_mut(listener) {
            // SAFETY: per-CPU value, preemption disabled (see `count`).
            unsafe { *bridged += 1 };
        }
        // Wakes userspace: the slot's listeners closed, and what the bridge
        // holds waits for the next look. A full ring buffer loses nothing
        // that matters: one event is enough to look.
        let _ = LISTEN_EVENTS.output::<ListenEvent>(
            &ListenEvent {
                listener,
                kind: ListenEvent::BRIDGED,
            },
            0,
        );
        debug!(
            ctx,
            "listener {}: no live socket, held on the bridge", listener
        );
        true
    }

    /// Selects a live socket of (`listener`, `slot`) by the packet hash;
    /// returns the slot's epoch. With `epoch`, only if the slot still
    /// belongs to that generation (a flow pinned to a slot that another
    /// generation holds now is not its own).
    #[inline(always)]
    fn select(
        ctx: &SkReuseportContext,
        limits: &Limits,
        listener: u32,
        slot: u32,
        epoch: Option<u32>,
    ) -> Option<u32> {
        if slot >= limits.slots {
            return None;
        }
        let state = *SLOT_SOCKETS.get(counter_index(limits.slots, listener, slot))?;
        let sockets = state.sockets;
        if sockets == 0 || sockets > limits.sockets_per_slot {
            return None;
        }
        if epoch.is_some_and(|epoch| epoch != state.epoch) {
            return None;
        }
        let mut n = ctx.hash() % sockets;
        let mut attempt = 0;
        while attempt < MAX_SELECT_ATTEMPTS && attempt < sockets {
            if SOCKETS
                .select_reuseport(ctx, socket_index(limits, listener, slot, n))
                .is_ok()
            {
                return Some(state.epoch);
            }
            n += 1;
            if n == sockets {
                n = 0;
            }
            attempt += 1;
        }
        None
    }

    /// The flow of a UDP datagram: its remote address (read relative to the
    /// network header) and source port.
    #[inline(always)]
    fn flow_key(ctx: &SkReuseportContext, listener: u32, port: u16) -> Option<FlowKey> {
        if ctx.ip_protocol() != IPPROTO_UDP {
            return None;
        }
        let (offset, len) = match u16::from_be(ctx.eth_protocol() as u16) {
            ETH_P_IP => (12, 4),
            ETH_P_IPV6 => (8, 16),
            _ => return None,
        };
        // Zeroed word by word: zeroing it as one compiles to a call of a
        // byte-wise `memset`, and leaving it uninitialised lets LLVM copy
        // undefined registers on the failure path, which the verifier
        // rejects.
        // (Read only after the helper wrote it: a copy of the zeroed words
        // would be turned into that `memset` too.)
        let mut addr = MaybeUninit::<[u32; 4]>::uninit();
        let p = addr.as_mut_ptr();
        // SAFETY: every word is written before the array is read, and the
        // helper writes at most `len` bytes into it.
        let rc = unsafe {
            write_volatile(&raw mut (*p)[0], 0);
            write_volatile(&raw mut (*p)[1], 0);
            write_volatile(&raw mut (*p)[2], 0);
            write_volatile(&raw mut (*p)[3], 0);
            bpf_skb_load_bytes_relative(
                ctx.md as *const c_void,
                offset,
                p as *mut c_void,
                len,
                bpf_hdr_start_off::BPF_HDR_START_NET,
            )
        };
        (rc == 0).then_some(FlowKey {
            listener,
            port: u32::from(port),
            // SAFETY: initialised above.
            addr: unsafe { addr.assume_init() },
        })
    }

    /// Source and destination port of the TCP or UDP header the context
    /// points at, if the packet has one (the migrate path may pass an empty
    /// skb).
    #[inline(always)]
    fn ports(ctx: &SkReuseportContext) -> Option<(u16, u16)> {
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
    fn count_slot(limits: &Limits, listener: u32, slot: u32, outcome: Outcome) {
        count(counter_index(limits.slots, listener, slot), outcome);
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
                Outcome::Affinity => counters.affinity += 1,
            }
        }
    }

    #[sock_ops]
    pub fn notify_listen(ctx: SockOpsContext) -> u32 {
        if ctx.op() != BPF_SOCK_OPS_TCP_LISTEN_CB {
            return 1;
        }
        // SAFETY: the helper takes the program's own context (Linux 5.15+
        // for sock_ops; older verifiers reject the program, see above).
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if netns != NETNS_COOKIE.load() {
            return 1;
        }
        report_listen(&ctx)
    }

    /// `notify_listen` for kernels before 5.15: by address only, whatever
    /// the network namespace.
    #[sock_ops]
    pub fn notify_listen_any_netns(ctx: SockOpsContext) -> u32 {
        if ctx.op() != BPF_SOCK_OPS_TCP_LISTEN_CB {
            return 1;
        }
        report_listen(&ctx)
    }

    /// Writes a [`ListenEvent`] if the socket of `ctx` listens on a managed
    /// address.
    #[inline(always)]
    fn report_listen(ctx: &SockOpsContext) -> u32 {
        // One volatile load per field, each at a constant offset from the
        // context: the verifier rejects loads through a moved ctx pointer,
        // which is what copying the address array compiles to.
        // SAFETY: `ops` is the program's valid context for the whole run.
        let (family, port, addr) = unsafe {
            let ops = ctx.ops;
            let family = read_volatile(&raw const (*ops).family);
            let port = read_volatile(&raw const (*ops).local_port);
            let addr = match family {
                AF_INET => [read_volatile(&raw const (*ops).local_ip4), 0, 0, 0],
                AF_INET6 => [
                    read_volatile(&raw const (*ops).local_ip6[0]),
                    read_volatile(&raw const (*ops).local_ip6[1]),
                    read_volatile(&raw const (*ops).local_ip6[2]),
                    read_volatile(&raw const (*ops).local_ip6[3]),
                ],
                _ => return 1,
            };
            (family, port, addr)
        };
        let full = ListenerKey {
            family,
            protocol: IPPROTO_TCP,
            port,
            addr,
        };
        let port_only = ListenerKey {
            protocol: IPPROTO_TCP,
            port,
            ..ListenerKey::default()
        };
        // SAFETY: map values are plain integers.
        let listener = unsafe {
            match LISTENER_KEYS.get(&full) {
                Some(l) => Some(*l),
                None => LISTENER_KEYS.get(&port_only).copied(),
            }
        };
        if let Some(listener) = listener {
            let _ = LISTEN_EVENTS.output::<ListenEvent>(
                &ListenEvent {
                    listener,
                    kind: ListenEvent::LISTEN,
                },
                0,
            );
        }
        1
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
