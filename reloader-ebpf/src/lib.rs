//! Types and constants shared by the steering programs (built for
//! `bpfel-unknown-none` from `src/main.rs`) and their userspace owner
//! (`reloader::steering`).
//!
//! Every map value is `#[repr(C)]` with explicit padding and no implicit
//! holes: the verifier rejects reads of uninitialised stack bytes, and
//! userspace must never hand the kernel bytes it did not set.
//!
//! # Map layout
//!
//! A *listener* is one managed address of one protocol (one reuseport
//! group); it gets an index `0..listeners`. Each listener has `slots`
//! *slots*; a generation of the server occupies one slot per listener while
//! it is alive. A slot holds up to `sockets_per_slot` sockets (one per nginx
//! worker, one per Envoy worker thread, ...), spread over by the packet hash.
//! The three sizes are set at load time from the instance's configuration
//! ([`Limits`], globals of the object, and each map's `max_entries`), so
//! memory grows with what is configured, not with the maximum.
//!
//! - [`map::LISTENER_KEYS`]: `ListenerKey -> u32` listener index.
//! - [`map::LISTENERS`]: `listener -> ListenerState`: the active slot, an
//!   optional canary slot with its share, and the listener's [`Mode`]. A
//!   hash map: an update replaces the whole value at once, so the program
//!   never sees half of a cutover or of a weight change.
//! - [`map::SLOT_SOCKETS`]: `listener * slots + slot -> SlotState`: how many
//!   sockets of the slot are populated in `SOCKETS`, and the generation
//!   (epoch) that holds the slot.
//! - [`map::SOCKETS`]: `REUSEPORT_SOCKARRAY`, index from [`socket_index`].
//! - [`map::PROBES`]: `ProbeKey -> ProbeTarget` routes a packet from a
//!   registered client source port to a chosen slot (readiness and health
//!   probes of one generation).
//! - [`map::FLOWS`]: LRU `FlowKey -> Flow`: the slot (and epoch) a UDP flow
//!   (remote address and port) is pinned to, written by the program itself.
//! - [`map::LISTENER_HINTS`]: `listener -> ListenerHints`: what the
//!   program may skip per packet: how many probe routes `PROBES` holds for
//!   the listener (none: no `PROBES` lookup), and the listener's [`Mode`]
//!   (a known UDP flow goes to its slot without reading `LISTENERS`). An
//!   array, so reading it costs no call into the kernel's hash map code.
//! - [`map::LISTENER_INDEX`]: a direct-mapped cache of `LISTENER_KEYS` in
//!   an array ([`IndexEntry`], index [`index_slot`]): the listener of a
//!   (family, protocol, port) that only one listener has and that shares
//!   its entry with no other. The program reads it first and looks in
//!   `LISTENER_KEYS` (a call into the kernel's hash map code, about 45 ns
//!   a packet on the benchmark machine) only when the entry's tag does not
//!   match; an empty or ambiguous entry is therefore always correct.
//! - [`map::COUNTERS`]: per-CPU `Counters`, index from [`counter_index`],
//!   plus one trailing entry for packets of groups that are not managed.
//! - [`map::LISTEN_EVENTS`]: a ring buffer of [`ListenEvent`]s: the
//!   `sock_ops` program writes one when a socket starts listening on a
//!   managed address in the controller's network namespace, the steering program one when it holds a connection
//!   on a bridge (the target slot has no live socket: its listeners
//!   closed). Userspace looks at the managed addresses at either.
//! - [`map::BRIDGES`]: `REUSEPORT_SOCKARRAY`, index listener: the
//!   controller's own listener in the group (TCP, select-or-migrate), which
//!   holds new and migrating connections while the target slot has no live
//!   socket (every listener of the generation closed at once, a crash
//!   before its restart); the controller closes and replaces it once a
//!   generation listens again, and its queue migrates there.
//! - [`map::BRIDGED`]: per-CPU `u64`, index listener: connections the
//!   program sent to the bridge.
//! - [`map::MIGRATED`]: LRU `u64 -> u32`: the socket cookie of each
//!   connection the program migrated (a closing listener's queue, or the
//!   bridge's) and the epoch of the slot it went to ([`BRIDGE_EPOCH`] for
//!   the bridge). An accepted socket keeps the cgroup of the listener that
//!   completed its handshake, so a migrated one is counted by this record,
//!   not by its cgroup (`reloader::holdings`).
//!
//! `BRIDGES` and `BRIDGED` are never pinned: a bridge lives as long as the
//! controller that made it.
#![no_std]

/// Default and largest sizes (userspace validates configurations against
/// them; the object's own maps are sized at load time).
pub mod limits {
    /// Managed addresses one instance may have.
    pub const MAX_LISTENERS: u32 = 1024;
    /// Generation slots per listener.
    pub const MAX_SLOTS: u32 = 32;
    /// Listening sockets one generation may hold for one address.
    pub const MAX_SOCKETS_PER_SLOT: u32 = 1024;
    /// Concurrent probe routes.
    pub const MAX_PROBES: u32 = 256;
    /// Migrated connections remembered (least recently written forgotten
    /// first; userspace forgets those that closed whenever it counts).
    pub const MIGRATED: u32 = 16_384;
}

/// The epoch `MIGRATED` records for a connection migrated to a bridge.
pub const BRIDGE_EPOCH: u32 = u32::MAX;

/// How many populated entries of a slot the program tries before it gives
/// up and lets the kernel choose (entries vanish when their socket closes).
pub const MAX_SELECT_ATTEMPTS: u32 = 8;
/// `ListenerState::active_slot` / `canary_slot` when there is none.
pub const NO_SLOT: u32 = u32::MAX;
/// `ListenerState::canary_weight` is in parts of this.
pub const WEIGHT_SCALE: u32 = 10_000;

/// The sizes of one loaded object (its globals `LISTENERS`, `SLOTS` and
/// `SOCKETS_PER_SLOT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub listeners: u32,
    pub slots: u32,
    pub sockets_per_slot: u32,
}

impl Limits {
    /// Entries of `SLOT_SOCKETS` (and of `COUNTERS`, minus one).
    pub const fn slot_entries(&self) -> u32 {
        self.listeners * self.slots
    }

    /// Entries of `SOCKETS`.
    pub const fn socket_entries(&self) -> u32 {
        self.listeners * self.slots * self.sockets_per_slot
    }

    /// Entries of `LISTENER_INDEX`: a power of two with room for eight
    /// times the listeners (few collisions), at least 16.
    pub const fn index_entries(&self) -> u32 {
        let wanted = self.listeners.saturating_mul(8);
        if wanted <= 16 {
            16
        } else {
            wanted.next_power_of_two()
        }
    }

    /// Entries of `COUNTERS`: one per (listener, slot), plus the unmanaged
    /// entry.
    pub const fn counter_entries(&self) -> u32 {
        self.slot_entries() + 1
    }

    /// The `COUNTERS` entry for packets whose group is not managed.
    pub const fn unmanaged_counter(&self) -> u32 {
        self.slot_entries()
    }
}

/// Names of the maps and programs in the object; userspace looks them up by
/// these constants only.
pub mod map {
    pub const LISTENER_KEYS: &str = "LISTENER_KEYS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const SLOT_SOCKETS: &str = "SLOT_SOCKETS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const PROBES: &str = "PROBES";
    pub const FLOWS: &str = "FLOWS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const LISTEN_EVENTS: &str = "LISTEN_EVENTS";
    pub const BRIDGES: &str = "BRIDGES";
    pub const BRIDGED: &str = "BRIDGED";
    pub const MIGRATED: &str = "MIGRATED";
    /// `--inject-reuseport`: the addresses whose binds get `SO_REUSEPORT`
    /// (not pinned: each controller fills its own, and the bind programs
    /// it attached keep it alive after it exits).
    pub const INJECT_KEYS: &str = "INJECT_KEYS";
    /// `--inject-reuseport`: per-CPU counters, [`crate::INJECTED`] and
    /// [`crate::INJECT_FAILED`].
    pub const INJECTED: &str = "INJECTED";
    pub const LISTENER_HINTS: &str = "LISTENER_HINTS";
    pub const LISTENER_INDEX: &str = "LISTENER_INDEX";
}

/// Globals of the object, set at load time.
pub mod global {
    pub const LISTENERS: &str = "LISTENERS_MAX";
    pub const SLOTS: &str = "SLOTS";
    pub const SOCKETS_PER_SLOT: &str = "SOCKETS_PER_SLOT";
    /// `u64`: the controller's network namespace cookie (`SO_NETNS_COOKIE`);
    /// the listen notifier reports listens in that namespace only.
    pub const NETNS_COOKIE: &str = "NETNS_COOKIE";
    /// `u32`: [`crate::Limits::index_entries`] − 1.
    pub const INDEX_MASK: &str = "INDEX_MASK";
}

/// Program names in the object.
pub mod program {
    /// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux ≥ 5.14): also runs when a
    /// listener closes, to move its queued connections.
    pub const SELECT_OR_MIGRATE: &str = "steer_migrate";
    /// `BPF_SK_REUSEPORT_SELECT` for older kernels: steers new connections
    /// and datagrams only, and identifies a listener by protocol and port
    /// alone (the context has no socket pointer before 5.14).
    pub const SELECT: &str = "steer_select";
    /// `sock_ops` on the controller's cgroup: tells userspace at once when
    /// a socket starts listening on a managed address in the controller's
    /// network namespace (Linux >= 5.15: `bpf_get_netns_cookie` in
    /// `sock_ops`).
    pub const NOTIFY_LISTEN: &str = "notify_listen";
    /// [`NOTIFY_LISTEN`] for older kernels: by address only, so a listen on
    /// the same address in another network namespace of the cgroup reports
    /// too.
    pub const NOTIFY_LISTEN_ANY_NETNS: &str = "notify_listen_any_netns";
    /// `cgroup/bind4` on each generation's cgroup (`--inject-reuseport`):
    /// sets `SO_REUSEPORT` on an IPv4 socket bound to a managed address.
    pub const INJECT_BIND4: &str = "inject_bind4";
    /// `cgroup/bind6`: the same for IPv6 sockets (also those bound to an
    /// IPv4-mapped address).
    pub const INJECT_BIND6: &str = "inject_bind6";
}

/// Index in `INJECTED`: binds that got `SO_REUSEPORT`.
pub const INJECTED: u32 = 0;
/// Index in `INJECTED`: binds to a managed address where
/// `bpf_setsockopt(SO_REUSEPORT)` failed (the bind goes on without it).
pub const INJECT_FAILED: u32 = 1;

/// How a listener steers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// TCP: new connections to the active slot; queued ones of closing
    /// listeners migrate there.
    #[default]
    Tcp = 0,
    /// UDP, every datagram to the active slot (DNS-like: no state).
    UdpStateless = 1,
    /// UDP, datagrams of a flow (remote address and port) stay with the
    /// slot that got its first datagram while that slot's generation holds
    /// its sockets; new flows go to the active slot (QUIC-like).
    UdpFlows = 2,
}

impl Mode {
    pub const fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::UdpStateless,
            2 => Self::UdpFlows,
            _ => Self::Tcp,
        }
    }
}

/// Identifies a reuseport group from inside the program.
///
/// The select-or-migrate program reads it from the group's socket
/// (`sk_reuseport_md.sk`, Linux ≥ 5.14): family, protocol, bound address
/// and port. The select-only program has no socket pointer and fills only
/// `protocol` and `port`, from the packet; the other fields are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// `AF_INET` or `AF_INET6`; 0 in port-only keys.
    pub family: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u32,
    /// Local port, host byte order.
    pub port: u32,
    /// Bound address as the kernel stores it (network byte order words);
    /// IPv4 in `addr[0]`, zero for a wildcard bind.
    pub addr: [u32; 4],
}

/// What a listener steers to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerState {
    /// Slot index, or [`NO_SLOT`].
    pub active_slot: u32,
    /// A second slot that gets `canary_weight` / [`WEIGHT_SCALE`] of new
    /// connections (and new UDP flows), or [`NO_SLOT`].
    pub canary_slot: u32,
    pub canary_weight: u32,
    /// [`Mode`] as a number.
    pub mode: u32,
}

impl Default for ListenerState {
    fn default() -> Self {
        Self {
            active_slot: NO_SLOT,
            canary_slot: NO_SLOT,
            canary_weight: 0,
            mode: Mode::Tcp as u32,
        }
    }
}

/// How many leading entries of a slot's range in `SOCKETS` are populated,
/// and which generation holds the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    pub sockets: u32,
    /// The generation holding the slot (its number, truncated); a UDP flow
    /// pinned to the slot by another generation is not its own.
    pub epoch: u32,
}

/// Value of `LISTENER_HINTS`: what the program may skip for a listener.
/// Userspace keeps it in step with `PROBES` and `LISTENERS`: a probe route
/// is inserted before `probes` counts it and counted until after it is
/// removed, and `mode` is written before the listener's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerHints {
    /// Probe routes in `PROBES` for this listener; 0: the program does not
    /// look there.
    pub probes: u32,
    /// [`Mode`] as a number, as in `ListenerState::mode`.
    pub mode: u32,
}

/// Value of `LISTENER_INDEX`.
///
/// Userspace changes an entry in two writes, so that a program reading it
/// while the kernel copies a new value in sees nothing wrong even if the
/// copy is not atomic: the listener is written with an empty tag first,
/// then the tag; an entry is emptied by writing an empty tag alone. A
/// torn read then pairs a tag only with the listener it belongs to, or
/// sees the empty tag and uses `LISTENER_KEYS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    /// [`index_tag`] of the one listener this entry names; 0: none.
    pub tag: u32,
    pub listener: u32,
}

/// What identifies a listener in `LISTENER_INDEX`: its key without the
/// address (never 0: `protocol` is not). Two listeners with the same tag
/// (the same port and family, different addresses) are left to
/// `LISTENER_KEYS`.
#[inline(always)]
pub const fn index_tag(family: u32, protocol: u32, port: u32) -> u32 {
    (protocol << 24) | ((family & 0xff) << 16) | (port & 0xffff)
}

/// Index of a tag's entry in `LISTENER_INDEX` (`mask`: its size − 1): the
/// tag's bits mixed (an xor-shift, a multiply, an xor-shift), so TCP and
/// UDP, IPv4 and IPv6 on one port usually land on different entries.
#[inline(always)]
pub const fn index_slot(tag: u32, mask: u32) -> u32 {
    let mut h = tag ^ (tag >> 15);
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 13;
    h & mask
}

/// Key of `PROBES`: a listener and the client's source port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub listener: u32,
    pub port: u32,
}

/// Value of `PROBES`: the slot the probe must reach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTarget {
    pub slot: u32,
    pub _pad: u32,
}

/// Key of `FLOWS`: a UDP flow of a listener, by its remote end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub listener: u32,
    /// Remote port, host byte order.
    pub port: u32,
    /// Remote address as on the wire: IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub slot: u32,
    /// The slot's epoch when the flow was pinned.
    pub epoch: u32,
}

/// What the program did, per (listener, slot) and per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections (UDP: datagrams of new flows, or every datagram in
    /// stateless mode) steered to this slot as the active or canary slot.
    pub steered: u64,
    /// Queued connections of a closing listener moved to this slot.
    pub migrated: u64,
    /// Probe packets routed to this slot by source port.
    pub probe_routed: u64,
    /// Decisions left to the kernel's hash selection while this slot was the
    /// target (empty slot, or every attempted entry gone).
    pub fallback: u64,
    /// UDP datagrams of a known flow that stayed with this slot.
    pub affinity: u64,
}

impl Counters {
    /// Field-wise sum, for adding up per-CPU values.
    pub fn add(&mut self, other: &Self) {
        self.steered += other.steered;
        self.migrated += other.migrated;
        self.probe_routed += other.probe_routed;
        self.fallback += other.fallback;
        self.affinity += other.affinity;
    }
}

/// A socket started listening on a managed address, or a connection found
/// no live socket in its target slot and waits on the bridge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenEvent {
    pub listener: u32,
    /// [`ListenEvent::LISTEN`] or [`ListenEvent::BRIDGED`].
    pub kind: u32,
}

impl ListenEvent {
    pub const LISTEN: u32 = 0;
    pub const BRIDGED: u32 = 1;
}

/// Index of a (listener, slot) in `SLOT_SOCKETS` and `COUNTERS`.
#[inline(always)]
pub const fn counter_index(slots: u32, listener: u32, slot: u32) -> u32 {
    listener * slots + slot
}

/// Index of the `n`th socket of (listener, slot) in `SOCKETS`.
#[inline(always)]
pub const fn socket_index(limits: &Limits, listener: u32, slot: u32, n: u32) -> u32 {
    (listener * limits.slots + slot) * limits.sockets_per_slot + n
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain integers with explicit
    // padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::ListenerState {}
    unsafe impl aya::Pod for super::SlotState {}
    unsafe impl aya::Pod for super::ProbeKey {}
    unsafe impl aya::Pod for super::ProbeTarget {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::ListenEvent {}
    unsafe impl aya::Pod for super::ListenerHints {}
    unsafe impl aya::Pod for super::IndexEntry {}
}
