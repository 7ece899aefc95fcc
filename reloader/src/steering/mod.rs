//! Steering: the eBPF program and its maps. [`ebpf`] is the only module of
//! the crate that talks to aya; everything else sees the [`Steer`] trait,
//! which the controller's state owns as a `Box<dyn Steer>` and unit tests
//! replace with [`fake::FakeSteering`].
//!
//! The maps hold, per managed listener (one reuseport group) and per slot
//! (one generation), the registered listening sockets, which slot is active,
//! which client source ports are readiness probes, and per-slot counters.
//! Layout and kernel behaviour: `reloader-ebpf/src/lib.rs` and
//! `reloader-ebpf/src/main.rs`.

pub mod bridge;
mod ebpf;
mod error;
#[cfg(test)]
pub mod fake;
mod keys;

use std::os::fd::BorrowedFd;

pub use ebpf::{
    Injector, ListenEvents, LogPump, MAPS_LAYOUT, MigrationLog, OLDEST_MAPS_LAYOUT, Steering,
};
pub use error::SteeringError;
pub use keys::listener_key;
pub use reloader_ebpf::{
    BRIDGE_EPOCH, Counters, Limits, ListenEvent, Mode as ListenerMode, WEIGHT_SCALE, limits,
};

pub use crate::listen::{ListenerSpec, Transport};

/// Where a listener's new connections go: the active slot, and optionally
/// a canary slot with its share (in parts of [`WEIGHT_SCALE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub active: Option<u32>,
    pub canary: Option<(u32, u32)>,
}

/// Which program runs, decided by what the kernel supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Steers new connections and migrates queued ones of closing listeners.
    #[default]
    SelectOrMigrate,
    /// Steers new connections only (kernels before 5.14, or forced).
    SelectOnly,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SelectOrMigrate => "select-or-migrate",
            Self::SelectOnly => "select-only",
        })
    }
}

/// How to load the program.
#[derive(Clone, Debug)]
pub struct Options {
    /// Load the select-only program even where select-or-migrate works.
    pub force_select_only: bool,
    /// Keep the program's debug statements (emitted through aya-log); off,
    /// the verifier removes them so they cost nothing per SYN.
    pub ebpf_debug_logs: bool,
    /// Pin the maps here (bpffs), reusing pins a previous controller left:
    /// what lets a restarted controller adopt running generations.
    pub pin_dir: Option<std::path::PathBuf>,
    /// How large the maps are.
    pub limits: Limits,
    /// Entries of the UDP flow table (least recently used flows are
    /// forgotten when it is full).
    pub udp_flows: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            force_select_only: false,
            ebpf_debug_logs: false,
            pin_dir: None,
            limits: Limits {
                listeners: 32,
                slots: 8,
                sockets_per_slot: 256,
            },
            udp_flows: 1,
        }
    }
}

/// How many entries the steering maps hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryCounts {
    pub listeners: u64,
    pub sockets: u64,
    pub probes: u64,
}

pub type Result<T, E = SteeringError> = std::result::Result<T, E>;

/// The operations the controller performs on the steering maps once they
/// are loaded and the listeners added. Each is one or a few map updates:
/// single bpf(2) calls that never sleep, made by the owner of the
/// instance's state in its steps (a cutover is one such update).
pub trait Steer: Send {
    /// Which program is loaded.
    fn mode(&self) -> Mode;

    /// Attaches the program to the reuseport group `socket` belongs to. The
    /// socket must have `SO_REUSEPORT` and be bound.
    fn attach(&self, socket: BorrowedFd<'_>) -> Result<()>;

    /// Registers the sockets of (`listener`, `slot`) for generation
    /// `epoch`, replacing whatever the slot held. Each must have
    /// `SO_REUSEPORT`, be of the listener's transport (listening, for TCP)
    /// and bound to its address. The map does not keep the sockets alive:
    /// callers may close their descriptors after.
    fn set_slot_sockets(
        &mut self,
        listener: u32,
        slot: u32,
        epoch: u32,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()>;

    /// Empties (`listener`, `slot`); its counters are kept.
    fn clear_slot(&mut self, listener: u32, slot: u32) -> Result<()>;

    /// Where new connections to `listener` go: one map update, seen by the
    /// program whole (a cutover, a canary weight, a rollback).
    fn set_split(&mut self, listener: u32, split: Split) -> Result<()>;

    /// Where new connections to `listener` go now.
    fn split(&self, listener: u32) -> Result<Split>;

    /// Makes `slot` the one that receives every new connection to
    /// `listener` (`None`: no slot, the kernel's hash selection decides).
    /// This single map update is the cutover.
    fn set_active(&mut self, listener: u32, slot: Option<u32>) -> Result<()> {
        self.set_split(
            listener,
            Split {
                active: slot,
                canary: None,
            },
        )
    }

    /// The slot that receives new connections to `listener`.
    fn active(&self, listener: u32) -> Result<Option<u32>> {
        Ok(self.split(listener)?.active)
    }

    /// Routes a SYN to `listener` from client source port `port` to `slot`,
    /// whatever the active slot is (readiness probes of a candidate).
    fn add_probe(&mut self, listener: u32, port: u16, slot: u32) -> Result<()>;

    /// Removes a probe route; removing one that does not exist is not an
    /// error.
    fn remove_probe(&mut self, listener: u32, port: u16) -> Result<()>;

    /// The counters of (`listener`, `slot`), summed over CPUs.
    fn counters(&self, listener: u32, slot: u32) -> Result<Counters>;

    /// Zeroes the counters of (`listener`, `slot`), for a slot taken by a
    /// new generation: counters belong to a generation, not to a slot.
    fn reset_counters(&mut self, listener: u32, slot: u32) -> Result<()>;

    /// Decisions for groups that had no registered listener.
    fn unmanaged_counters(&self) -> Result<Counters>;

    /// Entries in the maps as the kernel holds them: listener keys, sockets
    /// registered (summed slot sizes), probe routes. For leak checks.
    fn entry_counts(&self) -> Result<EntryCounts>;

    /// UDP flows of `listener` in the flow table, per slot (walks the
    /// table: for status, not for hot paths).
    fn flows(&self, listener: u32) -> Result<std::collections::BTreeMap<u32, u64>> {
        let _ = listener;
        Ok(std::collections::BTreeMap::new())
    }

    /// Entries the flow table holds at most.
    fn flow_capacity(&self) -> u64 {
        0
    }

    /// Makes `socket` (the controller's own listener in `listener`'s group,
    /// see [`bridge`]) the one the program holds connections on while
    /// their slot has no live socket, replacing the previous bridge. The
    /// map does not keep it alive.
    fn set_bridge(&mut self, listener: u32, socket: BorrowedFd<'_>) -> Result<()>;

    /// Connections the program sent to `listener`'s bridge.
    fn bridged(&self, listener: u32) -> Result<u64>;

    /// Where the program migrated connections to, readable on another
    /// thread (`None`: not known, as in unit tests' fakes).
    fn migration_log(&self) -> Option<MigrationLog> {
        None
    }
}
