//! Exits of generations. Children are reaped on `SIGCHLD` in two phases
//! (see [`crate::supervisor`]): the exit is recorded — and what is left of
//! the generation's process group killed — while the zombie still holds
//! its pid, then it is reaped. Adopted generations (a previous
//! controller's children, not ours) are watched by pidfd. A crash of the
//! active generation schedules a restart after the backoff, unless
//! another generation was made active in its place.

use tokio::sync::mpsc;

use super::events::Event;
use crate::{
    state::{ExitEffect, Handle},
    supervisor,
};

/// How an adopted process's exit is described (no status reaches us).
const ADOPTED_EXIT: &str = "exited (status unknown: adopted from a previous controller)";

/// Reaps every child that has exited.
pub fn reap_children(handle: &Handle, events: &mpsc::Sender<Event>) {
    // Bounded: each round reaps the child it found.
    for _ in 0..4096 {
        let Some(exit) = supervisor::peek_exited() else {
            return;
        };
        // A `--check` run: its exit goes to the reload that runs it.
        if supervisor::deliver_claimed(&exit) {
            supervisor::reap(exit.pid);
            continue;
        }
        let effect = handle.update(|s| s.exited(exit.pid, &exit.how));
        supervisor::reap(exit.pid);
        after_exit(handle, events, effect);
    }
}

/// Records the exit of an adopted generation's leader.
pub fn adopted_exited(handle: &Handle, events: &mpsc::Sender<Event>, pid: u32) {
    let effect = handle.update(|s| s.exited(pid, ADOPTED_EXIT));
    after_exit(handle, events, effect);
}

/// A crashed active generation is replaced after the backoff — unless the
/// previous generation (or the canary) was made active in its place: that
/// one serves, and starting the crashed configuration again could only
/// replace a working generation with a failing one.
fn after_exit(handle: &Handle, events: &mpsc::Sender<Event>, effect: ExitEffect) {
    if let ExitEffect::Crashed {
        reinstated: None, ..
    } = effect
        && !handle.read(|s| s.is_stopping())
    {
        schedule_restart(handle, events);
    }
}

/// Asks for a reload after the restart backoff.
pub fn schedule_restart(handle: &Handle, events: &mpsc::Sender<Event>) {
    let delay = handle.update(|s| s.next_restart_delay());
    tracing::info!(delay = %crate::generation::human_duration(delay), "restarting after the backoff");
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(Event::Restart).await;
    });
}

/// Watches the leaders of adopted generations: their exits become events.
pub fn watch_adopted(handle: &Handle, events: &mpsc::Sender<Event>) {
    let watchers: Vec<_> = handle.read(|s| {
        s.adopted()
            .into_iter()
            .map(|(_, p)| (p.pid(), p.exit_watcher()))
            .collect()
    });
    for (pid, exited) in watchers {
        let events = events.clone();
        tokio::spawn(async move {
            exited.await;
            let _ = events.send(Event::AdoptedExited { pid }).await;
        });
    }
}
