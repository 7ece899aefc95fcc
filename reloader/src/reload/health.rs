//! Health checks while a rollback is possible (`--health-probe`): a held
//! previous generation and its successor, or a canary and the active
//! generation beside it, each checked through its own listener (the probe
//! is routed by its source port, like the readiness probe) every
//! `--health-interval`. When the new generation fails `--health-failures`
//! checks in a row, the instance rolls it back. Nothing is checked, and
//! nothing wakes up, while no rollback is possible.

use super::probe;
use crate::state::Handle;

/// Checks the generations [`crate::state::InstanceState::health_targets`]
/// names; calls `unhealthy` with the new generation when it becomes
/// unhealthy. Runs until aborted.
pub async fn watch(handle: Handle, unhealthy: impl Fn(u64) + Send + 'static) {
    let Some(health) = handle.read(|s| s.config().health.clone()) else {
        return;
    };
    let mut changed = handle.subscribe();
    loop {
        let targets = handle.read(|s| s.health_targets());
        if targets.is_empty() {
            if changed.changed().await.is_err() {
                return;
            }
            continue;
        }
        for number in targets {
            let result = probe::check(&handle, number, &health.probe).await;
            if handle.update(|s| s.health_checked(number, result)) {
                unhealthy(number);
            }
        }
        tokio::time::sleep(health.interval).await;
    }
}
