//! Rollback and canary, the state side: `--keep-previous` holds the
//! previous generation after a cutover, `reload --canary` splits new
//! connections between the active generation and a canary, `reloader
//! promote` and `reloader rollback` end either.
//!
//! Both rest on one fact: a generation that still holds its listeners and
//! was not told to drain can serve again, and where new connections go is
//! one map value per listener ([`crate::steering::Split`]). So a rollback
//! is one map update per listener, made under the state's lock: the
//! program sees the new split at the next SYN (or new UDP flow), without a
//! process start. What was rolled back from drains like any old
//! generation; it is never made active again (see
//! [`crate::generation::Generation::rolled_back`]).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::InstanceState;
use crate::{
    config::CanaryPlan,
    error::{ReloadError, RolloutError},
    generation::State,
    status::{HealthStatus, RollbackReason, RolloutKind, RolloutStatus},
    steering::{Split, WEIGHT_SCALE},
};

/// The previous generation, kept after a cutover (`--keep-previous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub held: u64,
    /// The generation that replaced it (active).
    pub successor: u64,
    /// When the hold ends and `held` is told to drain.
    pub until: Instant,
    /// The same, as wall-clock milliseconds since the epoch (for the state
    /// file: a restarted controller keeps the hold).
    pub until_unix_ms: u64,
}

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
    fn weight(&self) -> u32 {
        self.steps[self.step]
    }

    /// When the running step ends, if steps are timed.
    fn step_ends(&self) -> Option<Instant> {
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

/// Health checks of one generation.
#[derive(Clone, Debug, Default)]
pub struct HealthRecord {
    checks: u64,
    failures: u32,
    last_error: Option<String>,
}

/// New connections steered to a generation per second, from two samples
/// of its counter.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    at: Instant,
    steered: u64,
    per_second: Option<f64>,
}

impl InstanceState {
    // ---- Hold.

    /// `successor` just became active in place of `previous`: with
    /// `--keep-previous`, `previous` is held (at least `--settle`). A hold
    /// of an older generation ends: that one drains now.
    pub(super) fn hold_previous(&mut self, previous: Option<u64>, successor: u64, now: Instant) {
        let keep = self.config.keep_previous;
        self.hold = match previous {
            Some(held) if !keep.is_zero() => {
                let hold_for = keep.max(self.config.settle);
                let until = now + hold_for;
                info!(
                    generation = held,
                    keep = %crate::generation::human_duration(keep),
                    "held: `reloader rollback` makes it active again"
                );
                Some(Hold {
                    held,
                    successor,
                    until,
                    until_unix_ms: unix_ms(std::time::SystemTime::now() + hold_for),
                })
            }
            _ => None,
        };
    }

    /// Until when generation `number` is held, if it is.
    pub fn hold_until(&self, number: u64) -> Option<Instant> {
        self.hold.filter(|h| h.held == number).map(|h| h.until)
    }

    /// The hold under way.
    pub fn hold(&self) -> Option<Hold> {
        self.hold
    }

    /// A hold restored from the state file of a previous controller, if
    /// its generations are still as it left them.
    pub fn restore_hold(&mut self, saved: &super::saved::SavedHold) {
        let left = Duration::from_millis(
            saved
                .until_unix_ms
                .saturating_sub(unix_ms(std::time::SystemTime::now())),
        );
        let hold = Hold {
            held: saved.held,
            successor: saved.successor,
            until: Instant::now() + left,
            until_unix_ms: saved.until_unix_ms,
        };
        let held_draining = self
            .generations
            .get(hold.held)
            .is_some_and(|g| g.state == State::Draining);
        let successor_active = self.active() == Some(hold.successor);
        if held_draining && successor_active {
            self.hold = Some(hold);
        }
    }

    // ---- Canary.

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
        if self.config.health.is_some() {
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
    pub(super) fn canary_exited(&mut self, number: u64, how: &str) {
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

    // ---- Rollback.

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
            super::Reinstated {
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
    fn set_split_everywhere(
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

    // ---- Health.

    /// Generations to health-check now: the new one first (a canary, or
    /// the successor of a held generation), then the one a rollback would
    /// bring back. Empty when no rollback is possible.
    pub fn health_targets(&self) -> Vec<u64> {
        if let Some(c) = &self.canary {
            return vec![c.generation, c.previous];
        }
        if let Some(h) = &self.hold {
            return vec![h.successor, h.held];
        }
        Vec::new()
    }

    /// Records a health check of `number`; true when it makes the new
    /// generation unhealthy (its `--health-failures`th failure in a row):
    /// time to roll back.
    pub fn health_checked(&mut self, number: u64, result: Result<(), String>) -> bool {
        let threshold = self.config.health.as_ref().map_or(u32::MAX, |h| h.failures);
        let record = self.health.entry(number).or_default();
        record.checks += 1;
        match result {
            Ok(()) => record.failures = 0,
            Err(error) => {
                warn!(
                    generation = number,
                    failures = record.failures + 1,
                    "health check failed: {error}"
                );
                record.failures += 1;
                record.last_error = Some(error);
            }
        }
        let failures = record.failures;
        let is_new = self.canary.as_ref().is_some_and(|c| c.generation == number)
            || self.hold.is_some_and(|h| h.successor == number);
        is_new && failures == threshold
    }

    pub(super) fn health_status(&self, number: u64) -> Option<HealthStatus> {
        self.health.get(&number).map(|h| HealthStatus {
            checks: h.checks,
            consecutive_failures: h.failures,
            last_error: h.last_error.clone(),
        })
    }

    // ---- What status shows.

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

    pub(super) fn steered_per_second(&self, number: u64) -> Option<f64> {
        self.rates.get(&number).and_then(|r| r.per_second)
    }

    /// The share of new connections generation `number` gets now, in
    /// percent (None if it is not live).
    pub(super) fn weight_percent(&self, number: u64) -> Option<f64> {
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

    pub(super) fn rollout_status(&self, now: Instant) -> Option<RolloutStatus> {
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

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rollback_why(reason: RollbackReason) -> String {
    match reason {
        RollbackReason::Manual => "`reloader rollback`".into(),
        RollbackReason::Crash => "the new generation exited".into(),
        RollbackReason::Health => "the new generation failed its health checks".into(),
    }
}
