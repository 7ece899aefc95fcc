//! The instance's bridge listeners (see [`crate::steering::bridge`]): one
//! per managed TCP address, opened from the first server socket registered
//! there, and replaced whenever it holds connections while the active
//! generation has sockets on that address, so its queue migrates to them.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, BorrowedFd},
};

use tracing::{info, warn};

use super::InstanceState;
use crate::{
    net::Transport,
    steering::{
        Mode,
        bridge::{Bridge, Shape},
    },
};

impl InstanceState {
    /// Opens listener `listener`'s bridge, shaped like `template` (a server
    /// socket just registered), unless it has one or cannot have one (said
    /// once per listener).
    pub(super) fn open_bridge(&mut self, listener: usize, template: BorrowedFd<'_>) {
        if self.bridges.contains_key(&listener)
            || self.no_bridge.contains(&listener)
            || self.steering.mode() != Mode::SelectOrMigrate
            || self.config.listen[listener].transport != Transport::Tcp
        {
            return;
        }
        let addr = self.config.listen[listener].addr;
        let opened = Shape::of(template).and_then(Bridge::open);
        let bridge = match opened {
            Ok(bridge) => bridge,
            Err(error) => {
                warn!(
                    %addr,
                    %error,
                    "no bridge listener: connections that arrive while no generation listens \
                     there are left to the kernel"
                );
                self.no_bridge.insert(listener);
                return;
            }
        };
        // Attached through the bridge too: should every server socket be
        // closing at this instant, the bridge starts a group of its own,
        // and that one must steer as well.
        let set = self
            .steering
            .attach(bridge.as_fd())
            .and_then(|()| self.steering.set_bridge(listener as u32, bridge.as_fd()));
        match set {
            Ok(()) => {
                info!(%addr, "bridge listener open: holds connections while no generation listens");
                self.bridges.insert(listener, bridge);
            }
            Err(error) => {
                warn!(%addr, error = %crate::error_chain(&error), "no bridge listener");
                self.no_bridge.insert(listener);
            }
        }
    }

    /// Replaces each bridge that holds connections while the active
    /// generation has a registered socket on its address that is still
    /// listening (its inode in `listening`): the old bridge's queue
    /// migrates to them through the program. Returns how many connections
    /// were handed over.
    /// `None`: the registered sockets were found listening just now (a
    /// cutover).
    pub fn release_bridges(&mut self, listening: Option<&BTreeSet<u64>>) -> u64 {
        let Some(active) = self.generations.active().map(|g| g.number) else {
            return 0;
        };
        let mut released = 0;
        let listeners: Vec<usize> = self.bridges.keys().copied().collect();
        for listener in listeners {
            let queued = match self.bridges[&listener].queued() {
                Ok(queued) => queued,
                Err(error) => {
                    warn!(listener, %error, "cannot read the bridge's queue");
                    continue;
                }
            };
            let live = self.sockets(active).iter().any(|s| {
                s.listener == listener && listening.is_none_or(|l| l.contains(&s.socket.inode))
            });
            if queued == 0 || !live {
                continue;
            }
            let addr = self.config.listen[listener].addr;
            let replacement = match self.bridges[&listener].replace() {
                Ok(bridge) => bridge,
                Err(error) => {
                    // Keep the old one: closing it now would reset its
                    // queue if the generation's sockets closed meanwhile.
                    warn!(%addr, %error, "cannot replace the bridge listener");
                    continue;
                }
            };
            if let Err(error) = self
                .steering
                .set_bridge(listener as u32, replacement.as_fd())
            {
                warn!(%addr, error = %crate::error_chain(&error), "cannot replace the bridge listener");
                continue;
            }
            // Dropping the old bridge closes it: its queue migrates.
            self.bridges.insert(listener, replacement);
            released += u64::from(queued);
            info!(
                %addr,
                generation = active,
                connections = queued,
                "handed what the bridge held to the active generation"
            );
        }
        self.stats.bridge_released += released;
        released
    }

    /// Closes every bridge and opens none again: the instance stops, and a
    /// connection that finds no generation listening is refused at once
    /// rather than held until the controller exits. What a bridge holds
    /// now migrates to a generation that still listens.
    pub(super) fn close_bridges(&mut self) {
        self.no_bridge.extend(0..self.config.listen.len());
        self.bridges.clear();
    }

    /// Whether `listener` has a bridge, and the connections the program
    /// sent to it.
    pub(super) fn bridge_status(&self, listener: usize) -> (bool, u64) {
        (
            self.bridges.contains_key(&listener),
            self.steering.bridged(listener as u32).unwrap_or_default(),
        )
    }
}
