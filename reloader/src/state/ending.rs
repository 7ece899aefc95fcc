//! How generations end: drained, killed at the drain timeout, given up
//! after SIGKILL, exited on their own (a crash, for the active one), or
//! stopped with the instance.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{
    ExitEffect, HEALTHY_AFTER, InstanceState, RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN,
    daemonize_hint,
};
use crate::{generation::State, status::ReloadResult, supervisor::Process};

impl InstanceState {
    /// Sends the drain signal to generation `number`'s leader; false if it
    /// no longer runs.
    /// (Only while it drains: a generation reinstated meanwhile serves.)
    pub fn drain_signal(&mut self, number: u64) -> bool {
        let draining = self
            .generations
            .get(number)
            .is_some_and(|g| g.state == State::Draining);
        let signalled = self
            .generations
            .get(number)
            .is_some_and(|g| g.timeline.signalled.is_some());
        if draining && signalled && self.evicting.contains_key(&number) {
            // Its eviction signalled it already.
            return true;
        }
        if draining && self.is_leaderless(number) {
            // No leader to tell: the processes its cgroup grew from are.
            if let Some(dir) = self.cgroup(number).cloned() {
                info!(
                    generation = number,
                    signal = self.config.drain.signal.as_str(),
                    "draining (its leader is gone: the roots of its cgroup get the signal)"
                );
                self.outbox.push(super::Effect::SignalCgroupRoots {
                    dir,
                    signal: self.config.drain.signal,
                });
                let _ = self.generations.signalled(number, Instant::now());
                if self.hold.is_some_and(|h| h.held == number) {
                    self.hold = None;
                }
                return true;
            }
        }
        match self.processes.get(&number) {
            Some(process) if draining => {
                info!(
                    generation = number,
                    pid = process.pid(),
                    signal = self.config.drain.signal.as_str(),
                    "draining"
                );
                if process.stands_in_for_leader() {
                    // No leader forwards it to the workers: each gets it.
                    self.outbox.push(super::Effect::SignalAdoptedGroup {
                        process: process.clone(),
                        signal: self.config.drain.signal,
                    });
                } else {
                    process.signal(self.config.drain.signal);
                }
                let _ = self.generations.signalled(number, Instant::now());
                if self.hold.is_some_and(|h| h.held == number) {
                    self.hold = None;
                }
                true
            }
            _ => false,
        }
    }

    /// Records that generation `number`'s drain began through
    /// `--drain-command` (what a drain signal records, without sending
    /// one: from now on it is not a generation to roll back to); false if
    /// it no longer drains.
    pub fn drain_begun(&mut self, number: u64) -> bool {
        let draining = self
            .generations
            .get(number)
            .is_some_and(|g| g.state == State::Draining);
        if !draining {
            return false;
        }
        info!(generation = number, "draining (--drain-command)");
        let _ = self.generations.signalled(number, Instant::now());
        if self.hold.is_some_and(|h| h.held == number) {
            self.hold = None;
        }
        true
    }

    /// Kills generation `number`'s processes (drain timeout): its cgroup,
    /// or its process group without one. Also a generation whose leader
    /// exited but whose cgroup still has processes.
    pub fn kill(&mut self, number: u64) {
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        let reachable = self.processes.contains_key(&number) || self.cgroups.contains_key(&number);
        if reachable && (live || self.members_left.contains(&number)) {
            self.kill_group(number);
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
        let Some(number) = self
            .generations
            .by_pid(pid)
            .filter(|g| !self.leaderless.contains(&g.number))
            .map(|g| g.number)
        else {
            return ExitEffect::None;
        };
        if self.daemonized(number, how) {
            return ExitEffect::None;
        }
        self.exited_as(number, pid, how)
    }

    /// Generation `number` ended (its leader `pid` exited, or its cgroup
    /// emptied): `how` says how.
    pub(super) fn exited_as(&mut self, number: u64, pid: u32, how: &str) -> ExitEffect {
        let Some(state) = self.generations.get(number).map(|g| g.state) else {
            return ExitEffect::None;
        };
        // A draining generation whose leader exited may still finish its
        // connections in other processes of its cgroup: it has exited once
        // the cgroup is empty, or is killed at its drain timeout. Any other
        // leader's exit is an end (a failed start, a crash): what is left
        // of it goes now.
        let finishing = state == State::Draining && self.cgroups.contains_key(&number);
        if !finishing {
            self.kill_group(number);
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
            State::Canary => {
                self.canary_exited(number, how);
                self.end(number, State::Exited, how.to_owned());
                ExitEffect::Ended { generation: number }
            }
            State::Active => {
                error!(generation = number, pid, "active generation {how}");
                let reinstated = match self.canary() {
                    // The canary is ready and serves: it takes over.
                    Some(canary) => {
                        warn!(
                            generation = canary,
                            "promoting the canary: the active generation {how}"
                        );
                        self.promote().ok().map(|(promoted, _)| promoted)
                    }
                    None => self.reinstate_previous(number, how, None),
                };
                if reinstated.is_none() {
                    // No generation serves until the restart is active: new
                    // connections wait on the bridge (or the kernel picks).
                    for listener in self.listeners() {
                        if let Err(error) = self.steering.set_active(listener, None) {
                            error!(error = %crate::error_chain(&error), listener, "clearing the active slot");
                        }
                    }
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
                ExitEffect::Crashed {
                    generation: number,
                    reinstated,
                }
            }
            State::Exited | State::Failed => ExitEffect::None,
        }
    }

    /// The active generation `failed` (exited, or lost its listener for an
    /// address): the previous generation becomes active again at once if
    /// it still holds its listeners — it drains but has not been sent the
    /// drain signal — with one map update per listener. Otherwise the maps
    /// are left alone: a generation that lost its listeners for a moment
    /// (workers recycled together) keeps its slot and the bridge holds
    /// connections until it listens again; one that exited is taken out by
    /// [`Self::exited`].
    pub(super) fn reinstate_previous(
        &mut self,
        failed: u64,
        why: &str,
        listening: Option<&std::collections::BTreeSet<u64>>,
    ) -> Option<u64> {
        let previous = self
            .generations
            .reinstatable()
            .map(|g| (g.number, g.slot))
            .filter(|(n, _)| {
                let covered: std::collections::BTreeSet<usize> = self
                    .sockets(*n)
                    .iter()
                    .filter(|s| listening.is_none_or(|l| l.contains(&s.socket.inode)))
                    .map(|s| s.listener)
                    .collect();
                covered.len() == self.config.listen.len()
            });
        let (previous, slot) = previous?;
        for listener in self.listeners() {
            if let Err(error) = self.steering.set_active(listener, Some(slot)) {
                error!(error = %crate::error_chain(&error), listener, "reinstating");
            }
        }
        let _ = self
            .generations
            .transition(previous, State::Active, Instant::now(), None);
        // An automatic rollback (held or still settling: either way the
        // previous generation serves again).
        self.hold = None;
        self.stats
            .rollbacks
            .add(crate::status::RollbackReason::Crash);
        warn!(
            generation = previous,
            failed, "reinstated: its successor {why} while it still held its listeners"
        );
        self.reinstated.insert(
            failed,
            super::Reinstated {
                previous,
                why: why.to_owned(),
                rolled_back: false,
                health: false,
            },
        );
        // During a hold, `reload --wait` answered at the cutover: the
        // reload is reported failed from now on.
        if let Some(last) = self.last_reload.as_mut().filter(|r| r.generation == failed) {
            last.result = ReloadResult::Failed;
            let detail = format!(
                "generation {failed} {why} after the cutover; generation {previous} was made \
                 active again"
            );
            last.failure = Some(crate::error::ReloadFailure {
                kind: crate::error::FailureKind::CrashedAfterCutover,
                detail: detail.clone(),
                active: Some(previous),
            });
            last.error = Some(format!(
                "generation {failed} {why} after the cutover; generation {previous} was made \
                 active again"
            ));
        }
        Some(previous)
    }

    /// Why the reload that made `number` active did not hold, if it did
    /// not: it ended or was rolled back before the barrier. The result is
    /// `RolledBack` for a rollback, `Failed` otherwise. A generation that
    /// was replaced by a later reload (it went from active to draining, and
    /// nothing was made active again in its place) held: that it has exited
    /// since is the later reload's doing, not a failure of its own.
    pub fn failed_after_cutover(
        &self,
        number: u64,
    ) -> Option<(ReloadResult, crate::error::FailureKind, String)> {
        use crate::error::FailureKind;
        if let Some(r) = self.reinstated.get(&number) {
            let (result, kind) = match (r.rolled_back, r.health) {
                (true, true) => (ReloadResult::RolledBack, FailureKind::RolledBackByHealth),
                (true, false) => (ReloadResult::RolledBack, FailureKind::RolledBack),
                (false, _) => (ReloadResult::Failed, FailureKind::CrashedAfterCutover),
            };
            return Some((
                result,
                kind,
                format!(
                    "generation {number} {} after the cutover; generation {} (still holding its \
                     listeners) was made active again",
                    r.why, r.previous
                ),
            ));
        }
        let g = self.generations.get(number)?;
        let replaced = g.timeline.active.is_some() && g.timeline.draining.is_some();
        (!g.state.is_live() && !replaced).then(|| {
            (
                ReloadResult::Failed,
                FailureKind::CrashedAfterCutover,
                format!(
                    "generation {number} {} after the cutover",
                    g.outcome.as_deref().unwrap_or("ended")
                ),
            )
        })
    }

    /// When the active generation, if it stopped listening and nothing
    /// replaces it yet, is to be replaced: once it has not listened for
    /// as long as the bridge holds connections.
    pub fn replace_not_listening_at(&self) -> Option<Instant> {
        let n = self.not_listening.filter(|n| !n.replacing)?;
        (self.active() == Some(n.generation)).then_some(n.since + super::bridges::HOLD_LIMIT)
    }

    /// The active generation has not listened on a managed address for
    /// [`super::bridges::HOLD_LIMIT`]: it is replaced by a new generation
    /// (the caller starts it, under the crash policy's backoff), counted
    /// as a restart, and the bridges hold new connections meanwhile.
    /// Returns the generation and the address, or `None` if it listens
    /// again (or another generation is active).
    pub fn replace_not_listening(&mut self) -> Option<(u64, crate::listen::ListenerSpec)> {
        let n = self.not_listening.as_mut().filter(|n| !n.replacing)?;
        if self.generations.active().map(|g| g.number) != Some(n.generation) {
            self.not_listening = None;
            return None;
        }
        n.replacing = true;
        self.stats.restarts += 1;
        self.stats.restarts_stopped_listening += 1;
        Some((n.generation, n.addr))
    }

    /// The reload that was to replace a generation that stopped listening
    /// failed: the bridges no longer hold on for it.
    pub fn replacement_failed(&mut self) {
        if let Some(n) = self.not_listening.as_mut() {
            n.replacing = false;
            n.since = Instant::now();
        }
    }

    /// Whether a generation is being started in place of one that stopped
    /// listening (the bridges hold their connections for it).
    pub fn replacing_not_listening(&self) -> bool {
        self.not_listening.is_some_and(|n| n.replacing)
    }

    /// The delay before the next restart after a crash or a failed
    /// restart (doubling from 100 ms to 10 s).
    pub fn next_restart_delay(&mut self) -> Duration {
        let delay = self.restart_backoff;
        self.restart_backoff = (delay * 2).min(RESTART_BACKOFF_MAX);
        delay
    }

    /// A generation ended: its counters are frozen, its slot emptied.
    pub(super) fn end(&mut self, number: u64, next: State, outcome: String) {
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
        self.cgroup_after_end(number);
        if self
            .hold
            .is_some_and(|h| h.held == number || h.successor == number)
        {
            self.hold = None;
        }
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
        self.reinstated.retain(|n, _| known(n));
        self.stderr.retain(|n, _| known(n));
        self.early_exits.retain(|n, _| known(n));
        self.evicting.retain(|n, _| known(n));
        self.sockets.retain(|n, _| known(n));
        self.canary_verdicts.retain(|n, _| known(n));
        let live = |n: &u64| self.generations.get(*n).is_some_and(|g| g.state.is_live());
        self.health.retain(|n, _| live(n));
        self.rates.retain(|n, _| live(n));
    }

    // ---- Stop.

    /// Begins the stop: no generation begins any more; the active one
    /// drains like the others (its exit is no crash). Returns the live
    /// generations: those that served drain, the others are killed.
    pub fn begin_stop(&mut self) -> Vec<(u64, State)> {
        self.stopping = true;
        self.close_bridges();
        let live = self.live();
        let now = Instant::now();
        self.hold = None;
        self.canary = None;
        for &(number, state) in &live {
            match state {
                State::Active | State::Canary => {
                    let _ = self
                        .generations
                        .transition(number, State::Draining, now, None);
                }
                State::Starting | State::Ready => {
                    self.kill_group(number);
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
}
