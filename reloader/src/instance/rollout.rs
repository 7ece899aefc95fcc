//! Ending a rollout one way or the other, each decided by the owner in
//! one step: a rollback (asked for, or a health verdict) makes the
//! previous generation or the one beside the canary serve again and drains
//! the one rolled back from; a promotion sends every new connection to the
//! canary.

use std::time::Instant;

use tokio::sync::oneshot;
use tracing::warn;

use super::owner::{Done, Owner};
use crate::{
    control::Response,
    reload::{self, Host},
    status::{RollbackReason, RollbackReport},
};

impl<H: Host> Owner<H> {
    /// Rolls back (see
    /// [`InstanceState::rollback`](crate::state::InstanceState::rollback))
    /// and drains the generation rolled back from. `only_from`: only if
    /// that generation is still the new one (a health verdict about a
    /// generation that was meanwhile replaced is stale).
    pub(super) fn roll_back(
        &mut self,
        reason: RollbackReason,
        wait: bool,
        reply: Option<oneshot::Sender<Response>>,
        only_from: Option<u64>,
    ) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Response::Error {
                    message: "the instance is stopping".into(),
                });
            }
            return;
        }
        if let Some(number) = only_from
            && self.state.health_targets().first().copied() != Some(number)
        {
            return;
        }
        let done = match self.state.rollback(reason) {
            Ok(done) => done,
            Err(error) => {
                let starting = self.state.live().into_iter().find(|(_, state)| {
                    matches!(
                        state,
                        crate::generation::State::Starting | crate::generation::State::Ready
                    )
                });
                let message = match (&error, starting) {
                    // What `--keep-previous` would hold is not held yet:
                    // the reload that replaces it has not cut over.
                    (crate::error::RolloutError::NothingToRollBack { .. }, Some((n, _)))
                        if self.running.is_some() =>
                    {
                        format!(
                            "a reload is in progress (generation {n} is starting): nothing is \
                             held to roll back to until it has cut over; `reloader reload \
                             --wait` returns then"
                        )
                    }
                    _ => crate::error_chain(&error),
                };
                if reason != RollbackReason::Manual {
                    warn!(%reason, "no rollback: {message}");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Response::Error { message });
                }
                return;
            }
        };
        crate::notify::ready(&format!(
            "rolled back: generation {} active, generation {} drains",
            done.to, done.from
        ));
        let report = RollbackReport {
            from: done.from,
            to: done.to,
            map_update_us: done.map_update.as_secs_f64() * 1e6,
            from_exited_ms: None,
        };
        let reply = match reply {
            Some(reply) if !wait => {
                let _ = reply.send(Response::RolledBack {
                    report: report.clone(),
                });
                None
            }
            reply => reply,
        };
        let client = self.client.clone();
        self.tasks.spawn(async move {
            let t0 = Instant::now();
            reload::drain(&client, done.from).await;
            match reply {
                Some(reply) => Done::RolledBack {
                    reply,
                    report: RollbackReport {
                        from_exited_ms: Some(t0.elapsed().as_secs_f64() * 1000.0),
                        ..report
                    },
                },
                None => Done::Drained,
            }
        });
    }

    /// Promotes the canary (see
    /// [`InstanceState::promote`](crate::state::InstanceState::promote)).
    /// With `wait`, answers once the generation beside it has exited (the
    /// reload's own task drains it); at once when that one is held
    /// (`--keep-previous`: `reload --wait` returns at the cutover then
    /// too), saying for how long.
    pub(super) fn promote(&mut self, wait: bool, reply: oneshot::Sender<Response>) {
        let (generation, previous) = match self.state.promote() {
            Ok(promoted) => promoted,
            Err(error) => {
                let _ = reply.send(Response::Error {
                    message: crate::error_chain(&error),
                });
                return;
            }
        };
        let promoted = |previous_exited_ms, held_ms| Response::Promoted {
            generation,
            previous,
            previous_exited_ms,
            held_ms,
        };
        if !wait {
            let _ = reply.send(promoted(None, None));
            return;
        }
        if let Some(until) = self.state.hold_until(previous) {
            let held = until.saturating_duration_since(Instant::now());
            let _ = reply.send(promoted(None, Some(held.as_secs_f64() * 1000.0)));
            return;
        }
        let mut snapshots = self.client.subscribe();
        self.tasks.spawn(async move {
            let t0 = Instant::now();
            // Bounded by the drain: its timeout, then SIGKILL, then the
            // slot is given up; a stop aborts this task (the client is
            // told the instance stopped).
            let _ = snapshots.wait_for(|s| s.ended(previous)).await;
            Done::Promoted {
                reply,
                generation,
                previous,
                exited_ms: t0.elapsed().as_secs_f64() * 1000.0,
            }
        });
    }
}
