//! The state side of a cgroup per generation (see [`crate::cgroup`]):
//! which cgroup each generation has, whether it still has processes, and
//! what follows from that. Membership is the truth: a generation whose
//! leader exited has exited only once its cgroup is empty (its escaped
//! daemons are killed with it); a server that daemonizes (its leader exits
//! with status 0 while starting, leaving its daemon in the cgroup) keeps
//! starting, and is signalled through its cgroup from then on.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{Effect, ExitEffect, InstanceState};
use crate::generation::State;

impl InstanceState {
    /// Generation `number` runs in cgroup `dir`.
    pub fn set_cgroup(&mut self, number: u64, dir: PathBuf) {
        self.cgroups.insert(number, dir);
        self.populated.insert(number, true);
    }

    /// Why generations get no cgroup (said in `status`).
    pub fn set_cgroup_unavailable(&mut self, why: String) {
        self.cgroup_unavailable = Some(why);
    }

    /// Where the steering program migrated connections to, for counting
    /// each generation's connections off the owner's thread.
    pub fn migration_log(&self) -> Option<crate::steering::MigrationLog> {
        self.steering.migration_log()
    }

    /// Generation `number`'s cgroup (for status).
    pub(super) fn cgroup(&self, number: u64) -> Option<&PathBuf> {
        self.cgroups.get(&number)
    }

    /// Why generations get no cgroup.
    pub(super) fn cgroup_unavailable(&self) -> Option<&str> {
        self.cgroup_unavailable.as_deref()
    }

    /// Generations that ended but whose cgroups still have processes.
    pub fn members_left(&self) -> &std::collections::BTreeSet<u64> {
        &self.members_left
    }

    /// Whether generation `number` has exited for good: ended, and its
    /// cgroup (if any) empty.
    pub fn gone(&self, number: u64) -> bool {
        self.generations
            .get(number)
            .is_none_or(|g| !g.state.is_live())
            && !self.members_left.contains(&number)
    }

    /// Whether the generation's leader is gone while it lives on in its
    /// cgroup.
    pub(super) fn is_leaderless(&self, number: u64) -> bool {
        self.leaderless.contains(&number)
    }

    /// The leader of generation `number` exited with status 0 while its
    /// cgroup still has processes: it daemonized. Returns whether that is
    /// so (then it goes on: its readiness and its end follow its cgroup).
    /// A daemonizing server may exit only after its listeners were found
    /// (nginx opens them before it forks its master): the generation may be
    /// ready or active already. (A draining one's leader exit is its
    /// finishing, not this.)
    pub(super) fn daemonized(&mut self, number: u64, how: &str) -> bool {
        let serving = self.generations.get(number).is_some_and(|g| {
            matches!(
                g.state,
                State::Starting | State::Ready | State::Active | State::Canary
            )
        });
        if !serving
            || !how.starts_with("exited with status 0")
            || !self.cgroups.contains_key(&number)
            || !self.populated.get(&number).copied().unwrap_or(false)
        {
            return false;
        }
        info!(
            generation = number,
            "its leader exited with status 0 while its cgroup still has processes: it \
             daemonized; it is followed through its cgroup"
        );
        self.leaderless.insert(number);
        self.processes.remove(&number);
        true
    }

    /// A generation's leader is gone but its processes live on (adopted
    /// through its cgroup).
    pub fn adopted_leaderless(&mut self, number: u64) {
        self.leaderless.insert(number);
    }

    /// The cgroup of generation `number` has processes, or none any more.
    /// An empty cgroup ends a leaderless generation (as its leader's exit
    /// ends any other), and is removed once its generation has ended.
    pub fn cgroup_changed(&mut self, number: u64, populated: bool) -> ExitEffect {
        if !self.cgroups.contains_key(&number) {
            return ExitEffect::None;
        }
        self.populated.insert(number, populated);
        if populated {
            return ExitEffect::None;
        }
        let live = self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live());
        let effect = if live && self.leaderless.contains(&number) {
            self.ended_in_cgroup(number)
        } else {
            ExitEffect::None
        };
        // A live generation with its leader still recorded ends when the
        // leader's exit is seen (it comes: the leader was a member).
        if !self
            .generations
            .get(number)
            .is_some_and(|g| g.state.is_live())
        {
            self.members_left.remove(&number);
            self.remove_cgroup(number);
        }
        effect
    }

    /// A leaderless generation's cgroup emptied: it ended as if its leader
    /// had exited.
    fn ended_in_cgroup(&mut self, number: u64) -> ExitEffect {
        self.leaderless.remove(&number);
        let how = "exited (every process of its cgroup)";
        let Some(pid) = self.generations.get(number).and_then(|g| g.pid) else {
            return ExitEffect::None;
        };
        // The same path as a leader's exit, by the pid recorded for it.
        self.exited_as(number, pid, how)
    }

    /// Called when generation `number` ends: its cgroup goes once empty
    /// (now, if it is; else when it empties, or is killed).
    pub(super) fn cgroup_after_end(&mut self, number: u64) {
        if !self.cgroups.contains_key(&number) {
            return;
        }
        self.leaderless.remove(&number);
        if self.populated.get(&number).copied().unwrap_or(false) {
            self.members_left.insert(number);
        } else {
            self.remove_cgroup(number);
        }
    }

    fn remove_cgroup(&mut self, number: u64) {
        if let Some(dir) = self.cgroups.remove(&number) {
            self.populated.remove(&number);
            self.outbox.push(Effect::RemoveCgroup { number, dir });
        }
    }

    /// Gives up on cgroups that still have processes after SIGKILL (stuck
    /// in the kernel): the stop goes on without them.
    pub fn abandon_members_left(&mut self) {
        for number in std::mem::take(&mut self.members_left) {
            warn!(
                generation = number,
                "its cgroup still has processes after SIGKILL"
            );
        }
    }

    /// Kills what is left in the cgroups of generations that ended with
    /// members left (at the stop's drain timeout).
    pub fn kill_members_left(&mut self) {
        for number in self.members_left.clone() {
            if let Some(dir) = self.cgroups.get(&number) {
                warn!(generation = number, "killing what is left of its cgroup");
                self.outbox.push(Effect::KillCgroup { dir: dir.clone() });
            }
        }
    }
}
