//! What reaches the instance's run loop from its other tasks, and the
//! [`Control`] the control server talks through.

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::CanaryPlan,
    control::{Controller, Response},
    reload::scheduler::{Outcome, Waiter},
    state::Handle,
    status::{RollbackReason, StatusReport},
};

/// An input of the run loop.
#[derive(Debug)]
pub enum Event {
    /// `reloader reload` (with a waiter for `--wait`).
    Reload {
        waiter: Option<Waiter>,
        canary: Option<CanaryPlan>,
    },
    /// `reloader rollback`, or a failed health check of a new generation:
    /// the answer goes to `answer` (after the rolled-back generation
    /// exited, with `wait`).
    Rollback {
        reason: RollbackReason,
        wait: bool,
        answer: Option<oneshot::Sender<Response>>,
        /// Only if this generation is still the new one.
        only_from: Option<u64>,
    },
    /// `reloader stop`.
    Stop,
    /// An adopted generation's leader exited (its pidfd said so).
    AdoptedExited { pid: u32 },
    /// The crash-restart backoff has passed.
    Restart,
}

/// The control server's view of the instance: requests go to the run loop
/// as [`Event`]s, status is read through the state's handle.
#[derive(Clone)]
pub struct Control {
    pub events: mpsc::Sender<Event>,
    pub handle: Handle,
}

impl Controller for Control {
    async fn reload(&self, wait: bool, canary: Option<CanaryPlan>) -> Response {
        if self.handle.read(|s| s.is_stopping()) {
            return Response::Error {
                message: "the instance is stopping".into(),
            };
        }
        if let Some(generation) = self.handle.read(|s| s.canary()) {
            return Response::Error {
                message: crate::error::ReloadError::CanaryRunning { generation }.to_string(),
            };
        }
        if canary.is_some() && self.handle.read(|s| s.active()).is_none() {
            return Response::Error {
                message: "no generation is active to run a canary beside: reload without \
                          --canary"
                    .into(),
            };
        }
        let (waiter, answer) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if self
            .events
            .send(Event::Reload { waiter, canary })
            .await
            .is_err()
        {
            return Response::Error {
                message: "the instance is stopping".into(),
            };
        }
        let Some(answer) = answer else {
            return Response::ReloadAccepted;
        };
        match answer.await {
            Ok(Outcome::Done(report)) => Response::ReloadDone { report },
            Ok(Outcome::Failed(report)) => Response::ReloadFailed { report },
            Ok(Outcome::RolledBack(report)) => Response::ReloadRolledBack { report },
            Ok(Outcome::NotRun(message)) => Response::Error { message },
            Err(_) => Response::Error {
                message: "the instance stopped before the reload completed".into(),
            },
        }
    }

    async fn rollback(&self, wait: bool) -> Response {
        let (tx, rx) = oneshot::channel();
        let event = Event::Rollback {
            reason: RollbackReason::Manual,
            wait,
            answer: Some(tx),
            only_from: None,
        };
        if self.events.send(event).await.is_err() {
            return Response::Error {
                message: "the instance is stopping".into(),
            };
        }
        rx.await.unwrap_or_else(|_| Response::Error {
            message: "the instance stopped before the rollback completed".into(),
        })
    }

    async fn promote(&self) -> Response {
        match self.handle.update(|s| s.promote()) {
            Ok((generation, previous)) => Response::Promoted {
                generation,
                previous,
            },
            Err(error) => Response::Error {
                message: crate::error_chain(&error),
            },
        }
    }

    fn stop(&self) -> Response {
        // A full queue means the loop is busy with earlier events; a stop
        // must not be lost, so it waits for a place in a task of its own.
        let events = self.events.clone();
        tokio::spawn(async move {
            let _ = events.send(Event::Stop).await;
        });
        Response::Stopping
    }

    async fn status(&self) -> StatusReport {
        self.handle.status().await
    }
}
