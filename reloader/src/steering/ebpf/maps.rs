//! Listener registration on [`Steering`] and the map reads and writes every
//! steering operation is built of: a listener's state (active slot, canary
//! and weight, written in one hash map update so the program sees the old or
//! the new whole), a slot's size and epoch, its socket entries, and the
//! per-CPU counters.
//!
//! Kernel behaviour this relies on: a `REUSEPORT_SOCKARRAY` entry does not
//! keep its socket alive: it is cleared when the socket closes (and clearing
//! it then reports `ENOENT`). So the controller never needs to keep its own
//! copy of a generation's listener once it is registered, and must not (a
//! copy would keep the listener, and its queue, alive after the generation
//! exits).

use aya::maps::MapError;
use reloader_ebpf::{
    Counters, ListenerHints, ListenerKey, ListenerState, Mode as ListenerMode, NO_SLOT, SlotState,
    counter_index, map, socket_index,
};
use tracing::debug;

use super::{Steering, map_error};
use crate::steering::{
    ListenerSpec, Result, Split, Steer, SteeringError,
    keys::{index_table, index_writes},
    listener_key,
};

impl Steering {
    /// Takes over listener `listener` as a previous controller registered
    /// it: its slots and state stay as they are.
    pub fn adopt_listener(&mut self, listener: u32, spec: impl Into<ListenerSpec>) -> Result<()> {
        let spec = spec.into();
        self.check_listener_index(listener)?;
        // Maps pinned by a binary of layout 1 or 2 come without
        // `LISTENER_HINTS` (the load creates it empty): the hints are
        // written here, before the program this binary loaded is attached
        // to any group (at the next registration).
        self.write_hints(listener, spec.mode)?;
        let key = self.key_for(&spec);
        self.listener_keys
            .insert(key, listener, 0)
            .map_err(map_error(map::LISTENER_KEYS, "insert"))?;
        self.listeners.insert(listener, spec);
        self.sync_index()
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
        self.write_hints(listener, spec.mode)?;
        let replaced = self.listeners.insert(listener, spec);
        // The index first: it may name the new key before `LISTENER_KEYS`
        // does (its state is written), and stops naming the old one
        // before `LISTENER_KEYS` forgets it.
        self.sync_index()?;
        if let Some(old) = replaced {
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
        self.sync_index()?;
        let key = self.key_for(&spec);
        self.listener_keys
            .remove(&key)
            .map_err(map_error(map::LISTENER_KEYS, "remove"))?;
        match self.states.remove(&listener) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(map_error(map::LISTENERS, "remove")(error)),
        }
        self.hints
            .set(listener, ListenerHints::default(), 0)
            .map_err(map_error(map::LISTENER_HINTS, "set"))?;
        for slot in 0..self.limits.slots {
            self.clear_slot(listener, slot)?;
        }
        Ok(())
    }

    /// Brings `LISTENER_INDEX` in step with the registered listeners
    /// (`keys::index_table`), in writes a concurrent program run cannot
    /// misread (`keys::index_writes`).
    fn sync_index(&mut self) -> Result<()> {
        let keys: Vec<_> = self
            .listeners
            .iter()
            .map(|(&listener, spec)| (listener, self.key_for(spec)))
            .collect();
        let wanted = index_table(self.limits.index_entries(), keys);
        for (i, value) in index_writes(&self.index_now, &wanted) {
            self.index
                .set(i, value, 0)
                .map_err(map_error(map::LISTENER_INDEX, "set"))?;
            self.index_now[i as usize] = value;
        }
        Ok(())
    }

    pub(super) fn read_counters(&self, index: u32) -> Result<Counters> {
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

    pub(super) fn key_for(&self, spec: &ListenerSpec) -> ListenerKey {
        listener_key(self.mode, spec)
    }

    pub(super) fn spec(&self, listener: u32) -> Result<ListenerSpec> {
        self.listeners
            .get(&listener)
            .copied()
            .ok_or(SteeringError::UnknownListener { listener })
    }

    pub(super) fn check_listener_index(&self, listener: u32) -> Result<()> {
        if listener >= self.limits.listeners {
            return Err(SteeringError::UnknownListener { listener });
        }
        Ok(())
    }

    pub(super) fn check_slot(&self, slot: u32) -> Result<()> {
        if slot >= self.limits.slots {
            return Err(SteeringError::SlotOutOfRange {
                slot,
                slots: self.limits.slots,
            });
        }
        Ok(())
    }

    pub(super) fn read_state(&self, listener: u32) -> Result<ListenerState> {
        match self.states.get(&listener, 0) {
            Ok(state) => Ok(state),
            Err(MapError::KeyNotFound) => Ok(ListenerState::default()),
            Err(error) => Err(map_error(map::LISTENERS, "get")(error)),
        }
    }

    /// Writes the whole state of `listener` in one update (a hash map
    /// element is replaced at once: the program sees the old or the new).
    pub(super) fn write_state(
        &mut self,
        listener: u32,
        spec: &ListenerSpec,
        split: Split,
    ) -> Result<()> {
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

    /// Writes `listener`'s hints: `mode`, and how many probe routes
    /// `PROBES` holds for it, counted there (a route is inserted before
    /// it is counted and removed before it is no longer counted, so the
    /// program never skips a route that exists).
    pub(super) fn write_hints(&mut self, listener: u32, mode: ListenerMode) -> Result<()> {
        self.check_listener_index(listener)?;
        let mut probes = 0;
        for key in self.probes.keys() {
            if key.map_err(map_error(map::PROBES, "iterate"))?.listener == listener {
                probes += 1;
            }
        }
        self.hints
            .set(
                listener,
                ListenerHints {
                    probes,
                    mode: mode as u32,
                },
                0,
            )
            .map_err(map_error(map::LISTENER_HINTS, "set"))
    }

    pub(super) fn slot_state(&self, listener: u32, slot: u32) -> Result<SlotState> {
        self.check_listener_index(listener)?;
        self.slot_sockets
            .get(&counter_index(self.limits.slots, listener, slot), 0)
            .map_err(map_error(map::SLOT_SOCKETS, "get"))
    }

    pub(super) fn write_slot_state(
        &mut self,
        listener: u32,
        slot: u32,
        state: SlotState,
    ) -> Result<()> {
        self.check_listener_index(listener)?;
        self.slot_sockets
            .set(counter_index(self.limits.slots, listener, slot), state, 0)
            .map_err(map_error(map::SLOT_SOCKETS, "set"))
    }

    /// Clears the entries `from..to` of (`listener`, `slot`): only what was
    /// published, so emptying a slot costs one syscall per socket it held,
    /// not one per possible socket.
    pub(super) fn clear_socket_entries(
        &mut self,
        listener: u32,
        slot: u32,
        from: u32,
        to: u32,
    ) -> Result<()> {
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
