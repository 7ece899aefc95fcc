//! The aya side of steering: loads the embedded object (`reloader-ebpf`)
//! with its maps sized for the instance, attaches the `SK_REUSEPORT`
//! program to reuseport groups and the `sock_ops` listen notifier to the
//! controller's cgroup, and keeps the maps.
//!
//! Kernel behaviour this relies on (see also `reloader-ebpf/src/main.rs`):
//! - A program attached with `SO_ATTACH_REUSEPORT_EBPF` through any member
//!   socket applies to the whole group, stays attached when that socket
//!   closes, and applies to sockets that join later. Dropping the aya objects
//!   does not detach it; [`Steering::detach`] does.
//! - A `REUSEPORT_SOCKARRAY` entry does not keep its socket alive: it is
//!   cleared when the socket closes. So the controller never needs to keep
//!   its own copy of a generation's listener once it is registered, and must
//!   not (a copy would keep the listener, and its queue, alive after the
//!   generation exits).
//! - `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` exists from Linux 5.14; older
//!   kernels reject the program at load, and we fall back to the select-only
//!   program, which identifies listeners by protocol and port only (no
//!   socket pointer in its context).
//! - A `sock_ops` program attached to a cgroup runs `BPF_SOCK_OPS_TCP_LISTEN_CB`
//!   for every `listen(2)` of a process in it or below; the link is released
//!   with the controller's last descriptor of it, so a killed controller
//!   leaves none behind.

#![allow(clippy::disallowed_methods)] // loading, pinning and attaching run at start-up and unpinning at stop, on blocking threads only

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, ReusePortSockArray, RingBuf,
    },
    programs::{CgroupAttachMode, SkReuseport, SockOps},
};
use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
use reloader_ebpf::{
    Counters, Flow, FlowKey, Limits, ListenEvent, ListenerKey, ListenerState, NO_SLOT, ProbeKey,
    ProbeTarget, SlotState, counter_index, global, map, program, socket_index,
};
use tracing::{debug, info, warn};

use super::{
    EntryCounts, ListenerSpec, Mode, Options, Result, Split, Steer, SteeringError, Transport,
    error::{classify, classify_load_error},
    listener_key,
};

/// The steering object, built by `cargo xtask build-ebpf` from
/// `reloader-ebpf` and checked against its source by `cargo xtask check-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/steer.bpf.o");

/// The loaded program and its maps.
pub struct Steering {
    ebpf: Ebpf,
    mode: Mode,
    program_name: &'static str,
    limits: Limits,
    listener_keys: HashMap<MapData, ListenerKey, u32>,
    states: HashMap<MapData, u32, ListenerState>,
    slot_sockets: Array<MapData, SlotState>,
    sockets: ReusePortSockArray<MapData>,
    probes: HashMap<MapData, ProbeKey, ProbeTarget>,
    flows: HashMap<MapData, FlowKey, Flow>,
    counters: PerCpuArray<MapData, Counters>,
    bridges: ReusePortSockArray<MapData>,
    bridged: PerCpuArray<MapData, u64>,
    listeners: StdHashMap<u32, ListenerSpec>,
    flow_capacity: u32,
    /// What each (listener, slot) entry holds: the socket's cookie.
    layouts: StdHashMap<(u32, u32), Vec<Option<u64>>>,
    cpus: usize,
    /// The maps were pinned by a previous controller and reused.
    reused: bool,
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
        raise_memlock();
        let limits = options.limits;
        if limits.listeners == 0 || limits.slots == 0 || limits.sockets_per_slot == 0 {
            return Err(SteeringError::BadLimits { limits });
        }
        // aya-log-common levels: 0 disables every statement, 4 is debug.
        let log_level: u8 = if options.ebpf_debug_logs { 4 } else { 0 };
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .override_global(global::LISTENERS, &limits.listeners, true)
            .override_global(global::SLOTS, &limits.slots, true)
            .override_global(global::SOCKETS_PER_SLOT, &limits.sockets_per_slot, true)
            .map_max_entries(map::LISTENER_KEYS, limits.listeners)
            .map_max_entries(map::LISTENERS, limits.listeners)
            .map_max_entries(map::SLOT_SOCKETS, limits.slot_entries())
            .map_max_entries(map::SOCKETS, limits.socket_entries())
            .map_max_entries(map::COUNTERS, limits.counter_entries())
            .map_max_entries(map::BRIDGES, limits.listeners)
            .map_max_entries(map::BRIDGED, limits.listeners)
            .map_max_entries(map::FLOWS, options.udp_flows.max(1));
        let mut reused = false;
        if let Some(dir) = &options.pin_dir {
            ensure_bpffs()?;
            std::fs::create_dir_all(dir).map_err(|source| SteeringError::PinDirError {
                path: dir.display().to_string(),
                source,
            })?;
            reused = dir.join(map::LISTENERS).exists();
            for name in PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
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
        let steering = Self {
            listener_keys: take_map(&mut ebpf, map::LISTENER_KEYS)?,
            states: take_map(&mut ebpf, map::LISTENERS)?,
            slot_sockets: take_map(&mut ebpf, map::SLOT_SOCKETS)?,
            sockets: take_map(&mut ebpf, map::SOCKETS)?,
            probes: take_map(&mut ebpf, map::PROBES)?,
            flows: take_map(&mut ebpf, map::FLOWS)?,
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            bridges: take_map(&mut ebpf, map::BRIDGES)?,
            bridged: take_map(&mut ebpf, map::BRIDGED)?,
            ebpf,
            mode,
            program_name,
            limits,
            listeners: StdHashMap::new(),
            layouts: StdHashMap::new(),
            flow_capacity: options.udp_flows.max(1),
            cpus,
            reused,
        };
        info!(%mode, ?limits, reused_pinned_maps = reused, "steering program loaded");
        Ok(steering)
    }

    /// Whether the maps were a previous controller's (pinned, reused).
    pub fn reused_maps(&self) -> bool {
        self.reused
    }

    /// The sizes the maps were created with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes over listener `listener` as a previous controller registered
    /// it: its slots and state stay as they are.
    pub fn adopt_listener(&mut self, listener: u32, spec: impl Into<ListenerSpec>) -> Result<()> {
        let spec = spec.into();
        self.check_listener_index(listener)?;
        let key = self.key_for(&spec);
        self.listener_keys
            .insert(key, listener, 0)
            .map_err(map_error(map::LISTENER_KEYS, "insert"))?;
        self.listeners.insert(listener, spec);
        Ok(())
    }

    /// Removes the pinned maps in `dir` (after a clean stop, or stale ones).
    pub fn unpin(dir: &Path) {
        for name in PINNED {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }

    /// Starts the aya-log pump for the program's debug statements (a no-op
    /// unless [`Options::ebpf_debug_logs`] was set): records go to the `log`
    /// crate, which the binary bridges to tracing. Poll the returned fd for
    /// readability and call [`LogPump::flush`].
    pub fn log_pump(&mut self) -> Option<LogPump> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(LogPump(logger)),
            Err(error) => {
                // As in aya-template: logging is best effort.
                warn!(%error, "eBPF logs unavailable");
                None
            }
        }
    }

    /// Attaches the listen notifier to the cgroup at `cgroup` (the
    /// controller's: servers it spawns are in it or below) and returns the
    /// ring buffer its events arrive on.
    pub fn listen_events(&mut self, cgroup: &Path) -> Result<ListenEvents> {
        let attach_error = |source| SteeringError::AttachError {
            operation: "attach the listen notifier to",
            fd: -1,
            source,
        };
        let dir = std::fs::File::open(cgroup).map_err(|source| SteeringError::CgroupError {
            path: cgroup.display().to_string(),
            source,
        })?;
        let program: &mut SockOps = self
            .ebpf
            .program_mut(program::NOTIFY_LISTEN)
            .ok_or(SteeringError::MapNotFound {
                name: program::NOTIFY_LISTEN,
            })?
            .try_into()
            .map_err(|source| SteeringError::ProgramLoadError {
                program: program::NOTIFY_LISTEN,
                source,
            })?;
        program
            .load()
            .map_err(|source| SteeringError::ProgramLoadError {
                program: program::NOTIFY_LISTEN,
                source,
            })?;
        // A bpf_link (Linux >= 5.7) always coexists with other programs on
        // the cgroup; its attach flags must be 0, which is what `Single`
        // passes (the kernel rejects BPF_F_ALLOW_MULTI on links: EINVAL).
        program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(attach_error)?;
        let ring = take_map(&mut self.ebpf, map::LISTEN_EVENTS)?;
        Ok(ListenEvents(ring))
    }

    /// Detaches whatever program the group of `socket` has.
    pub fn detach(socket: BorrowedFd<'_>) -> Result<()> {
        SkReuseport::detach(socket).map_err(|source| SteeringError::AttachError {
            operation: "detach",
            fd: socket.as_raw_fd(),
            source,
        })
    }

    /// Registers listener `listener` (an index below the configured number
    /// of listeners) for `spec`, with no active slot.
    pub fn add_listener(&mut self, listener: u32, spec: impl Into<ListenerSpec>) -> Result<()> {
        let spec = spec.into();
        self.check_listener_index(listener)?;
        let key = self.key_for(&spec);
        for (&other_id, other) in &self.listeners {
            if other_id != listener && self.key_for(other) == key {
                return Err(SteeringError::ListenerConflict {
                    addr: spec.addr,
                    other: other.addr,
                    why: "the select-only program (kernels before 5.14) tells listeners apart by \
                          protocol and port only; use different ports",
                });
            }
        }
        for slot in 0..self.limits.slots {
            self.clear_slot(listener, slot)?;
        }
        self.write_state(listener, &spec, Split::default())?;
        if let Some(old) = self.listeners.insert(listener, spec) {
            let old_key = self.key_for(&old);
            self.listener_keys
                .remove(&old_key)
                .map_err(map_error(map::LISTENER_KEYS, "remove"))?;
        }
        self.listener_keys
            .insert(key, listener, 0)
            .map_err(map_error(map::LISTENER_KEYS, "insert"))?;
        debug!(listener, addr = %spec.addr, ?spec.transport, "listener added");
        Ok(())
    }

    /// Forgets listener `listener`: new connections to its group fall back
    /// to the kernel's hash selection.
    pub fn remove_listener(&mut self, listener: u32) -> Result<()> {
        let spec = self
            .listeners
            .remove(&listener)
            .ok_or(SteeringError::UnknownListener { listener })?;
        let key = self.key_for(&spec);
        self.listener_keys
            .remove(&key)
            .map_err(map_error(map::LISTENER_KEYS, "remove"))?;
        match self.states.remove(&listener) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(map_error(map::LISTENERS, "remove")(error)),
        }
        for slot in 0..self.limits.slots {
            self.clear_slot(listener, slot)?;
        }
        Ok(())
    }

    fn read_counters(&self, index: u32) -> Result<Counters> {
        let values = self
            .counters
            .get(&index, 0)
            .map_err(map_error(map::COUNTERS, "get"))?;
        let mut sum = Counters::default();
        for value in values.iter() {
            sum.add(value);
        }
        Ok(sum)
    }

    fn key_for(&self, spec: &ListenerSpec) -> ListenerKey {
        listener_key(self.mode, spec)
    }

    fn spec(&self, listener: u32) -> Result<ListenerSpec> {
        self.listeners
            .get(&listener)
            .copied()
            .ok_or(SteeringError::UnknownListener { listener })
    }

    fn check_listener_index(&self, listener: u32) -> Result<()> {
        if listener >= self.limits.listeners {
            return Err(SteeringError::UnknownListener { listener });
        }
        Ok(())
    }

    fn check_slot(&self, slot: u32) -> Result<()> {
        if slot >= self.limits.slots {
            return Err(SteeringError::SlotOutOfRange {
                slot,
                slots: self.limits.slots,
            });
        }
        Ok(())
    }

    fn read_state(&self, listener: u32) -> Result<ListenerState> {
        match self.states.get(&listener, 0) {
            Ok(state) => Ok(state),
            Err(MapError::KeyNotFound) => Ok(ListenerState::default()),
            Err(error) => Err(map_error(map::LISTENERS, "get")(error)),
        }
    }

    /// Writes the whole state of `listener` in one update (a hash map
    /// element is replaced at once: the program sees the old or the new).
    fn write_state(&mut self, listener: u32, spec: &ListenerSpec, split: Split) -> Result<()> {
        let (canary_slot, canary_weight) = split.canary.unwrap_or((NO_SLOT, 0));
        let state = ListenerState {
            active_slot: split.active.unwrap_or(NO_SLOT),
            canary_slot,
            canary_weight,
            mode: spec.mode as u32,
        };
        self.states
            .insert(listener, state, 0)
            .map_err(map_error(map::LISTENERS, "insert"))
    }

    fn slot_state(&self, listener: u32, slot: u32) -> Result<SlotState> {
        self.check_listener_index(listener)?;
        self.slot_sockets
            .get(&counter_index(self.limits.slots, listener, slot), 0)
            .map_err(map_error(map::SLOT_SOCKETS, "get"))
    }

    fn write_slot_state(&mut self, listener: u32, slot: u32, state: SlotState) -> Result<()> {
        self.check_listener_index(listener)?;
        self.slot_sockets
            .set(counter_index(self.limits.slots, listener, slot), state, 0)
            .map_err(map_error(map::SLOT_SOCKETS, "set"))
    }

    /// Clears the entries `from..to` of (`listener`, `slot`): only what was
    /// published, so emptying a slot costs one syscall per socket it held,
    /// not one per possible socket.
    fn clear_socket_entries(&mut self, listener: u32, slot: u32, from: u32, to: u32) -> Result<()> {
        for n in from..to.min(self.limits.sockets_per_slot) {
            match self
                .sockets
                .clear_index(&socket_index(&self.limits, listener, slot, n))
            {
                // An empty entry (its socket closed) reports ENOENT.
                Ok(()) => {}
                Err(MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => return Err(map_error(map::SOCKETS, "clear")(error)),
            }
        }
        Ok(())
    }
}

impl Steer for Steering {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn attach(&self, socket: BorrowedFd<'_>) -> Result<()> {
        check_socket(socket, None)?;
        let program: &SkReuseport = self
            .ebpf
            .program(self.program_name)
            .expect("loaded program is present")
            .try_into()
            .expect("program has type SkReuseport");
        program
            .attach(socket)
            .map_err(|source| SteeringError::AttachError {
                operation: "attach",
                fd: socket.as_raw_fd(),
                source,
            })
    }

    fn set_slot_sockets(
        &mut self,
        listener: u32,
        slot: u32,
        epoch: u32,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let spec = self.spec(listener)?;
        self.check_slot(slot)?;
        if sockets.len() > self.limits.sockets_per_slot as usize {
            return Err(SteeringError::TooManySockets {
                count: sockets.len(),
                max: self.limits.sockets_per_slot,
            });
        }
        let mut cookies = Vec::with_capacity(sockets.len());
        for socket in sockets {
            check_socket(*socket, Some((listener, &spec)))?;
            cookies.push(cookie(*socket)?);
        }
        let state = self.slot_state(listener, slot)?;
        // A socket can be in one entry of a REUSEPORT_SOCKARRAY only (EBUSY
        // elsewhere), and entries cannot be read back (the map's values are
        // fds), so the layout of each slot is kept here. Sockets that stay
        // keep their entry, gone ones are cleared, new ones fill free
        // entries: a slot being rewritten is never empty while any of its
        // sockets lives. A slot whose layout is unknown (maps adopted from a
        // previous controller) is emptied first, once.
        let known = self.layouts.get(&(listener, slot)).cloned();
        let mut layout = match known {
            Some(layout) if state.sockets as usize == layout.len() => layout,
            _ => {
                self.write_slot_state(listener, slot, SlotState { sockets: 0, epoch })?;
                self.clear_socket_entries(listener, slot, 0, state.sockets)?;
                Vec::new()
            }
        };
        let index = |n: usize| socket_index(&self.limits, listener, slot, n as u32);
        for (n, entry) in layout.iter_mut().enumerate() {
            if entry.is_some_and(|c| !cookies.contains(&c)) {
                match self.sockets.clear_index(&index(n)) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(error))
                        if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(error) => return Err(map_error(map::SOCKETS, "clear")(error)),
                }
                *entry = None;
            }
        }
        for (socket, cookie) in sockets.iter().zip(&cookies) {
            if layout.contains(&Some(*cookie)) {
                continue;
            }
            let n = layout
                .iter()
                .position(Option::is_none)
                .unwrap_or(layout.len());
            self.sockets
                .set(index(n), socket, 0)
                .map_err(map_error(map::SOCKETS, "set"))?;
            if n == layout.len() {
                layout.push(Some(*cookie));
            } else {
                layout[n] = Some(*cookie);
            }
        }
        while layout.last() == Some(&None) {
            layout.pop();
        }
        self.write_slot_state(
            listener,
            slot,
            SlotState {
                sockets: layout.len() as u32,
                epoch,
            },
        )?;
        debug!(
            listener,
            slot,
            epoch,
            sockets = sockets.len(),
            entries = layout.len(),
            "slot sockets set"
        );
        self.layouts.insert((listener, slot), layout);
        Ok(())
    }

    fn clear_slot(&mut self, listener: u32, slot: u32) -> Result<()> {
        self.check_slot(slot)?;
        let old = self.slot_state(listener, slot)?.sockets;
        self.write_slot_state(listener, slot, SlotState::default())?;
        self.clear_socket_entries(listener, slot, 0, old)?;
        self.layouts.insert((listener, slot), Vec::new());
        Ok(())
    }

    fn set_split(&mut self, listener: u32, split: Split) -> Result<()> {
        let spec = self.spec(listener)?;
        for slot in split.active.into_iter().chain(split.canary.map(|c| c.0)) {
            self.check_slot(slot)?;
        }
        self.write_state(listener, &spec, split)
    }

    fn split(&self, listener: u32) -> Result<Split> {
        self.spec(listener)?;
        let state = self.read_state(listener)?;
        let slot = |s: u32| (s != NO_SLOT).then_some(s);
        Ok(Split {
            active: slot(state.active_slot),
            canary: slot(state.canary_slot)
                .filter(|_| state.canary_weight > 0)
                .map(|s| (s, state.canary_weight)),
        })
    }

    fn add_probe(&mut self, listener: u32, port: u16, slot: u32) -> Result<()> {
        self.spec(listener)?;
        self.check_slot(slot)?;
        let key = ProbeKey {
            listener,
            port: u32::from(port),
        };
        let target = ProbeTarget { slot, _pad: 0 };
        self.probes
            .insert(key, target, 0)
            .map_err(map_error(map::PROBES, "insert"))
    }

    fn remove_probe(&mut self, listener: u32, port: u16) -> Result<()> {
        let key = ProbeKey {
            listener,
            port: u32::from(port),
        };
        match self.probes.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(map_error(map::PROBES, "remove")(error)),
        }
    }

    fn counters(&self, listener: u32, slot: u32) -> Result<Counters> {
        self.check_listener_index(listener)?;
        self.check_slot(slot)?;
        self.read_counters(counter_index(self.limits.slots, listener, slot))
    }

    fn unmanaged_counters(&self) -> Result<Counters> {
        self.read_counters(self.limits.unmanaged_counter())
    }

    fn set_bridge(&mut self, listener: u32, socket: BorrowedFd<'_>) -> Result<()> {
        let spec = self.spec(listener)?;
        check_socket(socket, Some((listener, &spec)))?;
        self.bridges
            .set(listener, &socket, 0)
            .map_err(map_error(map::BRIDGES, "set"))
    }

    fn bridged(&self, listener: u32) -> Result<u64> {
        self.check_listener_index(listener)?;
        let values = self
            .bridged
            .get(&listener, 0)
            .map_err(map_error(map::BRIDGED, "get"))?;
        Ok(values.iter().sum())
    }

    fn reset_counters(&mut self, listener: u32, slot: u32) -> Result<()> {
        self.check_listener_index(listener)?;
        self.check_slot(slot)?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); self.cpus])
            .expect("one value per possible CPU");
        self.counters
            .set(counter_index(self.limits.slots, listener, slot), zero, 0)
            .map_err(map_error(map::COUNTERS, "set"))
    }

    fn flows(&self, listener: u32) -> Result<std::collections::BTreeMap<u32, u64>> {
        let mut per_slot = std::collections::BTreeMap::new();
        for entry in self.flows.iter() {
            let (key, flow) = entry.map_err(map_error(map::FLOWS, "iterate"))?;
            if key.listener == listener {
                *per_slot.entry(flow.slot).or_default() += 1;
            }
        }
        Ok(per_slot)
    }

    fn flow_capacity(&self) -> u64 {
        u64::from(self.flow_capacity)
    }

    fn entry_counts(&self) -> Result<EntryCounts> {
        let listeners = self.listener_keys.keys().count() as u64;
        let probes = self.probes.keys().count() as u64;
        let mut sockets = 0u64;
        for &listener in self.listeners.keys() {
            for slot in 0..self.limits.slots {
                sockets += u64::from(self.slot_state(listener, slot)?.sockets);
            }
        }
        Ok(EntryCounts {
            listeners,
            sockets,
            probes,
        })
    }
}

/// The listen notifier's ring buffer: readable when a socket started
/// listening on a managed address.
pub struct ListenEvents(RingBuf<MapData>);

impl ListenEvents {
    /// Consumes every pending event; returns the listeners named.
    pub fn drain(&mut self) -> Vec<u32> {
        let mut listeners = Vec::new();
        while let Some(item) = self.0.next() {
            if item.len() >= size_of::<ListenEvent>() {
                // SAFETY: the program writes whole ListenEvents; read_unaligned
                // copes with the ring buffer's 8-byte alignment.
                let event: ListenEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                listeners.push(event.listener);
            }
        }
        listeners
    }
}

impl AsFd for ListenEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for ListenEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Drives aya-log: records from the program's debug statements.
pub struct LogPump(aya_log::EbpfLogger<&'static dyn log::Log>);

impl LogPump {
    /// Forwards every pending record to the `log` crate.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl AsFd for LogPump {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for LogPump {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// The maps a restarted controller needs: all of them but aya-log's and the
/// listen notifier's (its link dies with the controller).
const PINNED: [&str; 7] = [
    map::LISTENER_KEYS,
    map::LISTENERS,
    map::SLOT_SOCKETS,
    map::SOCKETS,
    map::PROBES,
    map::FLOWS,
    map::COUNTERS,
];

/// Mounts bpffs at /sys/fs/bpf unless it is there.
fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    let _ = std::fs::create_dir_all("/sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SteeringError::BpffsUnavailable { source })?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Checks that `socket` can be steered to: `SO_REUSEPORT` set, not MPTCP
/// and, when `expected` is given, of the listener's transport (a listening
/// TCP socket, or a bound UDP socket) and bound to its address.
fn check_socket(socket: BorrowedFd<'_>, expected: Option<(u32, &ListenerSpec)>) -> Result<()> {
    let fd = socket.as_raw_fd();
    let query = |source| SteeringError::SocketError { fd, source };
    let local: SockaddrStorage = getsockname(fd).map_err(query)?;
    let local_text = local.to_string();
    if protocol(socket).map_err(query)? == IPPROTO_MPTCP {
        return Err(SteeringError::MptcpListener {
            fd,
            addr: local_text,
        });
    }
    if !getsockopt(&socket, sockopt::ReusePort).map_err(query)? {
        return Err(SteeringError::NotReuseport {
            fd,
            addr: local_text,
        });
    }
    if let Some((listener, spec)) = expected {
        let kind = getsockopt(&socket, sockopt::SockType).map_err(query)?;
        let fits = match spec.transport {
            Transport::Tcp => {
                kind == nix::sys::socket::SockType::Stream
                    && getsockopt(&socket, sockopt::AcceptConn).map_err(query)?
            }
            Transport::Udp => kind == nix::sys::socket::SockType::Datagram,
        };
        if !fits {
            return Err(SteeringError::WrongKind {
                fd,
                expected: spec.transport,
            });
        }
        if to_std(&local) != Some(spec.addr) {
            return Err(SteeringError::WrongAddress {
                fd,
                listener,
                expected: spec.addr,
                found: local_text,
            });
        }
    }
    Ok(())
}

/// The socket's cookie (`SO_COOKIE`): its identity for as long as it lives.
fn cookie(socket: BorrowedFd<'_>) -> Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, a u64 buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    nix::errno::Errno::result(rc)
        .map(|_| value)
        .map_err(|source| SteeringError::SocketError {
            fd: socket.as_raw_fd(),
            source,
        })
}

/// `IPPROTO_MPTCP` (not in libc for every target).
const IPPROTO_MPTCP: i32 = 262;

/// The socket's `SO_PROTOCOL`.
fn protocol(socket: BorrowedFd<'_>) -> nix::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, an int-sized buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    nix::errno::Errno::result(rc).map(|_| value)
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        addr.as_sockaddr_in6()
            .map(|v6| SocketAddr::V6((*v6).into()))
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

fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        // Kernels >= 5.11 account BPF memory to the cgroup instead, so this
        // only matters on older ones; the load error will say more.
        debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}
