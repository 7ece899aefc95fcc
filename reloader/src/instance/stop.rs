//! Stopping an instance: the reload under way is cancelled, requests still
//! waiting are answered, every generation that served drains (the drain
//! signal, SIGKILL at the drain timeout), a candidate is killed at once.
//! Every wait is bounded; the owner keeps answering status meanwhile.

use tracing::{info, warn};

use super::owner::{Owner, Stopping};
use crate::reload::{
    self, Host,
    scheduler::{Outcome, answer},
};

impl<H: Host> Owner<H> {
    /// Begins the stop: the reload under way is cancelled (its candidate
    /// killed), requests still waiting are answered, every generation that
    /// served is told to drain, the others are killed.
    pub(super) fn begin_stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        info!("stopping: draining every generation");
        crate::notify::stopping();
        if let Some(running) = self.running.take() {
            running.task.abort();
            answer(
                running.waiters,
                &Outcome::NotRun("the instance stopped before the reload completed".into()),
            );
        }
        self.scheduler.refuse_all("the instance is stopping");
        self.tasks.abort_all();
        self.restart_at = None;
        for (number, state) in self.state.begin_stop() {
            if matches!(
                state,
                crate::generation::State::Active | crate::generation::State::Draining
            ) {
                self.state.drain_signal(number);
            }
        }
        self.stopping = Some(Stopping {
            deadline: tokio::time::Instant::now() + self.client.config().drain.timeout,
            killed: false,
        });
    }

    /// The stop's deadline passed: kill what still runs, and at the second
    /// deadline give it up.
    pub(super) fn stop_deadline(&mut self) {
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        let remaining: Vec<u64> = self.state.live().into_iter().map(|(n, _)| n).collect();
        if stopping.killed {
            for number in remaining {
                self.state.abandon(number, reload::KILL_GRACE);
            }
            self.state.abandon_members_left();
            return;
        }
        warn!(generations = ?remaining, "drain timeout: killing");
        for number in &remaining {
            self.state.kill(*number);
        }
        self.state.kill_members_left();
        stopping.killed = true;
        stopping.deadline = tokio::time::Instant::now() + reload::KILL_GRACE;
        self.clean = false;
    }
}
