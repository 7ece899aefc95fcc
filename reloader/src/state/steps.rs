//! The reload steps as the state sees them, in the order the reload
//! machine drives them: take a slot, record the spawned leader, register
//! its sockets, route probes, cut over, or fail.

use std::{
    os::fd::{AsFd, BorrowedFd},
    time::Instant,
};

use tracing::{error, warn};

use super::{Begun, FoundSocket, InstanceState, NotNow, RegisteredSocket, epoch_of};
use crate::{
    error::ReloadError,
    generation::State,
    status::{ReloadReport, ReloadResult},
    supervisor::{Process, StderrTail},
};

impl InstanceState {
    /// Step 1: takes a slot for the next generation. Its counters start at
    /// zero: they belong to the generation, not to the slot.
    pub fn begin(&mut self, now: Instant) -> Result<Begun, NotNow> {
        if self.stopping {
            return Err(NotNow::Stopping);
        }
        if let Some(generation) = self.canary() {
            return Err(NotNow::Canary { generation });
        }
        let unevicted = self.draining_unevicted();
        let mut draining = unevicted.len() as u32;
        let mut evicted = None;
        if draining >= self.config.drain.max_draining
            && self.config.drain.evict
            && self.generations.free_slot().is_some()
        {
            let oldest = unevicted[0];
            let why = format!(
                "a reload beyond --max-draining {} with --drain-evict",
                self.config.drain.max_draining
            );
            if self.evict(oldest, super::EvictReason::Count, &why) {
                evicted = Some(oldest);
                draining -= 1;
            }
        }
        if draining >= self.config.drain.max_draining || self.generations.free_slot().is_none() {
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
            evicted,
        })
    }

    /// Step 2: generation `number`'s leader runs (held at its start gate).
    pub fn spawned(
        &mut self,
        number: u64,
        process: Process,
        stderr: StderrTail,
    ) -> Result<(), ReloadError> {
        let pid = process.pid();
        self.generations
            .set_pid(number, pid)
            .map_err(|e| ReloadError::Internal {
                what: e.to_string(),
            })?;
        self.stderr.insert(number, stderr);
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        self.processes.insert(number, process);
        if !live {
            // Stopped (or failed) while it was being spawned.
            self.kill_group(number);
            self.processes.remove(&number);
            return self.check_alive(number);
        }
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
        self.go_server_seen |= found.iter().flatten().any(|s| s.go);
        let slot = self.generations.get(number).expect("alive").slot;
        let mut registered = Vec::new();
        for (i, sockets) in found.iter().enumerate() {
            let addr = self.config.listen[i];
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.copy.as_fd()).collect();
            let named = |s: &FoundSocket, source| ReloadError::RegisterError {
                addr,
                pid: s.holder.pid,
                process: s.process.clone(),
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
                .set_slot_sockets(i as u32, slot, epoch_of(number), &fds)
                .map_err(|source| named(first, source))?;
            self.open_bridge(i, first.copy.as_fd());
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
        self.hold_previous(previous.map(|p| p.0), number, now);
        self.not_listening = None;
        self.release_bridges(None);
        Ok(cutover)
    }

    /// A candidate that will not become active: killed, its slot emptied.
    /// Returns its stderr, for the report.
    pub fn fail(&mut self, number: u64, reason: &ReloadError) -> Option<StderrTail> {
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        if live {
            self.kill_group(number);
            self.end(number, State::Failed, crate::error_chain(reason));
        }
        self.stderr(number)
    }

    /// Kills every candidate (starting or ready, not yet active): the
    /// reload that ran them ended without failing them itself (it
    /// panicked).
    pub fn fail_candidates(&mut self) {
        let candidates: Vec<u64> = self
            .live()
            .into_iter()
            .filter(|(_, state)| matches!(state, State::Starting | State::Ready))
            .map(|(number, _)| number)
            .collect();
        for number in candidates {
            let reason = ReloadError::Internal {
                what: "the reload that started it ended".into(),
            };
            self.fail(number, &reason);
        }
    }

    /// The last stderr lines of generation `number`.
    pub fn stderr(&self, number: u64) -> Option<StderrTail> {
        self.stderr.get(&number).cloned()
    }

    /// Decides how a reload ended, from the state now: a report without a
    /// failure yet (its new generation cut over and the barrier passed) is
    /// a success unless that generation failed or was rolled back since.
    /// Every failure names the generation active now. Then it is recorded.
    pub fn conclude(&mut self, report: &mut ReloadReport, first_start: bool) {
        if report.failure.is_none() && report.result != ReloadResult::RolledBack {
            match self.failed_after_cutover(report.generation) {
                None => report.result = ReloadResult::Succeeded,
                Some((result, kind, detail)) => {
                    report.result = result;
                    report.error = Some(detail.clone());
                    report.failure = Some(crate::error::ReloadFailure {
                        kind,
                        detail,
                        active: None,
                    });
                }
            }
        }
        if let Some(failure) = &mut report.failure {
            failure.active = self.active();
        }
        self.record(report, first_start);
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
            ReloadResult::RolledBack => self.stats.reloads_rolled_back += 1,
        }
    }
}
