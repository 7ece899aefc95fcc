//! What `reloader status`, `reloader reload --wait` and `reloader rollback`
//! report, and how it is shown to people. `wire` holds the reports as
//! the controller answers them and `--json` prints them (for scripts:
//! fields are only ever added); `human` renders them as tables and lines
//! for people; `readiness` is what `/readyz` answers.

mod human;
mod readiness;
#[cfg(test)]
mod tests;
mod wire;

pub use human::human_bytes;
pub(crate) use human::{Column, render};
pub use readiness::Readiness;
pub use wire::{
    CounterStatus, DrainCommandReport, FailureKind, FlowTableStatus, GenerationStatus,
    HealthStatus, ListenerStatus, ReloadFailure, ReloadReport, ReloadResult, RollbackCounts,
    RollbackReason, RollbackReport, RolloutKind, RolloutStatus, SocketStatus, StatusReport,
};
