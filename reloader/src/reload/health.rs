//! Health checks while a rollback is possible (`--health-probe`): a held
//! previous generation and its successor, or a canary and the active
//! generation beside it, each checked through its own listener (the probe
//! is routed by its source port, like the readiness probe) every
//! `--health-interval`. When the new generation fails `--health-failures`
//! checks in a row, the instance rolls it back. Nothing is checked, and
//! nothing wakes up, while no rollback is possible.

use super::probe;
use crate::state::Client;

/// Checks the generations the snapshot's `health_targets` names, telling
/// the owner each result (it rolls back a new generation that became
/// unhealthy, in the same step). Runs until aborted.
pub async fn watch(client: Client) {
    let Some(health) = client.config().rollout.health.clone() else {
        return;
    };
    let mut snapshots = client.subscribe();
    loop {
        let targets = snapshots.borrow_and_update().health_targets.clone();
        if targets.is_empty() {
            if snapshots.changed().await.is_err() {
                return;
            }
            continue;
        }
        for number in targets {
            let result = probe::check(&client, number, &health.probe).await;
            client.health_checked(number, result).await;
        }
        tokio::time::sleep(health.interval).await;
    }
}
