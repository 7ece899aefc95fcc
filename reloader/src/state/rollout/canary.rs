//! `reload --canary`: a share of new connections for the new generation,
//! in timed steps or until `promote`; and what status shows of it.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::super::InstanceState;
use crate::{
    config::CanaryPlan,
    error::{ReloadError, RolloutError},
    generation::State,
    status::{RollbackReason, RolloutKind, RolloutStatus},
    steering::{Split, WEIGHT_SCALE},
};

/// A canary under way.
#[derive(Clone, Debug)]
pub struct CanaryRun {
    pub generation: u64,
    /// The active generation beside it.
    pub previous: u64,
    /// Weights per step (parts of [`WEIGHT_SCALE`]).
    pub steps: Vec<u32>,
    pub step: usize,
    /// How long each step lasts (None: until `promote` or `rollback`).
    pub dwell: Option<Duration>,
    pub step_started: Instant,
}

impl CanaryRun {
    pub(in crate::state) fn weight(&self) -> u32 {
        self.steps[self.step]
    }

    /// When the running step ends, if steps are timed.
    pub(in crate::state) fn step_ends(&self) -> Option<Instant> {
        self.dwell.map(|d| self.step_started + d)
    }
}

/// How a canary ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryVerdict {
    Promoted,
    RolledBack { reason: RollbackReason, why: String },
}

impl CanaryVerdict {
    /// The verdict of a canary that ended without one recorded.
    pub fn ended() -> Self {
        Self::RolledBack {
            reason: RollbackReason::Crash,
            why: "it ended".into(),
        }
    }
}

/// Where a canary reload stands, for the task waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryPhase {
    /// It runs; its step ends then (if timed).
    Running {
        step_ends: Option<Instant>,
    },
    Ended(CanaryVerdict),
}

/// What advancing a timed canary did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advanced {
    /// Not due yet, or held back by failing health checks.
    Waiting,
    /// The next step's weight is set.
    Step { weight: u32 },
    /// The last step passed: promoted.
    Promoted,
}

/// New connections steered to a generation per second, from two samples
/// of its counter.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub(in crate::state) at: Instant,
    pub(in crate::state) steered: u64,
    pub(in crate::state) per_second: Option<f64>,
}

impl InstanceState {
    /// Step 6 of a canary reload: `number` gets the first step's share of
    /// new connections beside the active generation. Without an active
    /// generation there is nothing to split with: it cuts over fully.
    pub fn start_canary(
        &mut self,
        number: u64,
        ready: Instant,
        plan: &CanaryPlan,
    ) -> Result<Instant, ReloadError> {
        let Some((previous, previous_slot)) = self.generations.active().map(|g| (g.number, g.slot))
        else {
            warn!(
                generation = number,
                "no active generation to split with: cutting over fully"
            );
            return self.cut_over(number, ready);
        };
        self.check_alive(number)?;
        self.generations
            .transition(number, State::Ready, ready, None)
            .map_err(|e| ReloadError::Internal {
                what: e.to_string(),
            })?;
        let slot = self.generations.get(number).expect("ready").slot;
        let weight = plan.steps[0];
        let split = Split {
            active: Some(previous_slot),
            canary: Some((slot, weight)),
        };
        let undo = Split {
            active: Some(previous_slot),
            canary: None,
        };
        self.set_split_everywhere(split, undo)
            .map_err(|(addr, source)| ReloadError::SteeringError {
                addr,
                what: "canary split failed",
                source,
            })?;
        let now = Instant::now();
        self.generations
            .transition(number, State::Canary, now, None)
            .expect("ready can become a canary");
        info!(
            generation = number,
            share = %format!("{}%", CanaryPlan::percent(weight)),
            beside = previous,
            "canary"
        );
        self.canary = Some(CanaryRun {
            generation: number,
            previous,
            steps: plan.steps.clone(),
            step: 0,
            dwell: plan.dwell(),
            step_started: now,
        });
        Ok(now)
    }

    /// Rebuilds the canary of an adopted generation from the split the
    /// pinned map still holds (its steps and timing are not kept: it waits
    /// for `promote` or `rollback`).
    /// Returns the active generation beside it.
    pub fn adopted_canary(&mut self, number: u64) -> Option<u64> {
        let previous = self.active()?;
        let weight = self
            .listeners()
            .find_map(|l| self.steering.split(l).ok()?.canary.map(|(_, w)| w))
            .unwrap_or(1);
        self.canary = Some(CanaryRun {
            generation: number,
            previous,
            steps: vec![weight],
            step: 0,
            dwell: None,
            step_started: Instant::now(),
        });
        Some(previous)
    }

    /// Where canary `number` stands.
    pub fn canary_phase(&self, number: u64) -> CanaryPhase {
        if let Some(c) = self.canary.as_ref().filter(|c| c.generation == number) {
            return CanaryPhase::Running {
                step_ends: c.step_ends(),
            };
        }
        CanaryPhase::Ended(
            self.canary_verdicts
                .get(&number)
                .cloned()
                .unwrap_or_else(CanaryVerdict::ended),
        )
    }

    /// The generation running as a canary.
    pub fn canary(&self) -> Option<u64> {
        self.canary.as_ref().map(|c| c.generation)
    }

    /// Moves a timed canary on when its step has passed and it is healthy
    /// (with `--health-probe`: checked at least once, no failure since).
    pub fn advance_canary(&mut self, number: u64, now: Instant) -> Advanced {
        let Some(c) = self.canary.as_ref().filter(|c| c.generation == number) else {
            return Advanced::Waiting;
        };
        if c.step_ends().is_none_or(|end| now < end) {
            return Advanced::Waiting;
        }
        if self.config.rollout.health.is_some() {
            let healthy = self
                .health
                .get(&number)
                .is_some_and(|h| h.checks > 0 && h.failures == 0);
            if !healthy {
                return Advanced::Waiting;
            }
        }
        if c.step + 1 >= c.steps.len() {
            return match self.promote() {
                Ok(_) => Advanced::Promoted,
                Err(error) => {
                    warn!(error = %crate::error_chain(&error), "promoting the canary");
                    Advanced::Waiting
                }
            };
        }
        let (previous, weight, now_weight, slot) = {
            let c = self.canary.as_ref().expect("checked");
            let slot = self.generations.get(number).map(|g| g.slot);
            (c.previous, c.steps[c.step + 1], c.weight(), slot)
        };
        let previous_slot = self.generations.get(previous).map(|g| g.slot);
        let Some(slot) = slot else {
            return Advanced::Waiting;
        };
        let split = Split {
            active: previous_slot,
            canary: Some((slot, weight)),
        };
        let undo = Split {
            canary: Some((slot, now_weight)),
            ..split
        };
        if let Err((addr, error)) = self.set_split_everywhere(split, undo) {
            warn!(%addr, error = %crate::error_chain(&error), "next canary step");
            return Advanced::Waiting;
        }
        let c = self.canary.as_mut().expect("checked");
        c.step += 1;
        c.step_started = now;
        info!(
            generation = number,
            share = %format!("{}%", CanaryPlan::percent(weight)),
            "canary step"
        );
        Advanced::Step { weight }
    }

    /// `reloader promote`: the canary gets every new connection; the
    /// generation beside it drains (or is held, with `--keep-previous`).
    pub fn promote(&mut self) -> Result<(u64, u64), RolloutError> {
        let Some(c) = self.canary.clone() else {
            return Err(RolloutError::NoCanary);
        };
        let slot = self
            .generations
            .get(c.generation)
            .map(|g| g.slot)
            .ok_or(RolloutError::NoCanary)?;
        let before = Split {
            active: self.generations.get(c.previous).map(|g| g.slot),
            canary: Some((slot, c.weight())),
        };
        self.set_split_everywhere(
            Split {
                active: Some(slot),
                canary: None,
            },
            before,
        )
        .map_err(|(addr, source)| RolloutError::SteeringError {
            addr,
            what: "promoting the canary failed",
            source,
        })?;
        let now = Instant::now();
        self.canary = None;
        self.rates.clear();
        let previous = self
            .generations
            .active()
            .map(|g| g.number)
            .filter(|n| *n == c.previous);
        if let Some(previous) = previous {
            let _ = self
                .generations
                .transition(previous, State::Draining, now, None);
        }
        let _ = self
            .generations
            .transition(c.generation, State::Active, now, None);
        self.hold_previous(previous, c.generation, now);
        self.canary_verdicts
            .insert(c.generation, CanaryVerdict::Promoted);
        info!(generation = c.generation, "canary promoted: active");
        Ok((c.generation, c.previous))
    }

    /// The canary ended on its own (exited): everything goes back to the
    /// active generation.
    pub(in crate::state) fn canary_exited(&mut self, number: u64, how: &str) {
        if self.canary.as_ref().is_none_or(|c| c.generation != number) {
            return;
        }
        warn!(generation = number, "canary {how}: rolled back");
        let active = self.generations.active().map(|g| g.slot);
        let back = Split {
            active,
            canary: None,
        };
        if let Err((addr, error)) = self.set_split_everywhere(back, back) {
            warn!(%addr, error = %crate::error_chain(&error), "rolling back the canary");
        }
        self.canary = None;
        self.rates.clear();
        self.stats.rollbacks.add(RollbackReason::Crash);
        self.canary_verdicts.insert(
            number,
            CanaryVerdict::RolledBack {
                reason: RollbackReason::Crash,
                why: format!("the canary {how}"),
            },
        );
    }

    /// Samples the steered counters of the canary and the generation
    /// beside it (once a second while a canary runs).
    pub fn sample_rates(&mut self, now: Instant) {
        let Some(c) = &self.canary else {
            return;
        };
        for number in [c.generation, c.previous] {
            let steered = self.counters(number).steered;
            let rate = match self.rates.get(&number) {
                Some(last) if now > last.at => {
                    let dt = (now - last.at).as_secs_f64();
                    Some(steered.saturating_sub(last.steered) as f64 / dt)
                }
                _ => None,
            };
            self.rates.insert(
                number,
                Rate {
                    at: now,
                    steered,
                    per_second: rate,
                },
            );
        }
    }

    pub(in crate::state) fn steered_per_second(&self, number: u64) -> Option<f64> {
        self.rates.get(&number).and_then(|r| r.per_second)
    }

    /// The share of new connections generation `number` gets now, in
    /// percent (None if it is not live).
    pub(in crate::state) fn weight_percent(&self, number: u64) -> Option<f64> {
        let g = self.generations.get(number)?;
        let canary = self.canary.as_ref().map(|c| (c.generation, c.weight()));
        Some(match (g.state, canary) {
            (State::Canary, Some((n, w))) if n == number => CanaryPlan::percent(w),
            (State::Active, Some((_, w))) => CanaryPlan::percent(WEIGHT_SCALE - w),
            (State::Active, None) => 100.0,
            (s, _) if s.is_live() => 0.0,
            _ => return None,
        })
    }

    pub(in crate::state) fn rollout_status(&self, now: Instant) -> Option<RolloutStatus> {
        if let Some(c) = &self.canary {
            return Some(RolloutStatus {
                kind: RolloutKind::Canary,
                generation: c.generation,
                previous: c.previous,
                weight_percent: CanaryPlan::percent(c.weight()),
                steps_percent: c.steps.iter().map(|w| CanaryPlan::percent(*w)).collect(),
                step: c.step,
                remaining_ms: c
                    .step_ends()
                    .map(|end| end.saturating_duration_since(now).as_millis() as u64),
            });
        }
        self.hold.map(|h| RolloutStatus {
            kind: RolloutKind::Hold,
            generation: h.successor,
            previous: h.held,
            weight_percent: 100.0,
            steps_percent: Vec::new(),
            step: 0,
            remaining_ms: Some(h.until.saturating_duration_since(now).as_millis() as u64),
        })
    }
}
