//! The instance's bridge listeners (see [`crate::steering::bridge`]): one
//! per managed TCP address, opened from the first server socket registered
//! there, and replaced whenever it holds connections while the active
//! generation has sockets on that address, so its queue migrates to them.
//!
//! A replaced bridge is closed [`RETIRE_AFTER`] later, not at once. A
//! listener that closes while a handshake on it completes can lose that
//! connection, whatever the program does (docs/how-it-works.md, "Design
//! notes", traced on 6.18): the final ACK's processing passed the
//! listener's state check before the close and finds it closed when it
//! queues the new socket,
//! which is then reset, not migrated; or the new socket was cloned in the
//! instant between `__tcp_close` setting the listener's `sk_shutdown` and
//! the listener leaving its group, and sends a FIN at once. Once replaced,
//! the old bridge gets no new SYN (the program selects the new one, or the
//! generation's sockets); the handshakes it already started complete within
//! a round trip and join its accept queue, which migrates when it closes.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
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

/// How long a bridge holds connections while no generation listens on
/// its address before it gives up on them. Long enough for a crashed
/// generation's restart (backoff from 100 ms, then its start) or a
/// recycled worker's replacement; short enough that a server that stopped
/// listening for good does not keep clients waiting on connects that
/// cannot complete.
pub const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// How long a replaced bridge stays open, receiving no new SYN, so the
/// handshakes it started complete before it closes: many loopback or LAN
/// round trips, and a busy VM's scheduling delays, at the cost of that
/// much more wait for what it holds.
pub const RETIRE_AFTER: Duration = Duration::from_millis(50);

/// A listener's bridge: open, or closed after [`HOLD_LIMIT`] until a
/// generation listens again.
#[derive(Debug)]
pub struct Held {
    bridge: Option<Bridge>,
    shape: Shape,
    /// Since when it has held connections with no generation listening.
    stuck_since: Option<Instant>,
    /// Replaced bridges, closed [`RETIRE_AFTER`] after their replacement.
    retiring: Vec<(Bridge, Instant)>,
}

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
                let shape = bridge.shape();
                self.bridges.insert(
                    listener,
                    Held {
                        bridge: Some(bridge),
                        shape,
                        stuck_since: None,
                        retiring: Vec::new(),
                    },
                );
            }
            Err(error) => {
                warn!(%addr, error = %crate::error_chain(&error), "no bridge listener");
                self.no_bridge.insert(listener);
            }
        }
    }

    /// Opens the bridges of an adopted instance, each shaped like its
    /// template (a copy of the adopted active generation's socket on that
    /// address; `None`: none could be copied, the bridge opens at the next
    /// registration).
    pub fn open_bridges(&mut self, templates: Vec<Option<std::os::fd::OwnedFd>>) {
        for (listener, template) in templates.into_iter().enumerate() {
            if let Some(template) = template {
                self.open_bridge(listener, template.as_fd());
            }
        }
    }

    /// Looks at every bridge: one that holds connections while the active
    /// generation has a registered socket on its address that is still
    /// listening (its inode in `listening`; `None`: found listening just
    /// now, at a cutover) is replaced, and the old one's queue migrates to
    /// them through the program. One that has held connections for
    /// [`HOLD_LIMIT`] with no generation listening is closed (what it holds
    /// is reset, as without it) and reopened once one listens again: a
    /// server that stopped listening for good gets its clients refused,
    /// not kept waiting. Returns how many connections were handed over.
    pub fn release_bridges(&mut self, listening: Option<&BTreeSet<u64>>) -> u64 {
        let active = self.generations.active().map(|g| g.number);
        let mut released = 0;
        let listeners: Vec<usize> = self.bridges.keys().copied().collect();
        for held in self.bridges.values_mut() {
            // Dropping a retired bridge closes it: its queue migrates.
            held.retiring
                .retain(|(_, since)| since.elapsed() < RETIRE_AFTER);
        }
        for listener in listeners {
            let live = active.is_some_and(|active| {
                self.sockets(active).iter().any(|s| {
                    s.listener == listener && listening.is_none_or(|l| l.contains(&s.socket.inode))
                })
            });
            let addr = self.config.listen[listener].addr;
            let held = &self.bridges[&listener];
            let Some(bridge) = &held.bridge else {
                if live {
                    self.reopen_bridge(listener);
                }
                continue;
            };
            let queued = match bridge.queued() {
                Ok(queued) => queued,
                Err(error) => {
                    warn!(%addr, %error, "cannot read the bridge's queue");
                    continue;
                }
            };
            if queued == 0 {
                self.bridges.get_mut(&listener).expect("listed").stuck_since = None;
                continue;
            }
            if !live {
                let held = self.bridges.get_mut(&listener).expect("listed");
                let since = *held.stuck_since.get_or_insert_with(Instant::now);
                // A new generation is on its way: hold on for it.
                let replacing = self.not_listening.is_some_and(|n| n.replacing);
                if since.elapsed() >= HOLD_LIMIT && !replacing {
                    warn!(
                        %addr,
                        connections = queued,
                        "no generation has listened there for {}: closing the bridge listener \
                         (what it held is reset; new connections are refused until a generation \
                         listens again)",
                        crate::generation::human_duration(HOLD_LIMIT)
                    );
                    held.bridge = None;
                    held.stuck_since = None;
                }
                continue;
            }
            let replacement = match Bridge::open(held.shape) {
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
            // The old one closes at a look RETIRE_AFTER from now (its
            // queue migrates then); it gets no new SYN meanwhile.
            let held = self.bridges.get_mut(&listener).expect("listed");
            if let Some(old) = held.bridge.replace(replacement) {
                held.retiring.push((old, Instant::now()));
            }
            held.stuck_since = None;
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

    /// Whether a bridge holds connections that no generation can take yet,
    /// or a replaced one waits to be closed: the tracker looks often then.
    pub fn bridge_waiting(&self) -> bool {
        self.bridges
            .values()
            .any(|h| h.stuck_since.is_some() || !h.retiring.is_empty())
    }

    /// Opens `listener`'s bridge again after [`HOLD_LIMIT`] closed it.
    fn reopen_bridge(&mut self, listener: usize) {
        let addr = self.config.listen[listener].addr;
        let shape = self.bridges[&listener].shape;
        let opened = Bridge::open(shape)
            .map_err(|e| e.to_string())
            .and_then(|bridge| {
                self.steering
                    .set_bridge(listener as u32, bridge.as_fd())
                    .map(|()| bridge)
                    .map_err(|e| crate::error_chain(&e))
            });
        match opened {
            Ok(bridge) => {
                info!(%addr, "a generation listens again: bridge listener open again");
                self.bridges.get_mut(&listener).expect("listed").bridge = Some(bridge);
            }
            Err(error) => warn!(%addr, %error, "cannot open the bridge listener again"),
        }
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
            self.bridges
                .get(&listener)
                .is_some_and(|h| h.bridge.is_some()),
            self.steering.bridged(listener as u32).unwrap_or_default(),
        )
    }
}
