//! The one owner of an instance's state: its generations, their processes
//! (held by pidfd) and registered sockets, the steering maps, the counters
//! of generations that ended, and the reload statistics.
//!
//! [`InstanceState`] has no async code and no locks: every change is one of
//! its methods, each a few map updates at most, and its rules are unit
//! tested against [`crate::steering::fake::FakeSteering`]. One task owns it
//! by value (the instance's run loop); the others send that task
//! [`Command`]s through a [`Client`] and read the [`Snapshot`] it publishes
//! after each one. Nothing blocking (discovery, netlink dumps, `/proc`
//! walks, fsync) runs in its methods: what needs a blocking thread is left
//! in its outbox ([`Effect`]) for the owner to hand over.

mod bridges;
mod cgroups;
mod client;
mod ending;
mod evict;
mod identity;
mod report;
mod rollout;
pub mod saved;
mod snapshot;
mod steps;
mod tracking;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

pub use bridges::HOLD_LIMIT;
pub use client::{Activated, COMMAND_QUEUE, Client, Command, Owned};
pub use evict::{EVICT_GRACE, EvictReason};
pub use rollout::{Advanced, CanaryPhase, CanaryVerdict, Hold, RolledBack};
pub use snapshot::{GenerationView, Snapshot};
pub use tracking::{Refreshed, Tracked};

use crate::{
    config::RunConfig,
    discovery::{Holder, Listener},
    error::ReloadError,
    generation::{Generation, Generations, State},
    status::{CounterStatus, ReloadReport, RollbackCounts},
    steering::{Limits, Steer},
    supervisor::{Process, StderrTail},
};

/// Ended generations kept for `status`.
pub const HISTORY: usize = 8;
/// First delay before restarting a crashed active generation.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A generation active this long before it crashes restarts with the
/// shortest backoff again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// A listening socket registered for a generation.
#[derive(Clone, Debug)]
pub struct RegisteredSocket {
    /// Index of the managed address.
    pub listener: usize,
    pub socket: Listener,
    /// Where the server holds it (pid, its fd number).
    pub holder: Holder,
}

/// A socket found in a candidate's process tree, with reloader's copy of
/// it (closed once registered: the map does not keep it alive).
#[derive(Debug)]
pub struct FoundSocket {
    pub socket: Listener,
    pub holder: Holder,
    /// The holder's name (`/proc/PID/comm`, read where it was found), for
    /// messages.
    pub process: String,
    /// Whether the holder runs a Go program (read where it was found), for
    /// status's `GODEBUG=multipathtcp=0` note.
    pub go: bool,
    pub copy: OwnedFd,
}

/// Work a state change leaves for a blocking thread.
#[derive(Debug)]
pub enum Effect {
    /// Signal the process group of an adopted generation's leader: its
    /// members are found in `/proc` ([`Process::signal_group`]).
    SignalAdoptedGroup {
        process: Process,
        signal: nix::sys::signal::Signal,
    },
    /// Kill every process of a generation's cgroup.
    KillCgroup { dir: PathBuf },
    /// Signal the processes a generation's cgroup grew from (its leader is
    /// gone): [`crate::cgroup::roots`].
    SignalCgroupRoots {
        dir: PathBuf,
        signal: nix::sys::signal::Signal,
    },
    /// Remove an empty generation's cgroup.
    RemoveCgroup { number: u64, dir: PathBuf },
}

/// A generation that was just begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begun {
    pub number: u64,
    pub slot: u32,
    /// The active generation it will replace.
    pub previous: Option<u64>,
    /// The draining generation evicted to make room (`--drain-evict`):
    /// killed after [`EVICT_GRACE`].
    pub evicted: Option<u64>,
}

/// Why a generation cannot begin now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotNow {
    Stopping,
    /// `--max-draining` generations drain, or every slot is taken: wait for
    /// a change.
    Busy {
        draining: u32,
    },
    /// A canary runs: it must be promoted or rolled back first.
    Canary {
        generation: u64,
    },
}

/// How an exit changed the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitEffect {
    /// Not a generation leader (a worker, a reparented process), or one
    /// already ended.
    None,
    /// A starting, ready or draining generation ended.
    Ended { generation: u64 },
    /// The active generation crashed. The previous generation was made
    /// active again if it still held its listeners; otherwise nothing
    /// receives new connections by steering until a new generation is
    /// active.
    Crashed {
        generation: u64,
        reinstated: Option<u64>,
    },
}

/// A generation made active again in place of its successor.
#[derive(Clone, Debug)]
struct Reinstated {
    previous: u64,
    why: String,
    /// By a rollback (`reloader rollback`, a failed health check), not a
    /// crash.
    rolled_back: bool,
    /// By failed health checks.
    health: bool,
}

/// Counts shown by `status` and the metrics.
#[derive(Clone, Debug, Default)]
struct Stats {
    reloads_succeeded: u64,
    reloads_failed: u64,
    restarts: u64,
    /// Of those, generations replaced because they stopped listening.
    restarts_stopped_listening: u64,
    drain_kills: u64,
    /// Draining generations evicted, by why.
    drain_evictions: BTreeMap<EvictReason, u64>,
    reloads_rolled_back: u64,
    rollbacks: RollbackCounts,
    /// Connections bridges held and handed to a generation.
    bridge_released: u64,
}

/// Everything the controller knows about one instance.
pub struct InstanceState {
    config: Arc<RunConfig>,
    /// The steering maps' sizes (a previous controller's when adopted).
    limits: Limits,
    steering: Box<dyn Steer>,
    generations: Generations,
    processes: HashMap<u64, Process>,
    sockets: HashMap<u64, Vec<RegisteredSocket>>,
    /// Counters of ended generations (their slot may be reused).
    ended_counters: HashMap<u64, CounterStatus>,
    stderr: HashMap<u64, StderrTail>,
    /// How generations that exited before they were ready ended.
    early_exits: HashMap<u64, String>,
    /// Active generations that failed or were rolled back while their
    /// predecessor still held its listeners: the predecessor made active
    /// again, what happened.
    reinstated: HashMap<u64, Reinstated>,
    stats: Stats,
    last_reload: Option<ReloadReport>,
    restart_backoff: Duration,
    /// The previous generation kept after a cutover (`--keep-previous`).
    hold: Option<Hold>,
    /// The canary under way (`reload --canary`).
    canary: Option<rollout::CanaryRun>,
    /// How canaries ended, for the reloads that started them.
    canary_verdicts: HashMap<u64, CanaryVerdict>,
    /// Health checks per generation (`--health-probe`).
    health: HashMap<u64, rollout::HealthRecord>,
    /// Steered connections per second during a canary.
    rates: HashMap<u64, rollout::Rate>,
    stopping: bool,
    /// What this controller took over or cleaned up from a previous one.
    recovered: Option<String>,
    started: Instant,
    /// Bridge listeners by managed address (TCP, select-or-migrate).
    bridges: BTreeMap<usize, bridges::Held>,
    /// Addresses that cannot have one (said once).
    no_bridge: BTreeSet<usize>,
    /// What the owner must hand to a blocking thread.
    outbox: Vec<Effect>,
    /// The active generation has had no listener on a managed address
    /// since then (no previous generation could take over).
    not_listening: Option<NotListening>,
    /// Generations' cgroups (see [`crate::cgroup`]), where there are.
    cgroups: HashMap<u64, PathBuf>,
    /// Whether each cgroup has a process, as last reported.
    populated: HashMap<u64, bool>,
    /// Generations that ended (their leader exited) while their cgroup
    /// still had members: they count as exited only once it is empty.
    members_left: BTreeSet<u64>,
    /// Live generations whose leader is gone while their cgroup lives on
    /// (a server that daemonized; an adopted one whose leader died): they
    /// end when their cgroup empties, and are signalled through it.
    leaderless: BTreeSet<u64>,
    /// Why generations get no cgroups, if they do not.
    cgroup_unavailable: Option<String>,
    /// Draining generations evicted (see [`evict`]), while they are known.
    evicting: BTreeMap<u64, EvictReason>,
    /// A socket found for a generation was held by a Go program.
    go_server_seen: bool,
}

/// The active generation stopped listening on a managed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotListening {
    pub generation: u64,
    pub since: Instant,
    pub addr: crate::listen::ListenerSpec,
    /// A generation is being started in its place: the bridges hold on.
    pub replacing: bool,
}

impl InstanceState {
    /// State for `config` with `steering` loaded and its listeners added;
    /// `generations` may hold generations adopted from a previous
    /// controller, whose `processes` are given.
    pub fn new(
        config: Arc<RunConfig>,
        limits: Limits,
        steering: Box<dyn Steer>,
        generations: Generations,
        processes: HashMap<u64, Process>,
        recovered: Option<String>,
    ) -> Self {
        Self {
            config,
            limits,
            steering,
            generations,
            processes,
            sockets: HashMap::new(),
            ended_counters: HashMap::new(),
            stderr: HashMap::new(),
            early_exits: HashMap::new(),
            reinstated: HashMap::new(),
            stats: Stats::default(),
            last_reload: None,
            restart_backoff: RESTART_BACKOFF_MIN,
            hold: None,
            canary: None,
            canary_verdicts: HashMap::new(),
            health: HashMap::new(),
            rates: HashMap::new(),
            stopping: false,
            recovered,
            started: Instant::now(),
            bridges: BTreeMap::new(),
            no_bridge: BTreeSet::new(),
            outbox: Vec::new(),
            not_listening: None,
            cgroups: HashMap::new(),
            populated: HashMap::new(),
            members_left: BTreeSet::new(),
            leaderless: BTreeSet::new(),
            cgroup_unavailable: None,
            evicting: BTreeMap::new(),
            go_server_seen: false,
        }
    }

    /// The effects left since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.outbox)
    }

    /// Kills what is left of generation `number`: its whole cgroup where it
    /// has one (through the outbox); otherwise its process group, at once
    /// for our own child (one `killpg`, safe while it is unreaped), through
    /// the outbox for an adopted one.
    pub(super) fn kill_group(&mut self, number: u64) {
        if let Some(dir) = self.cgroups.get(&number) {
            self.outbox.push(Effect::KillCgroup { dir: dir.clone() });
            return;
        }
        let Some(process) = self.processes.get(&number) else {
            return;
        };
        if process.signal_group_needs_proc() {
            self.outbox.push(Effect::SignalAdoptedGroup {
                process: process.clone(),
                signal: nix::sys::signal::Signal::SIGKILL,
            });
        } else {
            process.signal_group(nix::sys::signal::Signal::SIGKILL);
        }
    }

    pub fn config(&self) -> &Arc<RunConfig> {
        &self.config
    }

    pub(super) fn listeners(&self) -> std::ops::Range<u32> {
        0..self.config.listen.len() as u32
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Generation `number`, if it is known.
    pub fn generation(&self, number: u64) -> Option<&Generation> {
        self.generations.get(number)
    }

    /// The generation receiving new connections.
    pub fn active(&self) -> Option<u64> {
        self.generations.active().map(|g| g.number)
    }

    /// Live generations (number, state), oldest first.
    pub fn live(&self) -> Vec<(u64, State)> {
        self.generations
            .live()
            .map(|g| (g.number, g.state))
            .collect()
    }

    /// Fails unless generation `number` still runs.
    pub fn check_alive(&self, number: u64) -> Result<(), ReloadError> {
        match self.generations.get(number) {
            Some(g) if g.state.is_live() => Ok(()),
            Some(g) => Err(match self.early_exits.get(&number) {
                Some(how) => ReloadError::ExitedBeforeReady {
                    how: how.clone(),
                    hint: daemonize_hint(how),
                },
                None => ReloadError::Ended {
                    generation: number,
                    outcome: g.outcome.clone().unwrap_or_else(|| g.state.to_string()),
                },
            }),
            None => Err(ReloadError::Ended {
                generation: number,
                outcome: "forgotten".into(),
            }),
        }
    }
}

/// The epoch a generation's slot is registered with: its number,
/// truncated (a UDP flow pinned by another generation is not its own).
fn epoch_of(number: u64) -> u32 {
    number as u32
}

/// A hint for a server that exited with status 0 before it was ready: it
/// most likely daemonized (forked into the background and exited).
fn daemonize_hint(how: &str) -> &'static str {
    if how.starts_with("exited with status 0") {
        ": it probably daemonized (went into the background): run it in the foreground \
         (nginx: `daemon off;`; HAProxy: `-db` or no `daemon` in its config; Apache: \
         `-DFOREGROUND`)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests;
