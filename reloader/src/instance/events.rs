//! What reaches the instance's run loop from its other tasks, and the
//! [`Control`] the control server talks through.

use tokio::sync::{mpsc, oneshot};

use crate::{
    control::{Controller, Response},
    reload::scheduler::{Outcome, Waiter},
    state::Handle,
    status::StatusReport,
};

/// An input of the run loop.
#[derive(Debug)]
pub enum Event {
    /// `reloader reload` (with a waiter for `--wait`).
    Reload { waiter: Option<Waiter> },
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
    async fn reload(&self, wait: bool) -> Response {
        if self.handle.read(|s| s.is_stopping()) {
            return Response::Error {
                message: "the instance is stopping".into(),
            };
        }
        let (waiter, answer) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if self.events.send(Event::Reload { waiter }).await.is_err() {
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
            Ok(Outcome::NotRun(message)) => Response::Error { message },
            Err(_) => Response::Error {
                message: "the instance stopped before the reload completed".into(),
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
