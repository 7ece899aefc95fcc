//! The state side of listener tracking (the reload module looks): which
//! generations are tracked, and rewriting a generation's slot with the
//! sockets it holds now.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, BorrowedFd},
    time::Instant,
};

use super::{FoundSocket, InstanceState, RegisteredSocket, epoch_of};
use crate::{error::ReloadError, generation::State, steering::ListenerSpec};

/// A generation whose listeners are tracked.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub number: u64,
    pub pid: u32,
    /// Its cgroup, if it has one (its processes are those in it).
    pub cgroup: Option<std::path::PathBuf>,
    /// The inodes registered for it now.
    pub inodes: BTreeSet<u64>,
    /// The processes that hold them (a server's workers).
    pub holders: BTreeSet<u32>,
}

/// What a refresh did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refreshed {
    Unchanged,
    /// Its slot now holds what it holds.
    Sockets {
        added: usize,
        removed: usize,
    },
    /// The active generation no longer listens on `lost`; the previous one
    /// was made active again (`reinstated`) and this one must drain.
    Demoted {
        lost: ListenerSpec,
        reinstated: u64,
    },
    /// As `Demoted`, but no previous generation could take over.
    LostListener {
        lost: ListenerSpec,
    },
}

impl InstanceState {
    /// Generations whose listeners are tracked: ready and active ones.
    pub fn tracked(&self) -> Vec<Tracked> {
        self.generations
            .live()
            .filter(|g| matches!(g.state, State::Ready | State::Active))
            .filter_map(|g| {
                Some(Tracked {
                    number: g.number,
                    pid: g.pid?,
                    cgroup: self.cgroup(g.number).cloned(),
                    inodes: self
                        .sockets(g.number)
                        .iter()
                        .map(|s| s.socket.inode)
                        .collect(),
                    holders: self
                        .sockets(g.number)
                        .iter()
                        .map(|s| s.holder.pid)
                        .collect(),
                })
            })
            .collect()
    }

    /// Inodes registered for any live generation.
    pub fn registered_inodes(&self) -> BTreeSet<u64> {
        self.generations
            .live()
            .flat_map(|g| self.sockets(g.number).iter().map(|s| s.socket.inode))
            .collect()
    }

    /// Rewrites generation `number`'s slot with `found` (per address, as
    /// `--listen` orders them): what its tree holds now. `listening`: the
    /// inodes listening on the managed addresses now; a previous
    /// generation is reinstated only if its registered sockets are among
    /// them (a draining one may have closed its listeners already, and its
    /// registration is no longer looked at).
    pub fn refresh(
        &mut self,
        number: u64,
        found: Vec<Vec<FoundSocket>>,
        listening: &BTreeSet<u64>,
    ) -> Result<Refreshed, ReloadError> {
        let Some(generation) = self.generations.get(number) else {
            return Ok(Refreshed::Unchanged);
        };
        if !matches!(generation.state, State::Ready | State::Active) {
            return Ok(Refreshed::Unchanged);
        }
        let (slot, active) = (generation.slot, generation.state == State::Active);
        if let Some(i) = found.iter().position(Vec::is_empty) {
            let lost = self.config.listen[i];
            if !active {
                return Ok(Refreshed::LostListener { lost });
            }
            let why = format!("stopped listening on {lost}");
            return Ok(
                match self.reinstate_previous(number, &why, Some(listening)) {
                    Some(reinstated) => {
                        let _ = self.generations.transition(
                            number,
                            State::Draining,
                            Instant::now(),
                            None,
                        );
                        Refreshed::Demoted { lost, reinstated }
                    }
                    None => {
                        if self.not_listening.is_none_or(|n| n.generation != number) {
                            self.not_listening = Some(super::NotListening {
                                generation: number,
                                since: Instant::now(),
                                addr: lost,
                                replacing: false,
                            });
                        }
                        Refreshed::LostListener { lost }
                    }
                },
            );
        }
        if self.not_listening.is_some_and(|n| n.generation == number) {
            // It listens everywhere again.
            self.not_listening = None;
        }
        let before: BTreeSet<u64> = self
            .sockets(number)
            .iter()
            .map(|s| s.socket.inode)
            .collect();
        let mut registered = Vec::new();
        for (i, sockets) in found.iter().enumerate() {
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.copy.as_fd()).collect();
            let first = &sockets[0];
            self.steering
                .set_slot_sockets(i as u32, slot, epoch_of(number), &fds)
                .map_err(|source| ReloadError::RegisterError {
                    addr: self.config.listen[i],
                    pid: first.holder.pid,
                    process: first.process.clone(),
                    fd: first.holder.fd,
                    source: Box::new(source),
                })?;
            self.open_bridge(i, first.copy.as_fd());
            registered.extend(sockets.iter().map(|s| RegisteredSocket {
                listener: i,
                socket: s.socket.clone(),
                holder: s.holder,
            }));
        }
        let after: BTreeSet<u64> = registered.iter().map(|s| s.socket.inode).collect();
        self.sockets.insert(number, registered);
        Ok(if before == after {
            Refreshed::Unchanged
        } else {
            Refreshed::Sockets {
                added: after.difference(&before).count(),
                removed: before.difference(&after).count(),
            }
        })
    }
}
