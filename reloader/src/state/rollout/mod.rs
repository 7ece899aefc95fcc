//! Rollback and canary, the state side: `--keep-previous` holds the
//! previous generation after a cutover ([`hold`]), `reload --canary` splits
//! new connections between the active generation and a canary
//! ([`canary`]), `reloader promote` and `reloader rollback` end either
//! ([`rollback`]); health checks decide automatic rollbacks ([`health`]).
//!
//! Both rest on one fact: a generation that still holds its listeners and
//! was not told to drain can serve again, and where new connections go is
//! one map value per listener ([`crate::steering::Split`]). So a rollback
//! is one map update per listener, made by the state's owner in one step:
//! the program sees the new split at the next SYN (or new UDP flow),
//! without a process start. What was rolled back from drains like any old
//! generation; it is never made active again (see
//! [`crate::generation::Generation::rolled_back`]).

mod canary;
mod health;
mod hold;
mod rollback;

pub use canary::{Advanced, CanaryPhase, CanaryRun, CanaryVerdict, Rate};
pub use health::HealthRecord;
pub use hold::Hold;
pub use rollback::RolledBack;

use crate::status::RollbackReason;

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rollback_why(reason: RollbackReason) -> String {
    match reason {
        RollbackReason::Manual => "`reloader rollback`".into(),
        RollbackReason::Crash => "the new generation exited".into(),
        RollbackReason::Health => "the new generation failed its health checks".into(),
    }
}
