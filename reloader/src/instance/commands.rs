//! The owner's side of the state [`Command`]s its tasks send: each is
//! carried out in one step, against the state it owns, and answered.

use std::time::Instant;

use super::owner::Owner;
use crate::{
    reload::Host,
    state::{Activated, Command},
    status::RollbackReason,
};

impl<H: Host> Owner<H> {
    /// Carries out one state command.
    pub(super) fn apply(&mut self, command: Command) {
        match command {
            Command::Begin {
                config_sha256,
                reply,
            } => {
                let begun = self.state.begin(Instant::now());
                if let Ok(begun) = &begun {
                    self.state.set_config_sha256(begun.number, config_sha256);
                    if let Some(evicted) = begun.evicted {
                        self.spawn_eviction(evicted);
                    }
                }
                let _ = reply.send(begun);
            }
            Command::Spawned {
                number,
                process,
                stderr,
                cgroup,
                reply,
            } => {
                if let Some(dir) = cgroup {
                    self.state.set_cgroup(number, dir);
                }
                let spawned = self.state.spawned(number, process, stderr);
                // Published before the answer: the reload then waits for
                // the state file to name this pid (`Client::persisted`).
                self.publish();
                let _ = reply.send(spawned);
            }
            Command::Register {
                number,
                found,
                reply,
            } => {
                let _ = reply.send(self.state.register(number, found));
            }
            Command::AddProbe {
                number,
                listener,
                port,
                reply,
            } => {
                let _ = reply.send(self.state.add_probe(number, listener, port));
            }
            Command::RemoveProbe { listener, port } => self.state.remove_probe(listener, port),
            Command::Activate {
                number,
                ready,
                canary,
                reply,
            } => {
                let cutover = match &canary {
                    Some(plan) => self.state.start_canary(number, ready, plan),
                    None => self.state.cut_over(number, ready),
                };
                let activated = cutover.map(|cutover| Activated {
                    cutover,
                    canary: self.state.canary() == Some(number),
                });
                let _ = reply.send(activated);
            }
            Command::Fail {
                number,
                error,
                reply,
            } => {
                let _ = reply.send(self.state.fail(number, &error));
            }
            Command::DrainSignal { number, reply } => {
                let _ = reply.send(self.state.drain_signal(number));
            }
            Command::DrainBegun { number, reply } => {
                let _ = reply.send(self.state.drain_begun(number));
            }
            Command::Kill { number } => self.state.kill(number),
            Command::KillEvicted { number } => self.state.kill_evicted(number),
            Command::OverMemory { usage } => {
                if let Some(evicted) = self.state.over_memory(&usage) {
                    self.spawn_eviction(evicted);
                }
            }
            Command::Abandon { number, waited } => self.state.abandon(number, waited),
            Command::Refresh {
                number,
                found,
                listening,
                reply,
            } => {
                let refreshed = self.state.refresh(number, found, &listening);
                if let Ok(crate::state::Refreshed::Demoted { .. }) = &refreshed {
                    self.spawn_drain(number);
                }
                let _ = reply.send(refreshed);
            }
            Command::ReleaseBridges { listening } => {
                self.state.release_bridges(Some(&listening));
            }
            Command::HealthChecked { number, result } => {
                if self.state.health_checked(number, result) {
                    self.roll_back(RollbackReason::Health, false, None, Some(number));
                }
            }
            Command::AdvanceCanary { number, now } => {
                self.state.advance_canary(number, now);
            }
            Command::SampleRates { now } => self.state.sample_rates(now),
            Command::Status { reply } => {
                let _ = reply.send(self.state.status());
            }
        }
    }
}
