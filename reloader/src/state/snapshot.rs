//! [`Snapshot`]: what the owner of an instance's state publishes after
//! every command it carried out, on a `watch` channel. Tasks that wait for
//! something to happen (a generation to exit, a hold to end, a canary's
//! verdict, a free slot) look at the latest snapshot and wait for the next
//! one; none of them can see the state half-changed, and none holds a lock.
//! The persister writes [`Snapshot::saved`] whenever its version changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use super::{CanaryPhase, InstanceState, Tracked, saved::Saved};
use crate::{
    error::ReloadError, generation::State, listen::ListenerSpec, status::Readiness,
    steering::ListenerMode,
};

/// One generation as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationView {
    pub state: State,
    pub pid: Option<u32>,
    /// It was sent the drain signal.
    pub signalled: bool,
    /// How it ended (`None` while it runs).
    ended: Option<Ended>,
    /// Inodes of its sockets on stateless UDP listeners (their queues are
    /// read before it is told to drain).
    pub stateless_udp: BTreeSet<u64>,
    /// Inodes of its TCP listening sockets (their accept queues are read
    /// while it settles).
    pub tcp_listeners: BTreeSet<u64>,
    /// Its cgroup, where it has one.
    pub cgroup: Option<std::path::PathBuf>,
    /// It is being evicted (`--drain-evict`, `--max-draining-memory`).
    pub evicting: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ended {
    /// It exited before it was ready, like so.
    BeforeReady(String),
    /// Its outcome.
    Outcome(String),
}

/// The instance as its owner last left it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub stopping: bool,
    pub active: Option<u64>,
    pub canary: Option<u64>,
    /// The number the next generation will get.
    pub next_generation: u64,
    generations: BTreeMap<u64, GenerationView>,
    /// Until when each held generation is held.
    holds: BTreeMap<u64, Instant>,
    canary_phases: BTreeMap<u64, CanaryPhase>,
    /// Generations whose listeners are tracked.
    pub tracked: Vec<Tracked>,
    /// Inodes registered for any live generation.
    pub registered: BTreeSet<u64>,
    /// A bridge holds connections no generation can take yet.
    pub bridge_waiting: bool,
    /// The steering program migrates a closing listener's queue and
    /// handshakes (select-or-migrate).
    pub migrates: bool,
    /// Generations that ended with processes left in their cgroup.
    members_left: BTreeSet<u64>,
    /// Generations to health-check now (empty: no rollback is possible).
    pub health_targets: Vec<u64>,
    /// Managed addresses the active generation does not listen on now
    /// (every one while none is active).
    pub unserved: Vec<ListenerSpec>,
    /// The state file's content, and a version that grows whenever it
    /// changes.
    pub saved: Arc<Saved>,
    pub saved_version: u64,
}

impl Snapshot {
    /// The cgroups of the draining generations not being evicted, oldest
    /// first (what `--max-draining-memory` reads).
    pub fn draining_cgroups(&self) -> Vec<(u64, std::path::PathBuf)> {
        self.generations
            .iter()
            .filter(|(_, g)| g.state == State::Draining && !g.evicting)
            .filter_map(|(&n, g)| Some((n, g.cgroup.clone()?)))
            .collect()
    }

    /// Whether the instance serves every managed address now.
    pub fn readiness(&self) -> Readiness {
        match (self.stopping, self.active, self.unserved.first()) {
            (true, _, _) => Readiness::Stopping,
            (false, None, _) => Readiness::NoneActive,
            (false, Some(generation), Some(addr)) => Readiness::NotListening {
                generation,
                addr: *addr,
            },
            (false, Some(generation), None) => Readiness::Ready { generation },
        }
    }

    /// Generation `number`, if it is known.
    pub fn generation(&self, number: u64) -> Option<&GenerationView> {
        self.generations.get(&number)
    }

    /// Whether generation `number` is in `state`.
    pub fn is(&self, number: u64, state: State) -> bool {
        self.generation(number).is_some_and(|g| g.state == state)
    }

    /// Whether generation `number` has ended (or was never known), and no
    /// process of it is left in its cgroup.
    pub fn ended(&self, number: u64) -> bool {
        self.generation(number).is_none_or(|g| !g.state.is_live())
            && !self.members_left.contains(&number)
    }

    /// Live generations (number, state), oldest first.
    pub fn live(&self) -> Vec<(u64, State)> {
        self.generations
            .iter()
            .filter(|(_, g)| g.state.is_live())
            .map(|(n, g)| (*n, g.state))
            .collect()
    }

    /// Until when generation `number` is held, if it is.
    pub fn hold_until(&self, number: u64) -> Option<Instant> {
        self.holds.get(&number).copied()
    }

    /// Where canary `number` stands.
    pub fn canary_phase(&self, number: u64) -> CanaryPhase {
        self.canary_phases
            .get(&number)
            .cloned()
            .unwrap_or_else(|| CanaryPhase::Ended(super::CanaryVerdict::ended()))
    }

    /// Fails unless generation `number` still runs, saying how it ended.
    pub fn check_alive(&self, number: u64) -> Result<(), ReloadError> {
        match self.generation(number) {
            Some(g) if g.state.is_live() => Ok(()),
            Some(GenerationView {
                ended: Some(Ended::BeforeReady(how)),
                ..
            }) => Err(ReloadError::ExitedBeforeReady {
                how: how.clone(),
                hint: super::daemonize_hint(how),
            }),
            Some(g) => Err(ReloadError::Ended {
                generation: number,
                outcome: match &g.ended {
                    Some(Ended::Outcome(outcome)) => outcome.clone(),
                    _ => g.state.to_string(),
                },
            }),
            None => Err(ReloadError::Ended {
                generation: number,
                outcome: "forgotten".into(),
            }),
        }
    }
}

impl InstanceState {
    /// The snapshot of the state now; `saved` is the state file's content
    /// with its version (made by the owner, which knows when it changed).
    pub fn snapshot(&self, saved: Arc<Saved>, saved_version: u64) -> Snapshot {
        let generations = self
            .generations
            .all()
            .iter()
            .map(|g| {
                let ended = (!g.state.is_live()).then(|| match self.early_exits.get(&g.number) {
                    Some(how) => Ended::BeforeReady(how.clone()),
                    None => {
                        Ended::Outcome(g.outcome.clone().unwrap_or_else(|| g.state.to_string()))
                    }
                });
                let stateless_udp = self
                    .sockets(g.number)
                    .iter()
                    .filter(|r| self.config.listen[r.listener].mode == ListenerMode::UdpStateless)
                    .map(|r| r.socket.inode)
                    .collect();
                let tcp_listeners = self
                    .sockets(g.number)
                    .iter()
                    .filter(|r| r.socket.transport == crate::net::Transport::Tcp)
                    .map(|r| r.socket.inode)
                    .collect();
                let view = GenerationView {
                    state: g.state,
                    pid: g.pid,
                    signalled: g.timeline.signalled.is_some(),
                    ended,
                    stateless_udp,
                    tcp_listeners,
                    cgroup: self.cgroup(g.number).cloned(),
                    evicting: self.evicting(g.number).is_some(),
                };
                (g.number, view)
            })
            .collect();
        let canary_phases = self
            .canary
            .iter()
            .map(|c| c.generation)
            .chain(self.canary_verdicts.keys().copied())
            .map(|n| (n, self.canary_phase(n)))
            .collect();
        Snapshot {
            stopping: self.stopping,
            active: self.active(),
            canary: self.canary(),
            next_generation: self.next_generation(),
            generations,
            holds: self.hold.iter().map(|h| (h.held, h.until)).collect(),
            canary_phases,
            tracked: self.tracked(),
            registered: self.registered_inodes(),
            bridge_waiting: self.bridge_waiting(),
            migrates: self.steering.mode() == crate::steering::Mode::SelectOrMigrate,
            members_left: self.members_left().clone(),
            health_targets: self.health_targets(),
            unserved: self.unserved(),
            saved,
            saved_version,
        }
    }

    /// Managed addresses the active generation does not listen on: none
    /// of its registered sockets is for them, or it stopped listening
    /// there (its sockets stay registered until it listens again or is
    /// replaced). Every address while no generation is active.
    fn unserved(&self) -> Vec<ListenerSpec> {
        let Some(active) = self.active() else {
            return self.config.listen.clone();
        };
        let held: BTreeSet<usize> = self.sockets(active).iter().map(|s| s.listener).collect();
        let lost = self
            .not_listening
            .filter(|n| n.generation == active)
            .map(|n| n.addr);
        self.config
            .listen
            .iter()
            .enumerate()
            .filter(|(i, spec)| !held.contains(i) || lost == Some(**spec))
            .map(|(_, spec)| *spec)
            .collect()
    }
}
