//! `reloader rollback` and automatic rollbacks: the canary gets nothing
//! more, or the held generation is active again.

use std::time::{Duration, Instant};

use tracing::warn;

use super::{super::InstanceState, CanaryVerdict, rollback_why};
use crate::{error::RolloutError, generation::State, status::RollbackReason, steering::Split};

/// A rollback that was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolledBack {
    /// No longer receives new connections; drains.
    pub from: u64,
    /// Receives them again.
    pub to: u64,
    pub reason: RollbackReason,
    /// How long the map updates took.
    pub map_update: Duration,
}

impl InstanceState {
    /// `reloader rollback` (or an automatic one): the canary gets nothing
    /// more, or the held generation is active again. The generation rolled
    /// back from is left draining, unsignalled: the caller drains it.
    pub fn rollback(&mut self, reason: RollbackReason) -> Result<RolledBack, RolloutError> {
        if let Some(c) = self.canary.clone() {
            let active = self.generations.get(c.previous).map(|g| g.slot);
            let canary_slot = self.generations.get(c.generation).map(|g| g.slot);
            let undo = Split {
                active,
                canary: canary_slot.map(|s| (s, c.weight())),
            };
            let t0 = Instant::now();
            self.set_split_everywhere(
                Split {
                    active,
                    canary: None,
                },
                undo,
            )
            .map_err(|(addr, source)| RolloutError::SteeringError {
                addr,
                what: "rolling back the canary failed",
                source,
            })?;
            let map_update = t0.elapsed();
            let now = Instant::now();
            self.canary = None;
            self.rates.clear();
            let _ = self
                .generations
                .transition(c.generation, State::Draining, now, None);
            let _ = self.generations.roll_back(c.generation);
            self.stats.rollbacks.add(reason);
            self.canary_verdicts.insert(
                c.generation,
                CanaryVerdict::RolledBack {
                    reason,
                    why: rollback_why(reason),
                },
            );
            warn!(
                generation = c.generation,
                %reason,
                "canary rolled back: generation {} gets every new connection", c.previous
            );
            return Ok(RolledBack {
                from: c.generation,
                to: c.previous,
                reason,
                map_update,
            });
        }
        let Some(hold) = self.hold else {
            return Err(RolloutError::NothingToRollBack {
                active: self.active(),
            });
        };
        let held = self
            .generations
            .get(hold.held)
            .filter(|g| g.state == State::Draining && g.timeline.signalled.is_none())
            .map(|g| g.slot);
        let Some(held_slot) = held else {
            self.hold = None;
            return Err(RolloutError::NothingToRollBack {
                active: self.active(),
            });
        };
        let covered: std::collections::BTreeSet<usize> =
            self.sockets(hold.held).iter().map(|s| s.listener).collect();
        if covered.len() < self.config.listen.len() {
            return Err(RolloutError::HeldLostListeners {
                held: hold.held,
                missing: (0..self.config.listen.len())
                    .filter(|i| !covered.contains(i))
                    .map(|i| self.config.listen[i])
                    .collect(),
            });
        }
        let successor_slot = self.generations.get(hold.successor).map(|g| g.slot);
        let t0 = Instant::now();
        self.set_split_everywhere(
            Split {
                active: Some(held_slot),
                canary: None,
            },
            Split {
                active: successor_slot,
                canary: None,
            },
        )
        .map_err(|(addr, source)| RolloutError::SteeringError {
            addr,
            what: "rollback failed",
            source,
        })?;
        let map_update = t0.elapsed();
        let now = Instant::now();
        self.hold = None;
        let _ = self
            .generations
            .transition(hold.successor, State::Draining, now, None);
        let _ = self.generations.roll_back(hold.successor);
        let _ = self
            .generations
            .transition(hold.held, State::Active, now, None);
        self.stats.rollbacks.add(reason);
        self.reinstated.insert(
            hold.successor,
            super::super::Reinstated {
                previous: hold.held,
                why: format!("was rolled back ({})", rollback_why(reason)),
                rolled_back: true,
                health: reason == RollbackReason::Health,
            },
        );
        if let Some(last) = self
            .last_reload
            .as_mut()
            .filter(|r| r.generation == hold.successor)
        {
            last.result = crate::status::ReloadResult::RolledBack;
            let detail = format!("during the hold ({})", rollback_why(reason));
            last.failure = Some(crate::error::ReloadFailure {
                kind: if reason == RollbackReason::Health {
                    crate::error::FailureKind::RolledBackByHealth
                } else {
                    crate::error::FailureKind::RolledBack
                },
                detail: detail.clone(),
                active: Some(hold.held),
            });
            last.error = Some(detail);
        }
        warn!(
            generation = hold.held,
            from = hold.successor,
            %reason,
            "rolled back: active again"
        );
        Ok(RolledBack {
            from: hold.successor,
            to: hold.held,
            reason,
            map_update,
        })
    }

    /// Sets `split` on every listener; if one update fails, the listeners
    /// already changed go back to `undo` (nothing changed), and the failing
    /// listener's address is returned with the error.
    pub(in crate::state) fn set_split_everywhere(
        &mut self,
        split: Split,
        undo: Split,
    ) -> Result<
        (),
        (
            crate::steering::ListenerSpec,
            Box<crate::steering::SteeringError>,
        ),
    > {
        let mut done = Vec::new();
        for listener in self.listeners() {
            if let Err(error) = self.steering.set_split(listener, split) {
                for l in done {
                    let _ = self.steering.set_split(l, undo);
                }
                return Err((self.config.listen[listener as usize], Box::new(error)));
            }
            done.push(listener);
        }
        Ok(())
    }
}
