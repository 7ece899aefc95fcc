//! Generations of the managed server and their lifecycle: a pure state
//! machine (no syscalls), so every rule here is unit tested.
//!
//! ```text
//! starting ──► ready ──► active ──► draining ──► exited
//!    │           │  │       │  ▲          │
//!    └──► failed ◄┘  │       │  └──────────┘ reinstated (its successor
//!                   │       │               crashed, failed its health
//!                   │       │               probe or was rolled back
//!                   │       │               while it still held its
//!                   │       │               listeners)
//!                   │       └──► exited (crashed while active)
//!                   └──► canary ──► active (promoted)
//!                          │  └──► draining (rolled back)
//!                          └──► exited (crashed while a canary)
//! ```
//!
//! A generation occupies one steering slot from spawn until it has exited;
//! the slot is then free for a later generation. At most one generation is
//! active.

use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

/// Lifecycle states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Spawned; its listeners are not all found yet, or its probe has not
    /// passed.
    Starting,
    /// Holds a registered listener for every address and passed its probe.
    Ready,
    /// Receives every new connection (but the canary's share).
    Active,
    /// Receives a share of new connections beside the active generation
    /// (`reload --canary`) until it is promoted or rolled back.
    Canary,
    /// Told to drain; receives nothing new.
    Draining,
    /// Its process has exited.
    Exited,
    /// Never became ready (killed, or exited while starting).
    Failed,
}

impl State {
    /// Whether the generation still holds its slot.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Ready | Self::Active | Self::Canary | Self::Draining
        )
    }

    fn can_become(self, next: Self) -> bool {
        use State::*;
        matches!(
            (self, next),
            (Starting, Ready | Failed)
                | (Ready, Active | Canary | Failed)
                | (Canary, Active | Draining | Exited)
                | (Active, Draining | Exited)
                | (Draining, Exited | Active)
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Active => "active",
            Self::Canary => "canary",
            Self::Draining => "draining",
            Self::Exited => "exited",
            Self::Failed => "failed",
        })
    }
}

/// When each step happened.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub spawned: Option<Instant>,
    pub ready: Option<Instant>,
    pub active: Option<Instant>,
    pub draining: Option<Instant>,
    /// When it was sent the drain signal (it may close its listeners from
    /// then on).
    pub signalled: Option<Instant>,
    pub ended: Option<Instant>,
}

/// One generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub number: u64,
    pub slot: u32,
    pub pid: Option<u32>,
    pub state: State,
    pub timeline: Timeline,
    /// How it ended: exit status, or why it failed.
    pub outcome: Option<String>,
    /// The digest of the `--config` files it was started with.
    pub config_sha256: Option<String>,
    /// It was rolled back: it never serves new connections again, even if
    /// the generation that replaced it fails.
    pub rolled_back: bool,
}

/// Errors of the state machine (bugs in the caller, or races it must
/// handle by re-reading state).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GenerationError {
    /// No generation with this number is known.
    #[error("generation {number} does not exist")]
    Unknown { number: u64 },
    /// The transition is not allowed.
    #[error("generation {number} cannot go from {from} to {to}")]
    InvalidTransition { number: u64, from: State, to: State },
    /// Every slot is taken by a live generation.
    #[error("all {slots} steering slots are held by live generations")]
    NoFreeSlot { slots: u32 },
}

/// All generations of an instance: live ones and a short history.
#[derive(Debug)]
pub struct Generations {
    slots: u32,
    history: usize,
    next: u64,
    list: Vec<Generation>,
}

impl Generations {
    /// `slots` steering slots; keeps the last `history` ended generations.
    pub fn new(slots: u32, history: usize) -> Self {
        Self {
            slots,
            history,
            next: 1,
            list: Vec::new(),
        }
    }

    /// Rebuilds the generations a previous controller left running
    /// (`(number, slot, pid, state)`); numbering continues at `next`.
    pub fn restore(
        slots: u32,
        history: usize,
        next: u64,
        live: impl IntoIterator<Item = (u64, u32, u32, State)>,
        now: Instant,
    ) -> Self {
        let list = live
            .into_iter()
            .map(|(number, slot, pid, state)| Generation {
                number,
                slot,
                pid: Some(pid),
                state,
                timeline: Timeline {
                    spawned: Some(now),
                    ..Timeline::default()
                },
                outcome: None,
                config_sha256: None,
                rolled_back: false,
            })
            .collect();
        Self {
            slots,
            history,
            next,
            list,
        }
    }

    /// The number the next generation will get.
    pub fn next_number(&self) -> u64 {
        self.next
    }

    /// Starts the next generation in a free slot (its process is not
    /// spawned yet: see [`Generations::set_pid`]).
    pub fn begin(&mut self, now: Instant) -> Result<&Generation, GenerationError> {
        let slot = self
            .free_slot()
            .ok_or(GenerationError::NoFreeSlot { slots: self.slots })?;
        let number = self.next;
        self.next += 1;
        self.list.push(Generation {
            number,
            slot,
            pid: None,
            state: State::Starting,
            timeline: Timeline {
                spawned: Some(now),
                ..Timeline::default()
            },
            outcome: None,
            config_sha256: None,
            rolled_back: false,
        });
        Ok(self.list.last().expect("just pushed"))
    }

    /// The lowest slot no live generation holds.
    pub fn free_slot(&self) -> Option<u32> {
        (0..self.slots).find(|slot| {
            !self
                .list
                .iter()
                .any(|g| g.state.is_live() && g.slot == *slot)
        })
    }

    pub fn set_pid(&mut self, number: u64, pid: u32) -> Result<(), GenerationError> {
        self.get_mut(number)?.pid = Some(pid);
        Ok(())
    }

    /// Records the digest of the configuration `number` was started with.
    pub fn set_config_sha256(
        &mut self,
        number: u64,
        digest: Option<String>,
    ) -> Result<(), GenerationError> {
        self.get_mut(number)?.config_sha256 = digest;
        Ok(())
    }

    /// Records that `number` was sent the drain signal.
    pub fn signalled(&mut self, number: u64, now: Instant) -> Result<(), GenerationError> {
        self.get_mut(number)?.timeline.signalled = Some(now);
        Ok(())
    }

    /// The newest draining generation that has not been signalled yet: it
    /// still holds its listeners and could serve again (unless it was
    /// rolled back).
    pub fn reinstatable(&self) -> Option<&Generation> {
        self.list.iter().rev().find(|g| {
            g.state == State::Draining && g.timeline.signalled.is_none() && !g.rolled_back
        })
    }

    /// Marks `number` as rolled back (see [`Generation::rolled_back`]).
    pub fn roll_back(&mut self, number: u64) -> Result<(), GenerationError> {
        self.get_mut(number)?.rolled_back = true;
        Ok(())
    }

    /// The generation receiving a canary share, if any.
    pub fn canary(&self) -> Option<&Generation> {
        self.list.iter().find(|g| g.state == State::Canary)
    }

    /// Moves `number` to `next`, recording when; `outcome` says how it
    /// ended for `Exited` and `Failed`.
    pub fn transition(
        &mut self,
        number: u64,
        next: State,
        now: Instant,
        outcome: Option<String>,
    ) -> Result<(), GenerationError> {
        let generation = self.get_mut(number)?;
        if !generation.state.can_become(next) {
            return Err(GenerationError::InvalidTransition {
                number,
                from: generation.state,
                to: next,
            });
        }
        generation.state = next;
        let t = &mut generation.timeline;
        match next {
            State::Ready => t.ready = Some(now),
            State::Active => {
                t.active = Some(now);
                t.draining = None;
            }
            State::Draining => t.draining = Some(now),
            State::Exited | State::Failed => {
                t.ended = Some(now);
                generation.outcome = outcome;
            }
            State::Starting | State::Canary => {}
        }
        self.prune();
        Ok(())
    }

    pub fn get(&self, number: u64) -> Option<&Generation> {
        self.list.iter().find(|g| g.number == number)
    }

    fn get_mut(&mut self, number: u64) -> Result<&mut Generation, GenerationError> {
        self.list
            .iter_mut()
            .find(|g| g.number == number)
            .ok_or(GenerationError::Unknown { number })
    }

    /// The generation that receives new connections.
    pub fn active(&self) -> Option<&Generation> {
        self.list.iter().find(|g| g.state == State::Active)
    }

    /// The live generation whose process is `pid`.
    pub fn by_pid(&self, pid: u32) -> Option<&Generation> {
        self.list
            .iter()
            .find(|g| g.state.is_live() && g.pid == Some(pid))
    }

    /// Generations still draining, oldest first.
    pub fn draining(&self) -> impl Iterator<Item = &Generation> {
        self.list.iter().filter(|g| g.state == State::Draining)
    }

    /// Generations with a live process.
    pub fn live(&self) -> impl Iterator<Item = &Generation> {
        self.list.iter().filter(|g| g.state.is_live())
    }

    /// Every generation known, oldest first.
    pub fn all(&self) -> &[Generation] {
        &self.list
    }

    /// Drops the oldest ended generations beyond the history length.
    fn prune(&mut self) {
        let ended = self.list.iter().filter(|g| !g.state.is_live()).count();
        let mut excess = ended.saturating_sub(self.history);
        self.list.retain(|g| {
            if excess > 0 && !g.state.is_live() {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// Formats a duration for people: `850µs`, `12.3ms`, `1.2s`, `3m05s`.
pub fn human_duration(d: Duration) -> String {
    // One decimal at most, none when it is 0: `10s`, `1.2s`, `250ms`.
    fn short(value: f64, unit: &str) -> String {
        let text = format!("{value:.1}");
        format!("{}{unit}", text.strip_suffix(".0").unwrap_or(&text))
    }
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        short(micros as f64 / 1_000.0, "ms")
    } else if d.as_secs() < 60 {
        short(d.as_secs_f64(), "s")
    } else {
        let s = d.as_secs();
        match s % 60 {
            0 => format!("{}m", s / 60),
            rest => format!("{}m{rest}s", s / 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gens() -> Generations {
        Generations::new(4, 2)
    }

    #[test]
    fn a_generation_walks_the_happy_path() {
        let mut g = gens();
        let now = Instant::now();
        let n = g.begin(now).unwrap().number;
        assert_eq!(n, 1);
        for s in [State::Ready, State::Active, State::Draining, State::Exited] {
            g.transition(n, s, now, None).unwrap();
        }
        assert_eq!(g.get(n).unwrap().state, State::Exited);
        assert!(g.get(n).unwrap().timeline.ended.is_some());
    }

    #[test]
    fn invalid_transitions_are_refused() {
        let mut g = gens();
        let now = Instant::now();
        let n = g.begin(now).unwrap().number;
        assert_eq!(
            g.transition(n, State::Active, now, None),
            Err(GenerationError::InvalidTransition {
                number: n,
                from: State::Starting,
                to: State::Active
            })
        );
        g.transition(n, State::Failed, now, Some("exited".into()))
            .unwrap();
        assert!(
            g.transition(n, State::Ready, now, None).is_err(),
            "failed is final"
        );
        let m = g.begin(now).unwrap().number;
        assert!(
            g.transition(m, State::Draining, now, None).is_err(),
            "only an active generation drains"
        );
        assert_eq!(
            g.transition(99, State::Ready, now, None),
            Err(GenerationError::Unknown { number: 99 })
        );
    }

    #[test]
    fn slots_are_reused_only_after_exit() {
        let mut g = gens();
        let now = Instant::now();
        let slots: Vec<u32> = (0..4).map(|_| g.begin(now).unwrap().slot).collect();
        assert_eq!(slots, vec![0, 1, 2, 3]);
        assert_eq!(
            g.begin(now).unwrap_err(),
            GenerationError::NoFreeSlot { slots: 4 }
        );
        g.transition(2, State::Failed, now, None).unwrap();
        let next = g.begin(now).unwrap();
        assert_eq!((next.number, next.slot), (5, 1), "generation 2 held slot 1");
    }

    #[test]
    fn history_is_bounded_and_live_generations_are_kept() {
        let mut g = gens();
        let now = Instant::now();
        for _ in 0..3 {
            let n = g.begin(now).unwrap().number;
            g.transition(n, State::Failed, now, None).unwrap();
        }
        let live = g.begin(now).unwrap().number;
        assert_eq!(
            g.all().iter().map(|x| x.number).collect::<Vec<_>>(),
            vec![2, 3, live]
        );
    }

    #[test]
    fn one_active_and_draining_in_order() {
        let mut g = gens();
        let now = Instant::now();
        for _ in 0..3 {
            let n = g.begin(now).unwrap().number;
            g.transition(n, State::Ready, now, None).unwrap();
            if let Some(active) = g.active().map(|a| a.number) {
                g.transition(active, State::Draining, now, None).unwrap();
            }
            g.transition(n, State::Active, now, None).unwrap();
        }
        assert_eq!(g.active().unwrap().number, 3);
        assert_eq!(
            g.draining().map(|d| d.number).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // The newest draining generation not yet signalled can come back.
        g.signalled(1, now).unwrap();
        assert_eq!(g.reinstatable().map(|r| r.number), Some(2));
        g.signalled(2, now).unwrap();
        assert!(g.reinstatable().is_none());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(human_duration(Duration::from_micros(12_340)), "12.3ms");
        assert_eq!(human_duration(Duration::from_millis(1_200)), "1.2s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m5s");
        assert_eq!(human_duration(Duration::from_secs(120)), "2m");
        assert_eq!(human_duration(Duration::from_secs(10)), "10s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        // What a client's remaining timeout looked like (9s 999ms 999us 620ns).
        assert_eq!(human_duration(Duration::from_nanos(9_999_999_620)), "10s");
    }
}
