//! `--keep-previous`: the previous generation held after a cutover, not
//! signalled, so `reloader rollback` can make it active again.

use std::time::{Duration, Instant};

use tracing::info;

use super::{super::InstanceState, unix_ms};
use crate::generation::State;

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

impl InstanceState {
    /// `successor` just became active in place of `previous`: with
    /// `--keep-previous`, `previous` is held (at least `--settle`). A hold
    /// of an older generation ends: that one drains now.
    pub(in crate::state) fn hold_previous(
        &mut self,
        previous: Option<u64>,
        successor: u64,
        now: Instant,
    ) {
        let keep = self.config.rollout.keep_previous;
        self.hold = match previous {
            Some(held) if !keep.is_zero() => {
                let hold_for = keep.max(self.config.drain.settle.floor());
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
    pub fn restore_hold(&mut self, saved: &super::super::saved::SavedHold) {
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
}
