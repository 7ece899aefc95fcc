//! Stopping an instance: the reload under way is cancelled, requests still
//! waiting are answered, every generation that served drains (the drain
//! signal, SIGKILL at the drain timeout), a candidate is killed at once.
//! Every wait is bounded; the owner keeps answering status meanwhile.
//! After the owner's loop has ended, [`super::run`] kills what was
//! reparented to the controller and removes the instance's files.

use tracing::{info, warn};

use super::{
    owner::{Owner, Stopping},
    recovery,
};
use crate::{
    reload::{
        self, Host,
        scheduler::{Outcome, answer},
    },
    steering::Steering,
    supervisor,
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

/// Removes the state file, the pins and the control socket.
#[allow(clippy::disallowed_methods)] // on a blocking thread (see `run`)
pub(super) fn remove_files(paths: &recovery::Paths) {
    let _ = std::fs::remove_file(&paths.state);
    Steering::unpin(&paths.pins);
    let _ = std::fs::remove_file(&paths.control);
    // Gone already unless the keeper was killed before it could say so.
    let _ = std::fs::remove_file(&paths.keeper);
}

/// Anything reparented to us (daemonized helpers) is killed and reaped, on
/// a blocking thread (it walks `/proc` until they are gone, at most 2 s).
pub(super) async fn kill_reparented() {
    let done = tokio::task::spawn_blocking(|| {
        use std::time::{Duration, Instant};
        for pid in supervisor::children() {
            // Our unreaped child: its pid cannot have been reused.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let give_up = Instant::now() + Duration::from_secs(2);
        loop {
            while let Some(exit) = supervisor::peek_exited() {
                supervisor::reap(exit.pid);
            }
            if supervisor::children().is_empty() || Instant::now() >= give_up {
                break;
            }
            #[allow(clippy::disallowed_methods)] // a blocking thread
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let _ = done.await;
    info!("every process of the instance has exited");
}
