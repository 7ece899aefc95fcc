//! `--health-probe` results, the state side: which generations to check,
//! and when a new one has failed enough checks to be rolled back.

use tracing::warn;

use super::super::InstanceState;
use crate::status::HealthStatus;

/// Health checks of one generation.
#[derive(Clone, Debug, Default)]
pub struct HealthRecord {
    pub(in crate::state) checks: u64,
    pub(in crate::state) failures: u32,
    pub(in crate::state) last_error: Option<String>,
}

impl InstanceState {
    /// Generations to health-check now: the new one first (a canary, or
    /// the successor of a held generation), then the one a rollback would
    /// bring back. Empty when no rollback is possible.
    pub fn health_targets(&self) -> Vec<u64> {
        if let Some(c) = &self.canary {
            return vec![c.generation, c.previous];
        }
        if let Some(h) = &self.hold {
            return vec![h.successor, h.held];
        }
        Vec::new()
    }

    /// Records a health check of `number`; true when it makes the new
    /// generation unhealthy (its `--health-failures`th failure in a row):
    /// time to roll back.
    pub fn health_checked(&mut self, number: u64, result: Result<(), String>) -> bool {
        let threshold = self
            .config
            .rollout
            .health
            .as_ref()
            .map_or(u32::MAX, |h| h.failures);
        let record = self.health.entry(number).or_default();
        record.checks += 1;
        match result {
            Ok(()) => record.failures = 0,
            Err(error) => {
                warn!(
                    generation = number,
                    failures = record.failures + 1,
                    "health check failed: {error}"
                );
                record.failures += 1;
                record.last_error = Some(error);
            }
        }
        let failures = record.failures;
        let is_new = self.canary.as_ref().is_some_and(|c| c.generation == number)
            || self.hold.is_some_and(|h| h.successor == number);
        is_new && failures == threshold
    }

    pub(in crate::state) fn health_status(&self, number: u64) -> Option<HealthStatus> {
        self.health.get(&number).map(|h| HealthStatus {
            checks: h.checks,
            consecutive_failures: h.failures,
            last_error: h.last_error.clone(),
        })
    }
}
