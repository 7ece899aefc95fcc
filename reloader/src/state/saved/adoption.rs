//! What a starting controller does with a previous controller's state
//! file: each recorded generation's [`Verdict`] (is its process still that
//! generation?) and, from them, one [`Recovery`]: start fresh, adopt, or
//! clean up what no longer serves.

use super::{Saved, SavedGeneration};
use crate::generation::State;

/// Whether a recorded generation's process is still that generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It runs, and is proven ours: same pid and start time, and it holds a
    /// socket recorded for it (or, before it had any, its environment names
    /// this instance and generation).
    Ours,
    /// Its leader is gone, but process `holder` (started at `start_time`)
    /// still holds a socket recorded for it: its workers serve. Adopted by
    /// that holder (the generation is never destroyed while it serves).
    Orphaned { holder: u32, start_time: u64 },
    /// Its leader is gone, but its cgroup still has processes: adopted
    /// through its cgroup (membership is proof).
    InCgroup,
    /// Its process is gone (or the pid was reused: another start time), and
    /// no process holds a socket recorded for it.
    Gone,
    /// A process runs with that pid and start time, but nothing proves it
    /// is ours: never adopted, never signalled. Says what it is.
    Unproven(String),
}

/// What to do with a previous controller's state.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was left behind.
    Fresh,
    /// Generations still run: adopt `live` (the others are gone, or not
    /// proven to be ours).
    Adopt {
        live: Vec<SavedGeneration>,
        gone: Vec<SavedGeneration>,
        unproven: Vec<(SavedGeneration, String)>,
    },
    /// Something was left, but no proven generation serves any more: the
    /// proven ones in `ours` are stopped, the unproven ones left alone.
    Stale {
        ours: Vec<SavedGeneration>,
        gone: Vec<SavedGeneration>,
        unproven: Vec<(SavedGeneration, String)>,
    },
}

/// Decides what to do with `saved`, given each recorded generation's
/// [`Verdict`]. Adoption needs a proven active generation: without one
/// there is nothing to keep serving.
pub fn recovery(saved: Option<&Saved>, verdict: impl Fn(&SavedGeneration) -> Verdict) -> Recovery {
    let Some(saved) = saved else {
        return Recovery::Fresh;
    };
    let (mut ours, mut gone, mut unproven) = (Vec::new(), Vec::new(), Vec::new());
    for g in saved.generations.iter().filter(|g| g.state.is_live()) {
        match verdict(g) {
            Verdict::Ours | Verdict::InCgroup => ours.push(g.clone()),
            Verdict::Orphaned { holder, start_time } => ours.push(SavedGeneration {
                pid: holder,
                start_time,
                ..g.clone()
            }),
            Verdict::Gone => gone.push(g.clone()),
            Verdict::Unproven(what) => unproven.push((g.clone(), what)),
        }
    }
    if ours.iter().any(|g| g.state == State::Active) {
        Recovery::Adopt {
            live: ours,
            gone,
            unproven,
        }
    } else {
        Recovery::Stale {
            ours,
            gone,
            unproven,
        }
    }
}
