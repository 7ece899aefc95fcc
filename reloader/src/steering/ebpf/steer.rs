//! The [`Steer`] operations on the loaded maps: attaching the program to a
//! group, filling and emptying slots, the split (the cutover and canary
//! weights), probe routes, bridges, counters and flows.
//!
//! Kernel behaviour this relies on: a socket can be in one entry of a
//! `REUSEPORT_SOCKARRAY` only (`EBUSY` elsewhere), and entries cannot be read
//! back (the map's values are fds), so [`Steering`] keeps each slot's layout
//! (the sockets' cookies) itself.

use std::os::fd::{AsRawFd, BorrowedFd};

use aya::{
    maps::{MapError, PerCpuValues},
    programs::SkReuseport,
};
use reloader_ebpf::{
    Counters, NO_SLOT, ProbeKey, ProbeTarget, SlotState, counter_index, map, socket_index,
};
use tracing::debug;

use super::{
    Steering, map_error,
    socket::{check_socket, cookie},
};
use crate::steering::{EntryCounts, Mode, Result, Split, Steer, SteeringError};

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
        let spec = self.spec(listener)?;
        self.check_slot(slot)?;
        let key = ProbeKey {
            listener,
            port: u32::from(port),
        };
        let target = ProbeTarget { slot, _pad: 0 };
        self.probes
            .insert(key, target, 0)
            .map_err(map_error(map::PROBES, "insert"))?;
        // The program looks at `PROBES` only while the hints count a route.
        self.write_hints(listener, spec.mode)
    }

    fn remove_probe(&mut self, listener: u32, port: u16) -> Result<()> {
        let key = ProbeKey {
            listener,
            port: u32::from(port),
        };
        match self.probes.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(map_error(map::PROBES, "remove")(error)),
        }
        match self.spec(listener) {
            Ok(spec) => self.write_hints(listener, spec.mode),
            // A route of a listener removed since: its hints were cleared.
            Err(_) => Ok(()),
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

    fn migration_log(&self) -> Option<crate::steering::MigrationLog> {
        Some(Steering::migration_log(self))
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
