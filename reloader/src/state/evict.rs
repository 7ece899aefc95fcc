//! Bounding the draining generations: *eviction* ends a draining
//! generation's drain early — the drain signal now if it has not had it,
//! and its cgroup killed after [`EVICT_GRACE`] (`reload::drain::evicted`)
//! — so that old generations under long-lived connections neither pile up
//! nor make reloads wait.
//!
//! Two rules evict, oldest first, one generation at a time:
//! - `--drain-evict`: a reload that would exceed `--max-draining` evicts the
//!   oldest draining generation and goes on at once ([`EvictReason::Count`]);
//! - `--max-draining-memory`: when the draining generations together use
//!   more (their cgroups' `memory.current`, sampled about once a second
//!   while any drains, see `reload::drain::memory_budget`), the oldest
//!   is evicted ([`EvictReason::Memory`]); the next only once that one has
//!   exited, so one eviction's memory is seen freed before another is
//!   decided.
//!
//! An evicted generation still drains (it counts for nothing new) until it
//! exits; it does not count towards `--max-draining`.

use std::time::Duration;

use tracing::warn;

use super::InstanceState;
use crate::generation::{State, human_duration};

/// How long an evicted generation has between its drain signal and
/// SIGKILL: enough to close what it can cleanly, short enough that memory
/// and slots come back at once.
pub const EVICT_GRACE: Duration = Duration::from_secs(1);

/// Why a draining generation was evicted (`reloader_drain_evictions_total`'s
/// `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EvictReason {
    /// The draining generations used more than `--max-draining-memory`.
    Memory,
    /// A reload beyond `--max-draining`, with `--drain-evict`.
    Count,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Count => "count",
        }
    }
}

impl InstanceState {
    /// Draining generations that are not being evicted, oldest first.
    pub(super) fn draining_unevicted(&self) -> Vec<u64> {
        self.generations
            .draining()
            .map(|g| g.number)
            .filter(|n| !self.evicting.contains_key(n))
            .collect()
    }

    /// Whether generation `number` is being evicted (and why).
    pub fn evicting(&self, number: u64) -> Option<EvictReason> {
        self.evicting.get(&number).copied()
    }

    /// Evicts draining generation `number` (module comment): false if it
    /// does not drain or is being evicted already.
    pub fn evict(&mut self, number: u64, reason: EvictReason, why: &str) -> bool {
        let draining = self
            .generations
            .get(number)
            .is_some_and(|g| g.state == State::Draining);
        if !draining || self.evicting.contains_key(&number) {
            return false;
        }
        warn!(
            generation = number,
            reason = reason.as_str(),
            grace = %human_duration(EVICT_GRACE),
            "evicting a draining generation ({why}): its drain ends now, and its processes are \
             killed after the grace"
        );
        self.evicting.insert(number, reason);
        *self.stats.drain_evictions.entry(reason).or_default() += 1;
        let signalled = self
            .generations
            .get(number)
            .is_some_and(|g| g.timeline.signalled.is_some());
        if !signalled {
            self.drain_signal(number);
        }
        true
    }

    /// The grace of evicted generation `number` is over: kills what is
    /// left of it.
    pub fn kill_evicted(&mut self, number: u64) {
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        if self.evicting.contains_key(&number) && (live || self.members_left.contains(&number)) {
            self.kill_group(number);
        }
    }

    /// `--max-draining-memory`: the draining generations use `usage` bytes
    /// each now (generation, bytes). Evicts the oldest if together they use
    /// more than the budget and no eviction is under way; returns it.
    pub fn over_memory(&mut self, usage: &[(u64, u64)]) -> Option<u64> {
        let budget = self.config.drain.max_memory?;
        let under_way = self.evicting.keys().any(|&n| {
            self.generations.get(n).is_some_and(|g| g.state.is_live())
                || self.members_left.contains(&n)
        });
        if under_way {
            return None;
        }
        let draining = self.draining_unevicted();
        let total: u64 = usage
            .iter()
            .filter(|(n, _)| draining.contains(n))
            .map(|(_, bytes)| bytes)
            .sum();
        if total <= budget {
            return None;
        }
        let oldest = *draining.first()?;
        let why = format!(
            "the draining generations use {} together, over --max-draining-memory {}",
            crate::status::human_bytes(total),
            crate::status::human_bytes(budget)
        );
        self.evict(oldest, EvictReason::Memory, &why)
            .then_some(oldest)
    }
}
