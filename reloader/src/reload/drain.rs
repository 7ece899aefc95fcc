//! Steps 7–8: let the old generation settle (it receives nothing new and
//! reads what it already accepted), signal it to drain, and wait for its
//! exit, killing its process group at the drain timeout. Every wait is
//! bounded: a generation that does not exit even after SIGKILL is given up
//! after [`KILL_GRACE`] and its slot freed.

use std::time::Duration;

use tracing::warn;

use crate::{generation::human_duration, state::Handle};

/// How long a SIGKILLed generation may take to be seen exiting.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Drains generation `old`; returns when it has exited (or was given up).
pub async fn drain(handle: &Handle, old: u64) {
    let config = handle.read(|s| s.config().clone());
    settle(handle, old, config.settle).await;
    if !handle.update(|s| s.drain_signal(old)) {
        return;
    }
    if wait_exit(handle, old, config.drain_timeout).await {
        return;
    }
    warn!(
        generation = old,
        timeout = %human_duration(config.drain_timeout),
        "still running at the drain timeout: killing its process group"
    );
    handle.update(|s| s.kill(old));
    if !wait_exit(handle, old, KILL_GRACE).await {
        handle.update(|s| s.abandon(old, KILL_GRACE));
    }
}

/// Lets `old` run for `settle` while it drains (it receives nothing new),
/// or for as long as it is held (`--keep-previous`: the hold ends at its
/// deadline, or early when a later cutover holds another generation);
/// returns early if it no longer drains (it ended, or was made active
/// again because its successor failed or was rolled back).
async fn settle(handle: &Handle, old: u64, settle: Duration) {
    let mut changed = handle.subscribe();
    let settled = tokio::time::Instant::now() + settle;
    loop {
        let (draining, held) = handle.read(|s| {
            let draining = s
                .generation(old)
                .is_some_and(|g| g.state == crate::generation::State::Draining);
            (draining, s.hold_until(old))
        });
        if !draining {
            return;
        }
        let deadline = held.map_or(settled, |until| settled.max(until.into()));
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                if handle.read(|s| s.hold_until(old)) == held {
                    return;
                }
            }
        }
    }
}

/// Waits up to `timeout` for generation `number` to end; true if it did.
pub async fn wait_exit(handle: &Handle, number: u64, timeout: Duration) -> bool {
    let mut changed = handle.subscribe();
    let ended =
        |handle: &Handle| handle.read(|s| s.generation(number).is_none_or(|g| !g.state.is_live()));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if ended(handle) {
            return true;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return ended(handle),
        }
    }
}
