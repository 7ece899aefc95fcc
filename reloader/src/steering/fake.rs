//! An in-memory [`Steer`] for unprivileged unit tests of the controller:
//! it keeps what the real maps would hold and can be told to fail. Clones
//! share the maps, so a test keeps one to look inside.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::{AsRawFd, BorrowedFd},
    sync::{Arc, Mutex, MutexGuard},
};

use super::{Counters, EntryCounts, Mode, Result, Split, Steer, SteeringError};

/// The fake; clones share [`FakeMaps`].
#[derive(Clone, Debug, Default)]
pub struct FakeSteering(Arc<Mutex<FakeMaps>>);

impl FakeSteering {
    /// The maps, to look at or to set failures.
    pub fn maps(&self) -> MutexGuard<'_, FakeMaps> {
        self.0.lock().expect("fake steering lock")
    }
}

/// What the fake maps hold.
#[derive(Debug, Default)]
pub struct FakeMaps {
    /// (listener, slot) → registered socket fds (as given).
    pub slots: BTreeMap<(u32, u32), Vec<i32>>,
    /// (listener, slot) → epoch of the generation registered there.
    pub epochs: BTreeMap<(u32, u32), u32>,
    /// listener → active slot.
    pub active: HashMap<u32, u32>,
    /// listener → canary slot and weight.
    pub canary: HashMap<u32, (u32, u32)>,
    pub probes: HashMap<(u32, u16), u32>,
    pub counters: HashMap<(u32, u32), Counters>,
    /// Groups attached, by fd.
    pub attached: HashSet<i32>,
    /// `set_active` fails for these listeners.
    pub fail_set_active: HashSet<u32>,
    /// `attach` fails.
    pub fail_attach: bool,
    /// Every `set_split` call's active slot, in order.
    pub cutovers: Vec<(u32, Option<u32>)>,
    /// listener → the bridge's fd, as given.
    pub bridges: HashMap<u32, i32>,
}

impl FakeMaps {
    /// Adds `n` steered connections to (`listener`, `slot`).
    pub fn steer(&mut self, listener: u32, slot: u32, n: u64) {
        self.counters.entry((listener, slot)).or_default().steered += n;
    }
}

fn injected() -> SteeringError {
    SteeringError::MapError {
        map: "fake",
        operation: "injected failure",
        source: aya::maps::MapError::KeyNotFound,
    }
}

impl Steer for FakeSteering {
    fn mode(&self) -> Mode {
        Mode::SelectOrMigrate
    }

    fn attach(&self, socket: BorrowedFd<'_>) -> Result<()> {
        if self.maps().fail_attach {
            return Err(injected());
        }
        let _ = socket.as_raw_fd();
        Ok(())
    }

    fn set_slot_sockets(
        &mut self,
        listener: u32,
        slot: u32,
        epoch: u32,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let mut maps = self.maps();
        maps.slots.insert(
            (listener, slot),
            sockets.iter().map(|s| s.as_raw_fd()).collect(),
        );
        maps.epochs.insert((listener, slot), epoch);
        Ok(())
    }

    fn clear_slot(&mut self, listener: u32, slot: u32) -> Result<()> {
        let mut maps = self.maps();
        maps.slots.remove(&(listener, slot));
        maps.epochs.remove(&(listener, slot));
        Ok(())
    }

    fn set_split(&mut self, listener: u32, split: Split) -> Result<()> {
        let mut maps = self.maps();
        if maps.fail_set_active.contains(&listener) {
            return Err(injected());
        }
        maps.cutovers.push((listener, split.active));
        match split.active {
            Some(slot) => maps.active.insert(listener, slot),
            None => maps.active.remove(&listener),
        };
        match split.canary {
            Some(canary) => maps.canary.insert(listener, canary),
            None => maps.canary.remove(&listener),
        };
        Ok(())
    }

    fn split(&self, listener: u32) -> Result<Split> {
        let maps = self.maps();
        Ok(Split {
            active: maps.active.get(&listener).copied(),
            canary: maps.canary.get(&listener).copied(),
        })
    }

    fn add_probe(&mut self, listener: u32, port: u16, slot: u32) -> Result<()> {
        self.maps().probes.insert((listener, port), slot);
        Ok(())
    }

    fn remove_probe(&mut self, listener: u32, port: u16) -> Result<()> {
        self.maps().probes.remove(&(listener, port));
        Ok(())
    }

    fn counters(&self, listener: u32, slot: u32) -> Result<Counters> {
        Ok(self
            .maps()
            .counters
            .get(&(listener, slot))
            .copied()
            .unwrap_or_default())
    }

    fn reset_counters(&mut self, listener: u32, slot: u32) -> Result<()> {
        self.maps().counters.remove(&(listener, slot));
        Ok(())
    }

    fn unmanaged_counters(&self) -> Result<Counters> {
        Ok(Counters::default())
    }

    fn entry_counts(&self) -> Result<EntryCounts> {
        let maps = self.maps();
        Ok(EntryCounts {
            listeners: maps.active.len() as u64,
            sockets: maps.slots.values().map(|v| v.len() as u64).sum(),
            probes: maps.probes.len() as u64,
        })
    }

    fn set_bridge(&mut self, listener: u32, socket: BorrowedFd<'_>) -> Result<()> {
        self.maps().bridges.insert(listener, socket.as_raw_fd());
        Ok(())
    }

    fn bridged(&self, _listener: u32) -> Result<u64> {
        Ok(0)
    }
}
