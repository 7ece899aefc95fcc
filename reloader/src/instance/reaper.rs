//! Exits of generations. Children are reaped on `SIGCHLD` in two phases
//! (see [`crate::supervisor`]): the exit is recorded — and what is left of
//! the generation's process group killed — while the zombie still holds
//! its pid, then it is reaped. Both are single non-sleeping syscalls, made
//! by the owner itself so nothing can come between them. Adopted
//! generations (a previous controller's children, not ours) are watched by
//! pidfd. A crash of the active generation schedules a restart after the
//! backoff, unless another generation was made active in its place.

use tokio::sync::mpsc;

use super::{events::Event, owner::Owner};
use crate::{reload::Host, state::ExitEffect, supervisor};

/// How an adopted process's exit is described (no status reaches us).
const ADOPTED_EXIT: &str = "exited (status unknown: adopted from a previous controller)";

impl<H: Host> Owner<H> {
    /// Reaps every child that has exited.
    pub(super) fn reap_children(&mut self) {
        // Bounded: each round reaps the child it found.
        for _ in 0..4096 {
            let Some(exit) = self.host().peek_exited() else {
                return;
            };
            // A `--check` run: its exit goes to the reload that runs it.
            if supervisor::deliver_claimed(&exit) {
                self.host().reap(exit.pid);
                continue;
            }
            let effect = self.state.exited(exit.pid, &exit.how);
            self.host().reap(exit.pid);
            self.after_exit(effect);
        }
    }

    /// A generation's cgroup gained processes or lost its last one: a
    /// leaderless generation whose cgroup emptied has ended.
    pub(super) fn cgroup_changed(&mut self, generation: u64, populated: bool) {
        let effect = self.state.cgroup_changed(generation, populated);
        self.after_exit(effect);
    }

    /// Records the exit of an adopted generation's leader.
    pub(super) fn adopted_exited(&mut self, pid: u32) {
        let effect = self.state.exited(pid, ADOPTED_EXIT);
        self.after_exit(effect);
    }

    /// A crashed active generation is replaced after the backoff — unless
    /// the previous generation (or the canary) was made active in its
    /// place: that one serves, and starting the crashed configuration
    /// again could only replace a working generation with a failing one.
    fn after_exit(&mut self, effect: ExitEffect) {
        if let ExitEffect::Crashed {
            reinstated: None, ..
        } = effect
            && !self.state.is_stopping()
        {
            self.schedule_restart();
        }
    }
}

/// Watches the leaders of adopted generations: their exits become events.
pub fn watch_adopted(state: &crate::state::InstanceState, events: &mpsc::Sender<Event>) {
    for (_, process) in state.adopted() {
        let (pid, exited) = (process.pid(), process.exit_watcher());
        let events = events.clone();
        tokio::spawn(async move {
            exited.await;
            let _ = events.send(Event::AdoptedExited { pid }).await;
        });
    }
}
