//! The one owner of an instance's state: its generations, their processes
//! (held by pidfd) and registered sockets, the steering maps, the counters
//! of generations that ended, and the reload statistics.
//!
//! [`InstanceState`] has no async code and no locks: every change is one of
//! its methods, each a few map updates at most, so the reload machine, the
//! reaper and shutdown all change it through the same small API, and its
//! rules are unit tested against [`crate::steering::fake::FakeSteering`].
//! [`Handle`] is the only holder of its lock; nothing blocking (discovery,
//! netlink dumps, fsync) ever runs under it.

mod handle;
pub mod saved;

use std::{
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

pub use handle::Handle;
use nix::sys::signal::Signal;
use tracing::{error, info, warn};

use crate::{
    config::RunConfig,
    discovery::{Holder, Listener},
    error::ReloadError,
    generation::{Generation, Generations, State},
    status::{
        CounterStatus, GenerationStatus, ListenerStatus, ReloadReport, ReloadResult, SocketStatus,
        StatusReport,
    },
    steering::Steer,
    supervisor::{Process, Spawned, StderrTail},
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
    pub copy: OwnedFd,
}

/// A generation that was just begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begun {
    pub number: u64,
    pub slot: u32,
    /// The active generation it will replace.
    pub previous: Option<u64>,
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
}

/// How an exit changed the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitEffect {
    /// Not a generation leader (a worker, a reparented process), or one
    /// already ended.
    None,
    /// A starting, ready or draining generation ended.
    Ended { generation: u64 },
    /// The active generation crashed: nothing receives new connections by
    /// steering until a new generation is active.
    Crashed { generation: u64 },
}

/// Counts shown by `status` and the metrics.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    reloads_succeeded: u64,
    reloads_failed: u64,
    restarts: u64,
    drain_kills: u64,
}

/// Everything the controller knows about one instance.
pub struct InstanceState {
    config: Arc<RunConfig>,
    steering: Box<dyn Steer>,
    generations: Generations,
    processes: HashMap<u64, Process>,
    sockets: HashMap<u64, Vec<RegisteredSocket>>,
    /// Counters of ended generations (their slot may be reused).
    ended_counters: HashMap<u64, CounterStatus>,
    stderr: HashMap<u64, StderrTail>,
    /// How generations that exited before they were ready ended.
    early_exits: HashMap<u64, String>,
    stats: Stats,
    last_reload: Option<ReloadReport>,
    restart_backoff: Duration,
    stopping: bool,
    /// What this controller took over or cleaned up from a previous one.
    recovered: Option<String>,
    started: Instant,
}

impl InstanceState {
    /// State for `config` with `steering` loaded and its listeners added;
    /// `generations` may hold generations adopted from a previous
    /// controller, whose `processes` are given.
    pub fn new(
        config: Arc<RunConfig>,
        steering: Box<dyn Steer>,
        generations: Generations,
        processes: HashMap<u64, Process>,
        recovered: Option<String>,
    ) -> Self {
        Self {
            config,
            steering,
            generations,
            processes,
            sockets: HashMap::new(),
            ended_counters: HashMap::new(),
            stderr: HashMap::new(),
            early_exits: HashMap::new(),
            stats: Stats::default(),
            last_reload: None,
            restart_backoff: RESTART_BACKOFF_MIN,
            stopping: false,
            recovered,
            started: Instant::now(),
        }
    }

    pub fn config(&self) -> &Arc<RunConfig> {
        &self.config
    }

    fn listeners(&self) -> std::ops::Range<u32> {
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

    // ---- The reload steps (the reload machine drives them in order).

    /// Step 1: takes a slot for the next generation. Its counters start at
    /// zero: they belong to the generation, not to the slot.
    pub fn begin(&mut self, now: Instant) -> Result<Begun, NotNow> {
        if self.stopping {
            return Err(NotNow::Stopping);
        }
        let draining = self.generations.draining().count() as u32;
        if draining >= self.config.max_draining || self.generations.free_slot().is_none() {
            return Err(NotNow::Busy { draining });
        }
        let previous = self.active();
        let generation = self
            .generations
            .begin(now)
            .expect("a free slot was checked");
        let (number, slot) = (generation.number, generation.slot);
        for listener in self.listeners() {
            if let Err(error) = self.steering.reset_counters(listener, slot) {
                warn!(error = %crate::error_chain(&error), listener, slot, "resetting counters");
            }
        }
        Ok(Begun {
            number,
            slot,
            previous,
        })
    }

    /// Step 2: generation `number`'s leader runs.
    pub fn spawned(&mut self, number: u64, spawned: Spawned) -> Result<(), ReloadError> {
        let pid = spawned.process.pid();
        self.generations
            .set_pid(number, pid)
            .map_err(|e| ReloadError::Internal {
                what: e.to_string(),
            })?;
        self.stderr.insert(number, spawned.stderr);
        if !self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live())
        {
            // Stopped (or failed) while it was being spawned.
            spawned.process.signal_group(Signal::SIGKILL);
            return self.check_alive(number);
        }
        self.processes.insert(number, spawned.process);
        Ok(())
    }

    /// Step 4: registers the sockets found for every managed address (same
    /// order as `--listen`) in the generation's slot, attaching the program
    /// to each group.
    pub fn register(
        &mut self,
        number: u64,
        found: Vec<Vec<FoundSocket>>,
    ) -> Result<(), ReloadError> {
        self.check_alive(number)?;
        let slot = self.generations.get(number).expect("alive").slot;
        let mut registered = Vec::new();
        for (i, sockets) in found.iter().enumerate() {
            let addr = self.config.listen[i];
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.copy.as_fd()).collect();
            let named = |s: &FoundSocket, source| ReloadError::RegisterError {
                addr,
                pid: s.holder.pid,
                process: crate::discovery::process_name(s.holder.pid).unwrap_or_else(|| "?".into()),
                fd: s.holder.fd,
                source: Box::new(source),
            };
            let Some(first) = sockets.first() else {
                return Err(ReloadError::Internal {
                    what: format!("no socket to register for {addr}"),
                });
            };
            self.steering
                .attach(first.copy.as_fd())
                .map_err(|source| named(first, source))?;
            self.steering
                .set_slot_sockets(i as u32, slot, &fds)
                .map_err(|source| named(first, source))?;
            registered.extend(sockets.iter().map(|s| RegisteredSocket {
                listener: i,
                socket: s.socket.clone(),
                holder: s.holder,
            }));
        }
        self.sockets.insert(number, registered);
        Ok(())
    }

    /// Step 5: routes probe SYNs from client port `port` to generation
    /// `number`'s own listener.
    pub fn add_probe(
        &mut self,
        number: u64,
        listener: usize,
        port: u16,
    ) -> Result<(), ReloadError> {
        self.check_alive(number)?;
        let slot = self.generations.get(number).expect("alive").slot;
        self.steering
            .add_probe(listener as u32, port, slot)
            .map_err(|source| ReloadError::SteeringError {
                addr: self.config.listen[listener],
                what: "cannot route the readiness probe",
                source: Box::new(source),
            })
    }

    pub fn remove_probe(&mut self, listener: usize, port: u16) {
        if let Err(error) = self.steering.remove_probe(listener as u32, port) {
            warn!(error = %crate::error_chain(&error), "removing a probe route");
        }
    }

    /// Step 6, the cutover: makes `number` active on every listener (one
    /// map update each) and the previously active generation draining.
    /// If an update fails, the listeners already switched go back to the
    /// previous generation, so no listener is left pointing at a slot that
    /// is about to be emptied. Returns when the maps were updated.
    pub fn cut_over(&mut self, number: u64, ready: Instant) -> Result<Instant, ReloadError> {
        self.check_alive(number)?;
        self.generations
            .transition(number, State::Ready, ready, None)
            .map_err(|e| ReloadError::Internal {
                what: e.to_string(),
            })?;
        let slot = self.generations.get(number).expect("ready").slot;
        let previous = self.generations.active().map(|g| (g.number, g.slot));
        let cutover = Instant::now();
        let mut switched = Vec::new();
        for listener in self.listeners() {
            if let Err(source) = self.steering.set_active(listener, Some(slot)) {
                for done in switched {
                    if let Err(error) = self.steering.set_active(done, previous.map(|p| p.1)) {
                        error!(error = %crate::error_chain(&error), listener = done, "undoing a partial cutover");
                    }
                }
                return Err(ReloadError::SteeringError {
                    addr: self.config.listen[listener as usize],
                    what: "cutover failed",
                    source: Box::new(source),
                });
            }
            switched.push(listener);
        }
        let now = Instant::now();
        self.generations
            .transition(number, State::Active, now, None)
            .expect("ready can become active");
        if let Some((old, _)) = previous {
            let _ = self.generations.transition(old, State::Draining, now, None);
        }
        Ok(cutover)
    }

    /// A candidate that will not become active: killed, its slot emptied.
    pub fn fail(&mut self, number: u64, reason: &ReloadError) {
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        if !live {
            return;
        }
        if let Some(process) = self.processes.get(&number) {
            process.signal_group(Signal::SIGKILL);
        }
        self.end(number, State::Failed, crate::error_chain(reason));
    }

    /// The last stderr lines of generation `number`.
    pub fn stderr(&self, number: u64) -> Option<StderrTail> {
        self.stderr.get(&number).cloned()
    }

    /// Records a finished reload; the instance's first start is shown as
    /// the last reload but not counted as one.
    pub fn record(&mut self, report: &ReloadReport, first_start: bool) {
        self.last_reload = Some(report.clone());
        if first_start {
            return;
        }
        match report.result {
            ReloadResult::Succeeded => self.stats.reloads_succeeded += 1,
            ReloadResult::Failed => self.stats.reloads_failed += 1,
        }
    }

    // ---- Draining.

    /// Sends the drain signal to generation `number`'s leader; false if it
    /// no longer runs.
    pub fn drain_signal(&mut self, number: u64) -> bool {
        match self.processes.get(&number) {
            Some(process)
                if self
                    .generations
                    .get(number)
                    .is_some_and(|g| g.state.is_live()) =>
            {
                info!(
                    generation = number,
                    pid = process.pid(),
                    signal = self.config.drain_signal.as_str(),
                    "draining"
                );
                process.signal(self.config.drain_signal);
                true
            }
            _ => false,
        }
    }

    /// Kills generation `number`'s process group (drain timeout).
    pub fn kill(&mut self, number: u64) {
        if let Some(process) = self.processes.get(&number)
            && self
                .generations
                .get(number)
                .is_some_and(|g| g.state.is_live())
        {
            process.signal_group(Signal::SIGKILL);
            self.stats.drain_kills += 1;
        }
    }

    /// Gives up on a generation that did not exit after SIGKILL: it is
    /// reported as exited and its slot is freed (it may be stuck in the
    /// kernel; its sockets are no longer steered to).
    pub fn abandon(&mut self, number: u64, waited: Duration) {
        if self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live())
        {
            let pid = self.processes.get(&number).map(Process::pid);
            error!(
                generation = number,
                ?pid,
                "did not exit after SIGKILL; freeing its slot"
            );
            self.end(
                number,
                State::Exited,
                format!(
                    "did not exit within {} of SIGKILL (pid {}); its slot was freed",
                    crate::generation::human_duration(waited),
                    pid.map_or("?".into(), |p| p.to_string())
                ),
            );
        }
    }

    // ---- Exits.

    /// Records that process `pid` ended (`how`): a reaped child (still a
    /// zombie, so its group id is still its own) or an adopted process
    /// whose pidfd said so. Whatever remains of its group is killed.
    pub fn exited(&mut self, pid: u32, how: &str) -> ExitEffect {
        let Some((number, state)) = self.generations.by_pid(pid).map(|g| (g.number, g.state))
        else {
            return ExitEffect::None;
        };
        if let Some(process) = self.processes.get(&number) {
            process.signal_group(Signal::SIGKILL);
        }
        match state {
            State::Starting | State::Ready => {
                warn!(generation = number, pid, "{how} before it was ready");
                self.early_exits.insert(number, how.to_owned());
                self.end(
                    number,
                    State::Failed,
                    format!("{how} before it was ready{}", daemonize_hint(how)),
                );
                ExitEffect::Ended { generation: number }
            }
            State::Draining => {
                info!(generation = number, pid, "drained: {how}");
                self.end(number, State::Exited, how.to_owned());
                ExitEffect::Ended { generation: number }
            }
            State::Active => {
                error!(generation = number, pid, "active generation {how}");
                // Its sockets are gone with it; leave selection to the
                // kernel until a new generation is active.
                for listener in self.listeners() {
                    let _ = self.steering.set_active(listener, None);
                }
                let healthy = self
                    .generations
                    .get(number)
                    .and_then(|g| g.timeline.active)
                    .is_some_and(|t| t.elapsed() >= HEALTHY_AFTER);
                if healthy {
                    self.restart_backoff = RESTART_BACKOFF_MIN;
                }
                self.end(number, State::Exited, how.to_owned());
                self.stats.restarts += 1;
                ExitEffect::Crashed { generation: number }
            }
            State::Exited | State::Failed => ExitEffect::None,
        }
    }

    /// The delay before the next restart after a crash or a failed
    /// restart (doubling from 100 ms to 10 s).
    pub fn next_restart_delay(&mut self) -> Duration {
        let delay = self.restart_backoff;
        self.restart_backoff = (delay * 2).min(RESTART_BACKOFF_MAX);
        delay
    }

    /// A generation ended: its counters are frozen, its slot emptied.
    fn end(&mut self, number: u64, next: State, outcome: String) {
        let counters = self.counters(number);
        if let Err(error) = self
            .generations
            .transition(number, next, Instant::now(), Some(outcome))
        {
            warn!(%error, "generation state");
            return;
        }
        self.ended_counters.insert(number, counters);
        self.processes.remove(&number);
        let slot = self.generations.get(number).map(|g| g.slot);
        if let Some(slot) = slot {
            for listener in self.listeners() {
                if let Err(error) = self.steering.clear_slot(listener, slot) {
                    warn!(error = %crate::error_chain(&error), "clearing slot");
                }
            }
        }
        let known = |n: &u64| self.generations.get(*n).is_some();
        self.ended_counters.retain(|n, _| known(n));
        self.stderr.retain(|n, _| known(n));
        self.early_exits.retain(|n, _| known(n));
        self.sockets.retain(|n, _| known(n));
    }

    // ---- Stop.

    /// Begins the stop: no generation begins any more; the active one
    /// drains like the others (its exit is no crash). Returns the live
    /// generations: those that served drain, the others are killed.
    pub fn begin_stop(&mut self) -> Vec<(u64, State)> {
        self.stopping = true;
        let live = self.live();
        let now = Instant::now();
        for &(number, state) in &live {
            match state {
                State::Active => {
                    let _ = self
                        .generations
                        .transition(number, State::Draining, now, None);
                }
                State::Starting | State::Ready => {
                    if let Some(process) = self.processes.get(&number) {
                        process.signal_group(Signal::SIGKILL);
                    }
                    self.end(
                        number,
                        State::Failed,
                        "killed: the instance is stopping".into(),
                    );
                }
                _ => {}
            }
        }
        live
    }

    // ---- Reading.

    /// Counters of generation `number` summed over listeners: live from the
    /// maps, or as frozen when it ended.
    fn counters(&self, number: u64) -> CounterStatus {
        if let Some(done) = self.ended_counters.get(&number) {
            return *done;
        }
        let Some(generation) = self.generations.get(number) else {
            return CounterStatus::default();
        };
        let mut sum = CounterStatus::default();
        for listener in self.listeners() {
            if let Ok(c) = self.steering.counters(listener, generation.slot) {
                sum += c.into();
            }
        }
        sum
    }

    /// What `status` reports, without accept-queue lengths (those need a
    /// netlink dump: [`Handle::status`] adds them outside the lock).
    pub fn status(&self) -> StatusReport {
        let now = Instant::now();
        let listeners = self
            .config
            .listen
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let slot = self.steering.active(i as u32).ok().flatten();
                ListenerStatus {
                    addr: addr.to_string(),
                    active_generation: self
                        .generations
                        .active()
                        .filter(|g| Some(g.slot) == slot)
                        .map(|g| g.number),
                }
            })
            .collect();
        let generations = self
            .generations
            .all()
            .iter()
            .rev()
            .map(|g| {
                let sockets = self
                    .sockets
                    .get(&g.number)
                    .map(|v| {
                        v.iter()
                            .map(|s| SocketStatus {
                                addr: s.socket.addr.to_string(),
                                inode: s.socket.inode,
                                cookie: s.socket.cookie,
                                accept_queue: None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let spawned = g.timeline.spawned.unwrap_or(now);
                let end = g.timeline.ended.unwrap_or(now);
                GenerationStatus {
                    generation: g.number,
                    pid: g.pid,
                    state: g.state,
                    age_ms: end.saturating_duration_since(spawned).as_millis() as u64,
                    slot: g.slot,
                    outcome: g.outcome.clone(),
                    sockets,
                    counters: self.counters(g.number),
                }
            })
            .collect();
        StatusReport {
            name: self.config.name.clone(),
            pid: std::process::id(),
            steering: self.steering.mode(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            listeners,
            generations,
            last_reload: self.last_reload.clone(),
            reloads_succeeded: self.stats.reloads_succeeded,
            reloads_failed: self.stats.reloads_failed,
            restarts: self.stats.restarts,
            drain_kills: self.stats.drain_kills,
            unmanaged_fallback: self
                .steering
                .unmanaged_counters()
                .map(|c| c.fallback)
                .unwrap_or_default(),
            map_entries: self.steering.entry_counts().unwrap_or_default(),
            recovered: self.recovered.clone(),
            log_lines_dropped: crate::logging::dropped_lines(),
        }
    }

    /// What the state file records: the live generations with a process.
    pub fn saved(&self) -> saved::Saved {
        let generations = self
            .generations
            .live()
            .filter_map(|g| {
                let process = self.processes.get(&g.number)?;
                Some(saved::SavedGeneration {
                    number: g.number,
                    slot: g.slot,
                    pid: process.pid(),
                    start_time: process.start_time(),
                    state: g.state,
                })
            })
            .collect();
        saved::Saved::new(
            self.config.listen.clone(),
            self.generations.next_number(),
            generations,
        )
    }

    /// The sockets registered for generation `number`.
    pub fn sockets(&self, number: u64) -> &[RegisteredSocket] {
        self.sockets.get(&number).map_or(&[], Vec::as_slice)
    }

    /// Records sockets found for an adopted generation (already in its
    /// slot, registered by the previous controller).
    pub fn adopted_sockets(&mut self, number: u64, sockets: Vec<RegisteredSocket>) {
        self.sockets.insert(number, sockets);
    }

    /// Processes of live generations that are not our children (adopted):
    /// their exits must be watched by pidfd.
    pub fn adopted(&self) -> Vec<(u64, &Process)> {
        self.processes
            .iter()
            .filter(|(_, p)| !p.is_child())
            .map(|(n, p)| (*n, p))
            .collect()
    }

    /// Ends an adopted generation that was starting when the previous
    /// controller died (that reload is lost).
    pub fn kill_orphaned_candidate(&mut self, number: u64) {
        if let Some(process) = self.processes.get(&number) {
            process.signal_group(Signal::SIGKILL);
        }
        self.end(
            number,
            State::Failed,
            "killed: it was starting when the previous controller died".into(),
        );
    }
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
