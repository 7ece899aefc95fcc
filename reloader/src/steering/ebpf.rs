//! The aya side of steering: loads the embedded `SK_REUSEPORT` program
//! (`reloader-ebpf`), attaches it to reuseport groups, and keeps its maps.
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
//!   program, which identifies listeners by port only (no socket pointer in
//!   its context).

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, ReusePortSockArray},
    programs::SkReuseport,
};
use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
use reloader_ebpf::{
    COUNTERS_LEN, Counters, ListenerKey, ListenerState, MAX_LISTENERS, MAX_SLOTS,
    MAX_SOCKETS_PER_SLOT, NO_SLOT, ProbeKey, ProbeTarget, SlotState, counter_index, map, program,
    socket_index,
};
use tracing::{debug, info, warn};

use super::{
    EntryCounts, Mode, Options, Result, Steer, SteeringError,
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
    listener_keys: HashMap<MapData, ListenerKey, u32>,
    active: Array<MapData, ListenerState>,
    slot_sockets: Array<MapData, SlotState>,
    sockets: ReusePortSockArray<MapData>,
    probes: HashMap<MapData, ProbeKey, ProbeTarget>,
    counters: PerCpuArray<MapData, Counters>,
    listeners: StdHashMap<u32, SocketAddr>,
    cpus: usize,
    /// The maps were pinned by a previous controller and reused.
    reused: bool,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Raises `RLIMIT_MEMLOCK` (needed before 5.11's memcg accounting),
    /// loads the object and the best program the kernel accepts.
    pub fn load(options: &Options) -> Result<Self> {
        raise_memlock();
        // aya-log-common levels: 0 disables every statement, 4 is debug.
        let log_level: u8 = if options.ebpf_debug_logs { 4 } else { 0 };
        let mut loader = EbpfLoader::new();
        loader.override_global("AYA_LOG_LEVEL", &log_level, true);
        let mut reused = false;
        let pins: Vec<(&'static str, std::path::PathBuf)>;
        if let Some(dir) = &options.pin_dir {
            ensure_bpffs()?;
            std::fs::create_dir_all(dir).map_err(|source| SteeringError::PinDirError {
                path: dir.display().to_string(),
                source,
            })?;
            reused = dir.join(map::ACTIVE).exists();
            pins = PINNED.iter().map(|name| (*name, dir.join(name))).collect();
            for (name, path) in &pins {
                loader.map_pin_path(name, path.as_path());
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
                    warn!(
                        error = %crate::error_chain(&error),
                        "this kernel does not accept the select-or-migrate program (Linux >= 5.14 \
                         needed); using select-only steering: connections queued in an old \
                         generation's listeners are reset when it closes"
                    );
                    load_program(&mut ebpf, program::SELECT)?;
                    (Mode::SelectOnly, program::SELECT)
                }
            }
        };

        let cpus = aya::util::nr_cpus()
            .map_err(|(what, source)| SteeringError::CpuCountError { what, source })?;
        let mut steering = Self {
            listener_keys: take_map(&mut ebpf, map::LISTENER_KEYS)?,
            active: take_map(&mut ebpf, map::ACTIVE)?,
            slot_sockets: take_map(&mut ebpf, map::SLOT_SOCKETS)?,
            sockets: take_map(&mut ebpf, map::SOCKETS)?,
            probes: take_map(&mut ebpf, map::PROBES)?,
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            ebpf,
            mode,
            program_name,
            listeners: StdHashMap::new(),
            cpus,
            reused,
        };
        if !reused {
            // Array entries start zeroed; slot 0 is a real slot, so mark
            // every listener inactive explicitly.
            for listener in 0..MAX_LISTENERS {
                steering.write_active(listener, NO_SLOT)?;
            }
        }
        info!(%mode, reused_pinned_maps = reused, "steering program loaded");
        Ok(steering)
    }

    /// Whether the maps were a previous controller's (pinned, reused).
    pub fn reused_maps(&self) -> bool {
        self.reused
    }

    /// Takes over listener `listener` at `addr` as a previous controller
    /// registered it: its slots and active slot stay as they are.
    pub fn adopt_listener(&mut self, listener: u32, addr: SocketAddr) -> Result<()> {
        check_listener_index(listener)?;
        let key = self.key_for(addr);
        self.listener_keys
            .insert(key, listener, 0)
            .map_err(map_error(map::LISTENER_KEYS, "insert"))?;
        self.listeners.insert(listener, addr);
        Ok(())
    }

    /// Removes the pinned maps in `dir` (after a clean stop, or stale ones).
    pub fn unpin(dir: &std::path::Path) {
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

    /// Detaches whatever program the group of `socket` has.
    pub fn detach(socket: BorrowedFd<'_>) -> Result<()> {
        SkReuseport::detach(socket).map_err(|source| SteeringError::AttachError {
            operation: "detach",
            fd: socket.as_raw_fd(),
            source,
        })
    }

    /// Registers listener `listener` (an index below [`MAX_LISTENERS`]) as
    /// the managed address `addr`, inactive.
    pub fn add_listener(&mut self, listener: u32, addr: SocketAddr) -> Result<()> {
        if listener >= MAX_LISTENERS {
            return Err(SteeringError::UnknownListener { listener });
        }
        let key = self.key_for(addr);
        for (&other_id, &other) in &self.listeners {
            if other_id != listener && self.key_for(other) == key {
                return Err(SteeringError::ListenerConflict {
                    addr,
                    other,
                    why: "the select-only program (kernels before 5.14) tells listeners apart by \
                          port only; use different ports",
                });
            }
        }
        self.write_active(listener, NO_SLOT)?;
        for slot in 0..MAX_SLOTS {
            self.clear_slot(listener, slot)?;
        }
        if let Some(old) = self.listeners.insert(listener, addr) {
            let old_key = self.key_for(old);
            self.listener_keys
                .remove(&old_key)
                .map_err(map_error(map::LISTENER_KEYS, "remove"))?;
        }
        self.listener_keys
            .insert(key, listener, 0)
            .map_err(map_error(map::LISTENER_KEYS, "insert"))?;
        debug!(listener, %addr, "listener added");
        Ok(())
    }

    /// Forgets listener `listener`: new connections to its group fall back
    /// to the kernel's hash selection.
    pub fn remove_listener(&mut self, listener: u32) -> Result<()> {
        let addr = self
            .listeners
            .remove(&listener)
            .ok_or(SteeringError::UnknownListener { listener })?;
        let key = self.key_for(addr);
        self.listener_keys
            .remove(&key)
            .map_err(map_error(map::LISTENER_KEYS, "remove"))?;
        self.write_active(listener, NO_SLOT)?;
        for slot in 0..MAX_SLOTS {
            self.clear_slot(listener, slot)?;
        }
        Ok(())
    }

    fn read_counters(&self, index: u32) -> Result<Counters> {
        debug_assert!(index < COUNTERS_LEN);
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

    fn key_for(&self, addr: SocketAddr) -> ListenerKey {
        listener_key(self.mode, addr)
    }

    fn listener_addr(&self, listener: u32) -> Result<SocketAddr> {
        self.listeners
            .get(&listener)
            .copied()
            .ok_or(SteeringError::UnknownListener { listener })
    }

    fn write_active(&mut self, listener: u32, slot: u32) -> Result<()> {
        let state = ListenerState {
            active_slot: slot,
            _pad: 0,
        };
        self.active
            .set(listener, state, 0)
            .map_err(map_error(map::ACTIVE, "set"))
    }

    fn write_slot_count(&mut self, listener: u32, slot: u32, sockets: u32) -> Result<()> {
        check_listener_index(listener)?;
        let state = SlotState { sockets, _pad: 0 };
        self.slot_sockets
            .set(counter_index(listener, slot), state, 0)
            .map_err(map_error(map::SLOT_SOCKETS, "set"))
    }

    /// How many entries of (`listener`, `slot`) are published.
    fn read_slot_count(&self, listener: u32, slot: u32) -> Result<u32> {
        check_listener_index(listener)?;
        let state = self
            .slot_sockets
            .get(&counter_index(listener, slot), 0)
            .map_err(map_error(map::SLOT_SOCKETS, "get"))?;
        Ok(state.sockets.min(MAX_SOCKETS_PER_SLOT))
    }

    /// Clears the entries `from..to` of (`listener`, `slot`): only what was
    /// published, so emptying a slot costs one syscall per socket it held,
    /// not one per possible socket.
    fn clear_socket_entries(&mut self, listener: u32, slot: u32, from: u32, to: u32) -> Result<()> {
        for n in from..to {
            match self.sockets.clear_index(&socket_index(listener, slot, n)) {
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
        check_reuseport(socket, None)?;
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
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let addr = self.listener_addr(listener)?;
        check_slot(slot)?;
        if sockets.len() > MAX_SOCKETS_PER_SLOT as usize {
            return Err(SteeringError::TooManySockets {
                count: sockets.len(),
            });
        }
        for socket in sockets {
            check_reuseport(*socket, Some((listener, addr)))?;
        }
        // Shrink the count first so the program never reads a stale entry,
        // then write the sockets, then publish the new count.
        let old = self.read_slot_count(listener, slot)?;
        self.write_slot_count(listener, slot, 0)?;
        for (n, socket) in sockets.iter().enumerate() {
            self.sockets
                .set(socket_index(listener, slot, n as u32), socket, 0)
                .map_err(map_error(map::SOCKETS, "set"))?;
        }
        self.clear_socket_entries(listener, slot, sockets.len() as u32, old)?;
        self.write_slot_count(listener, slot, sockets.len() as u32)?;
        debug!(listener, slot, sockets = sockets.len(), "slot sockets set");
        Ok(())
    }

    fn clear_slot(&mut self, listener: u32, slot: u32) -> Result<()> {
        check_slot(slot)?;
        let old = self.read_slot_count(listener, slot)?;
        self.write_slot_count(listener, slot, 0)?;
        self.clear_socket_entries(listener, slot, 0, old)
    }

    fn set_active(&mut self, listener: u32, slot: Option<u32>) -> Result<()> {
        self.listener_addr(listener)?;
        if let Some(slot) = slot {
            check_slot(slot)?;
        }
        self.write_active(listener, slot.unwrap_or(NO_SLOT))
    }

    fn active(&self, listener: u32) -> Result<Option<u32>> {
        self.listener_addr(listener)?;
        let state = self
            .active
            .get(&listener, 0)
            .map_err(map_error(map::ACTIVE, "get"))?;
        Ok((state.active_slot != NO_SLOT).then_some(state.active_slot))
    }

    fn add_probe(&mut self, listener: u32, port: u16, slot: u32) -> Result<()> {
        self.listener_addr(listener)?;
        check_slot(slot)?;
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
        check_listener_index(listener)?;
        check_slot(slot)?;
        self.read_counters(counter_index(listener, slot))
    }

    fn unmanaged_counters(&self) -> Result<Counters> {
        self.read_counters(reloader_ebpf::UNMANAGED_COUNTER)
    }

    fn reset_counters(&mut self, listener: u32, slot: u32) -> Result<()> {
        check_listener_index(listener)?;
        check_slot(slot)?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); self.cpus])
            .expect("one value per possible CPU");
        self.counters
            .set(counter_index(listener, slot), zero, 0)
            .map_err(map_error(map::COUNTERS, "set"))
    }

    fn entry_counts(&self) -> Result<EntryCounts> {
        let listeners = self.listener_keys.keys().count() as u64;
        let probes = self.probes.keys().count() as u64;
        let mut sockets = 0u64;
        for &listener in self.listeners.keys() {
            for slot in 0..MAX_SLOTS {
                sockets += u64::from(self.read_slot_count(listener, slot)?);
            }
        }
        Ok(EntryCounts {
            listeners,
            sockets,
            probes,
        })
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

/// The maps a restarted controller needs: all of them but aya-log's.
const PINNED: [&str; 6] = [
    map::LISTENER_KEYS,
    map::ACTIVE,
    map::SLOT_SOCKETS,
    map::SOCKETS,
    map::PROBES,
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

fn check_slot(slot: u32) -> Result<()> {
    if slot >= MAX_SLOTS {
        return Err(SteeringError::SlotOutOfRange { slot });
    }
    Ok(())
}

fn check_listener_index(listener: u32) -> Result<()> {
    if listener >= MAX_LISTENERS {
        return Err(SteeringError::UnknownListener { listener });
    }
    Ok(())
}

/// Checks that `socket` has `SO_REUSEPORT` and, when `expected` is given,
/// that it listens on the listener's address.
fn check_reuseport(socket: BorrowedFd<'_>, expected: Option<(u32, SocketAddr)>) -> Result<()> {
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
    if let Some((listener, expected)) = expected {
        if !getsockopt(&socket, sockopt::AcceptConn).map_err(query)? {
            return Err(SteeringError::NotListening { fd });
        }
        if to_std(&local) != Some(expected) {
            return Err(SteeringError::WrongAddress {
                fd,
                listener,
                expected,
                found: local_text,
            });
        }
    }
    Ok(())
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
