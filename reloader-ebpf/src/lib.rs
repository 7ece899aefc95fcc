//! Types and constants shared by the steering program (built for
//! `bpfel-unknown-none` from `src/main.rs`) and its userspace owner
//! (`reloader::steering`).
//!
//! Every map value is `#[repr(C)]` with explicit padding and no implicit
//! holes: the verifier rejects reads of uninitialised stack bytes, and
//! userspace must never hand the kernel bytes it did not set.
//!
//! # Map layout
//!
//! A *listener* is one managed address (one reuseport group); it gets an index
//! `0..MAX_LISTENERS`. Each listener has `MAX_SLOTS` *slots*; a generation of
//! the server occupies one slot per listener while it is alive. A slot holds up
//! to `MAX_SOCKETS_PER_SLOT` listening sockets (one per nginx worker, one per
//! Envoy worker thread, ...), spread over by the packet hash.
//!
//! - [`map::LISTENER_KEYS`]: `ListenerKey -> u32` listener index.
//! - [`map::ACTIVE`]: `listener -> ListenerState` (the slot that receives new
//!   connections). Cutover is one update of this map.
//! - [`map::SLOT_SOCKETS`]: `listener * MAX_SLOTS + slot -> SlotState` (how
//!   many sockets of the slot are populated in `SOCKETS`).
//! - [`map::SOCKETS`]: `REUSEPORT_SOCKARRAY`, index from [`socket_index`].
//! - [`map::PROBES`]: `ProbeKey -> ProbeTarget` routes a SYN from a registered
//!   client source port to a chosen slot (readiness probes for a candidate).
//! - [`map::COUNTERS`]: per-CPU `Counters`, index from [`counter_index`], plus
//!   one trailing entry for connections to groups that are not managed.
#![no_std]

/// How many managed addresses (reuseport groups) one program serves.
pub const MAX_LISTENERS: u32 = 32;
/// Generation slots per listener: the active one, a candidate, and
/// generations still draining.
pub const MAX_SLOTS: u32 = 8;
/// Listening sockets one generation may hold for one address.
pub const MAX_SOCKETS_PER_SLOT: u32 = 256;
/// How many populated entries of a slot the program tries before it gives
/// up and lets the kernel choose (entries vanish when their socket closes).
pub const MAX_SELECT_ATTEMPTS: u32 = 8;
/// `ListenerState::active_slot` when no slot receives new connections.
pub const NO_SLOT: u32 = u32::MAX;
/// Entries in `SOCKETS`.
pub const SOCKETS_LEN: u32 = MAX_LISTENERS * MAX_SLOTS * MAX_SOCKETS_PER_SLOT;
/// Entries in `COUNTERS`: one per (listener, slot), plus [`UNMANAGED_COUNTER`].
pub const COUNTERS_LEN: u32 = MAX_LISTENERS * MAX_SLOTS + 1;
/// `COUNTERS` entry for connections whose group has no registered listener.
pub const UNMANAGED_COUNTER: u32 = MAX_LISTENERS * MAX_SLOTS;
/// Entries in `PROBES`: concurrent readiness probes.
pub const MAX_PROBES: u32 = 256;

/// Names of the maps and programs in the object; userspace looks them up by
/// these constants only.
pub mod map {
    pub const LISTENER_KEYS: &str = "LISTENER_KEYS";
    pub const ACTIVE: &str = "ACTIVE";
    pub const SLOT_SOCKETS: &str = "SLOT_SOCKETS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const PROBES: &str = "PROBES";
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names in the object.
pub mod program {
    /// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux ≥ 5.14): also runs when a
    /// listener closes, to move its queued connections.
    pub const SELECT_OR_MIGRATE: &str = "steer_migrate";
    /// `BPF_SK_REUSEPORT_SELECT` for older kernels: steers new connections
    /// only, and identifies a listener by its port alone (the context has
    /// no socket pointer before 5.14).
    pub const SELECT: &str = "steer_select";
}

/// Identifies a reuseport group from inside the program.
///
/// The select-or-migrate program reads it from the group's socket
/// (`sk_reuseport_md.sk`, Linux ≥ 5.14): family, bound address and port. The
/// select-only program has no socket pointer and fills only `port`, from the
/// SYN's destination port; the other fields are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// `AF_INET` or `AF_INET6`; 0 in port-only keys.
    pub family: u32,
    /// Local port, host byte order.
    pub port: u32,
    /// Bound address as the kernel stores it (network byte order words);
    /// IPv4 in `addr[0]`, zero for a wildcard bind.
    pub addr: [u32; 4],
}

/// Which slot of a listener receives new connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerState {
    /// Slot index, or [`NO_SLOT`].
    pub active_slot: u32,
    pub _pad: u32,
}

impl Default for ListenerState {
    fn default() -> Self {
        Self {
            active_slot: NO_SLOT,
            _pad: 0,
        }
    }
}

/// How many leading entries of a slot's range in `SOCKETS` are populated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    pub sockets: u32,
    pub _pad: u32,
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

/// What the program did, per (listener, slot) and per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections steered to this slot because it was active.
    pub steered: u64,
    /// Queued connections of a closing listener moved to this slot.
    pub migrated: u64,
    /// Probe connections routed to this slot by source port.
    pub probe_routed: u64,
    /// Decisions left to the kernel's hash selection while this slot was the
    /// target (empty slot, or every attempted entry gone).
    pub fallback: u64,
}

impl Counters {
    /// Field-wise sum, for adding up per-CPU values.
    pub fn add(&mut self, other: &Self) {
        self.steered += other.steered;
        self.migrated += other.migrated;
        self.probe_routed += other.probe_routed;
        self.fallback += other.fallback;
    }
}

/// Index of a (listener, slot) in `SLOT_SOCKETS` and `COUNTERS`.
#[inline(always)]
pub const fn counter_index(listener: u32, slot: u32) -> u32 {
    listener * MAX_SLOTS + slot
}

/// Index of the `n`th socket of (listener, slot) in `SOCKETS`.
#[inline(always)]
pub const fn socket_index(listener: u32, slot: u32, n: u32) -> u32 {
    (listener * MAX_SLOTS + slot) * MAX_SOCKETS_PER_SLOT + n
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
    unsafe impl aya::Pod for super::Counters {}
}
