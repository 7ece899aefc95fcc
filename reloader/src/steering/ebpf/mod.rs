//! The aya side of steering: loads the embedded object (`reloader-ebpf`)
//! with its maps sized for the instance, picks the best `SK_REUSEPORT`
//! program the kernel accepts, attaches it to reuseport groups, and owns the
//! loaded object and its maps as [`Steering`]. The map operations are in
//! [`maps`] (listener registration and the reads and writes everything is
//! built of) and [`steer`] (the [`Steer`](super::Steer) impl); the sockets
//! they accept are checked in [`socket`]. The listen notifier is
//! [`listen`], the aya-log pump [`log_pump`], bpffs pins and the memlock
//! rlimit [`pin`], the `--inject-reuseport` bind programs [`inject`].
//!
//! Kernel behaviour this relies on (see also `reloader-ebpf/src/main.rs`):
//! - A program attached with `SO_ATTACH_REUSEPORT_EBPF` through any member
//!   socket applies to the whole group, stays attached when that socket
//!   closes, and applies to sockets that join later. Dropping the aya objects
//!   does not detach it; [`Steering::detach`] does.
//! - `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` exists from Linux 5.14; older
//!   kernels reject the program at load, and we fall back to the select-only
//!   program, which identifies listeners by protocol and port only (no
//!   socket pointer in its context).

mod inject;
mod listen;
mod log_pump;
mod maps;
mod pin;
mod socket;
mod steer;

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
};
use reloader_ebpf::{
    Counters, Flow, FlowKey, IndexEntry, Limits, ListenerHints, ListenerKey, ListenerState,
    ProbeKey, ProbeTarget, SlotState, global, map, program,
};
use tracing::{debug, info, warn};

pub use self::{
    inject::Injector,
    listen::ListenEvents,
    log_pump::LogPump,
    pin::{MAPS_LAYOUT, OLDEST_MAPS_LAYOUT},
};
use super::{
    ListenerSpec, Mode, Options, Result, SteeringError,
    error::{classify, classify_load_error},
};

/// The steering object, built by `cargo xtask build-ebpf` from
/// `reloader-ebpf` and checked against its source by `cargo xtask check-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../ebpf/steer.bpf.o");

/// The loaded program and its maps.
pub struct Steering {
    ebpf: Ebpf,
    mode: Mode,
    program_name: &'static str,
    limits: Limits,
    listener_keys: HashMap<MapData, ListenerKey, u32>,
    states: HashMap<MapData, u32, ListenerState>,
    /// `LISTENER_HINTS`: per listener, its probe routes' count and mode.
    hints: Array<MapData, ListenerHints>,
    /// `LISTENER_INDEX`, and what it holds (written only through
    /// `sync_index`).
    index: Array<MapData, IndexEntry>,
    index_now: Vec<IndexEntry>,
    slot_sockets: Array<MapData, SlotState>,
    sockets: ReusePortSockArray<MapData>,
    probes: HashMap<MapData, ProbeKey, ProbeTarget>,
    flows: HashMap<MapData, FlowKey, Flow>,
    counters: PerCpuArray<MapData, Counters>,
    bridges: ReusePortSockArray<MapData>,
    bridged: PerCpuArray<MapData, u64>,
    /// `MIGRATED`, read and trimmed by [`MigrationLog`]s on blocking
    /// threads.
    migrated: std::sync::Arc<std::os::fd::OwnedFd>,
    listeners: StdHashMap<u32, ListenerSpec>,
    flow_capacity: u32,
    /// What each (listener, slot) entry holds: the socket's cookie.
    layouts: StdHashMap<(u32, u32), Vec<Option<u64>>>,
    cpus: usize,
    /// The maps were pinned by a previous controller and reused.
    reused: bool,
    /// The controller's network namespace, as the listen notifier compares
    /// it (`None`: the kernel does not say, before 5.14).
    netns_cookie: Option<u64>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .field("limits", &self.limits)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Raises `RLIMIT_MEMLOCK` (needed before 5.11's memcg accounting),
    /// loads the object with maps sized by `options.limits`, and the best
    /// program the kernel accepts.
    pub fn load(options: &Options) -> Result<Self> {
        pin::raise_memlock();
        let limits = options.limits;
        if limits.listeners == 0 || limits.slots == 0 || limits.sockets_per_slot == 0 {
            return Err(SteeringError::BadLimits { limits });
        }
        // aya-log-common levels: 0 disables every statement, 4 is debug.
        let log_level: u8 = if options.ebpf_debug_logs { 4 } else { 0 };
        let netns_cookie = listen::own_netns_cookie();
        let netns_global = netns_cookie.unwrap_or(0);
        let index_mask = limits.index_entries() - 1;
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .override_global(global::NETNS_COOKIE, &netns_global, true)
            .override_global(global::LISTENERS, &limits.listeners, true)
            .override_global(global::SLOTS, &limits.slots, true)
            .override_global(global::SOCKETS_PER_SLOT, &limits.sockets_per_slot, true)
            .override_global(global::INDEX_MASK, &index_mask, true)
            .map_max_entries(map::LISTENER_KEYS, limits.listeners)
            .map_max_entries(map::LISTENERS, limits.listeners)
            .map_max_entries(map::LISTENER_HINTS, limits.listeners)
            .map_max_entries(map::LISTENER_INDEX, limits.index_entries())
            .map_max_entries(map::SLOT_SOCKETS, limits.slot_entries())
            .map_max_entries(map::SOCKETS, limits.socket_entries())
            .map_max_entries(map::COUNTERS, limits.counter_entries())
            .map_max_entries(map::BRIDGES, limits.listeners)
            .map_max_entries(map::BRIDGED, limits.listeners)
            .map_max_entries(map::FLOWS, options.udp_flows.max(1))
            // The managed addresses and the start-up probe's key.
            .map_max_entries(map::INJECT_KEYS, limits.listeners + 1);
        let reused = match &options.pin_dir {
            Some(dir) => pin::pin_maps(&mut loader, dir)?,
            None => false,
        };
        let mut ebpf = loader.load(OBJECT).map_err(classify_load_error)?;

        let (mode, program_name) = if options.force_select_only {
            warn!(
                "select-only steering forced: queued connections of closing listeners are not migrated"
            );
            load_program(&mut ebpf, program::SELECT)?;
            (Mode::SelectOnly, program::SELECT)
        } else {
            match load_program(&mut ebpf, program::SELECT_OR_MIGRATE) {
                Ok(()) => (Mode::SelectOrMigrate, program::SELECT_OR_MIGRATE),
                Err(error) => {
                    // One line for people; the verifier's log (many lines)
                    // at debug level.
                    warn!(
                        "this kernel does not accept the select-or-migrate program (it needs \
                         sk_reuseport_md.migrating_sk, Linux >= 5.14); using select-only \
                         steering: connections queued in an old generation's listeners are \
                         reset when it closes"
                    );
                    debug!(error = %crate::error_chain(&error), "select-or-migrate rejected");
                    load_program(&mut ebpf, program::SELECT)?;
                    (Mode::SelectOnly, program::SELECT)
                }
            }
        };

        let cpus = aya::util::nr_cpus()
            .map_err(|(what, source)| SteeringError::CpuCountError { what, source })?;
        let index: Array<MapData, IndexEntry> = take_map(&mut ebpf, map::LISTENER_INDEX)?;
        // Reused pins hold what the previous controller wrote (layout 3's
        // come without the map: created empty).
        let index_now = (0..limits.index_entries())
            .map(|i| index.get(&i, 0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_error(map::LISTENER_INDEX, "get"))?;
        let steering = Self {
            listener_keys: take_map(&mut ebpf, map::LISTENER_KEYS)?,
            states: take_map(&mut ebpf, map::LISTENERS)?,
            hints: take_map(&mut ebpf, map::LISTENER_HINTS)?,
            index,
            index_now,
            slot_sockets: take_map(&mut ebpf, map::SLOT_SOCKETS)?,
            sockets: take_map(&mut ebpf, map::SOCKETS)?,
            probes: take_map(&mut ebpf, map::PROBES)?,
            flows: take_map(&mut ebpf, map::FLOWS)?,
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            bridges: take_map(&mut ebpf, map::BRIDGES)?,
            bridged: take_map(&mut ebpf, map::BRIDGED)?,
            migrated: {
                let map = ebpf
                    .take_map(map::MIGRATED)
                    .ok_or(SteeringError::MapNotFound {
                        name: map::MIGRATED,
                    })?;
                let fd = match &map {
                    aya::maps::Map::LruHashMap(data) => data.fd().as_fd().try_clone_to_owned(),
                    _ => {
                        return Err(SteeringError::MapNotFound {
                            name: map::MIGRATED,
                        });
                    }
                };
                std::sync::Arc::new(fd.map_err(|source| SteeringError::MapError {
                    map: map::MIGRATED,
                    operation: "dup",
                    source: MapError::SyscallError(aya::sys::SyscallError {
                        call: "fcntl",
                        io_error: source,
                    }),
                })?)
            },
            ebpf,
            mode,
            program_name,
            limits,
            listeners: StdHashMap::new(),
            layouts: StdHashMap::new(),
            flow_capacity: options.udp_flows.max(1),
            cpus,
            reused,
            netns_cookie,
        };
        info!(%mode, ?limits, reused_pinned_maps = reused, "steering program loaded");
        Ok(steering)
    }

    /// A handle on the migrated-connection records, for counting on a
    /// blocking thread.
    pub fn migration_log(&self) -> MigrationLog {
        MigrationLog(self.migrated.clone())
    }

    /// Whether the maps were a previous controller's (pinned, reused).
    pub fn reused_maps(&self) -> bool {
        self.reused
    }

    /// The sizes the maps were created with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Detaches whatever program the group of `socket` has.
    pub fn detach(socket: BorrowedFd<'_>) -> Result<()> {
        SkReuseport::detach(socket).map_err(|source| SteeringError::AttachError {
            operation: "detach",
            fd: socket.as_raw_fd(),
            source,
        })
    }
}

/// Where the program migrated connections to: `MIGRATED`, whose records
/// the program writes and whoever counts connections reads and trims.
#[derive(Clone, Debug)]
pub struct MigrationLog(std::sync::Arc<std::os::fd::OwnedFd>);

impl MigrationLog {
    fn map(&self) -> Result<HashMap<MapData, u64, u32>> {
        let error = map_error(map::MIGRATED, "open");
        let fd = self.0.try_clone().map_err(|source| {
            error(MapError::SyscallError(aya::sys::SyscallError {
                call: "fcntl",
                io_error: source,
            }))
        })?;
        let data = MapData::from_fd(fd).map_err(&error)?;
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(error)
    }

    /// Every record: a migrated connection's socket cookie and the epoch
    /// of the slot it went to ([`reloader_ebpf::BRIDGE_EPOCH`]: a bridge).
    /// Walks the map: one or two bpf(2) calls per record.
    pub fn read(&self) -> Result<StdHashMap<u64, u32>> {
        let map = self.map()?;
        map.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_error(map::MIGRATED, "read"))
    }

    /// Forgets the records of `cookies` (connections that closed).
    pub fn forget(&self, cookies: impl IntoIterator<Item = u64>) -> Result<()> {
        let mut map = self.map()?;
        for cookie in cookies {
            match map.remove(&cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(map_error(map::MIGRATED, "remove")(error)),
            }
        }
        Ok(())
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    let program: &mut SkReuseport = ebpf
        .program_mut(name)
        .ok_or(SteeringError::MapNotFound { name })?
        .try_into()
        .map_err(|source| SteeringError::ProgramLoadError {
            program: name,
            source,
        })?;
    program.load().map_err(|source| {
        let error = SteeringError::ProgramLoadError {
            program: name,
            source,
        };
        classify(error)
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(SteeringError::MapNotFound { name })?;
    T::try_from(map).map_err(map_error(name, "open"))
}

fn map_error(map: &'static str, operation: &'static str) -> impl Fn(MapError) -> SteeringError {
    move |source| SteeringError::MapError {
        map,
        operation,
        source,
    }
}
