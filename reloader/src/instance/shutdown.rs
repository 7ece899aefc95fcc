//! Stopping an instance: every generation that served drains (the drain
//! signal, SIGKILL at the drain timeout), a candidate that was starting is
//! killed at once, reload requests still waiting are answered, and
//! whatever was reparented to us goes too. Every wait is bounded.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::{signal::unix::Signal as SignalStream, sync::mpsc};
use tracing::{info, warn};

use super::{events::Event, reaper};
use crate::{
    generation::State,
    reload::scheduler::{Outcome, answer},
    state::Handle,
    supervisor,
};

/// How long a SIGKILLed generation may take to be seen exiting.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Drains everything; returns whether every generation exited on its own
/// within the drain timeout.
pub async fn stop(
    handle: &Handle,
    sigchld: &mut SignalStream,
    events: &mut mpsc::Receiver<Event>,
    events_tx: &mpsc::Sender<Event>,
) -> bool {
    crate::notify::stopping();
    let live = handle.update(|s| s.begin_stop());
    for (number, state) in live {
        if matches!(state, State::Active | State::Draining) {
            handle.update(|s| s.drain_signal(number));
        }
    }
    let drain_timeout = handle.read(|s| s.config().drain_timeout);
    let mut deadline = Instant::now() + drain_timeout;
    let mut killed = false;
    let mut changed = handle.subscribe();
    loop {
        reaper::reap_children(handle, events_tx);
        let remaining: Vec<u64> = handle.read(|s| s.live().into_iter().map(|(n, _)| n).collect());
        if remaining.is_empty() {
            break;
        }
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = changed.changed() => {}
            Some(event) = events.recv() => match event {
                Event::AdoptedExited { pid } => reaper::adopted_exited(handle, events_tx, pid),
                Event::Reload { waiter, .. } => answer(
                    waiter.into_iter().collect(),
                    &Outcome::NotRun("the instance is stopping".into()),
                ),
                Event::Rollback { answer: Some(answer), .. } => {
                    let _ = answer.send(crate::control::Response::Error {
                        message: "the instance is stopping".into(),
                    });
                }
                Event::Rollback { answer: None, .. } => {}
                Event::Stop | Event::Restart => {}
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                if killed {
                    for number in remaining {
                        handle.update(|s| s.abandon(number, KILL_GRACE));
                    }
                    break;
                }
                warn!(generations = ?remaining, "drain timeout: killing");
                for number in &remaining {
                    handle.update(|s| s.kill(*number));
                }
                killed = true;
                deadline = Instant::now() + KILL_GRACE;
            }
        }
    }
    kill_reparented().await;
    !killed
}

/// Anything reparented to us (daemonized helpers) is killed and reaped.
async fn kill_reparented() {
    for pid in supervisor::children() {
        // Our unreaped child: its pid cannot have been reused.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let give_up = Instant::now() + Duration::from_secs(2);
    loop {
        while let Some(exit) = supervisor::peek_exited() {
            supervisor::reap(exit.pid);
        }
        if supervisor::children().is_empty() || Instant::now() >= give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!("every process of the instance has exited");
}
