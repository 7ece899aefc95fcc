//! What reaches the instance's run loop from outside the state: control
//! requests, signals, `--watch` bursts, exits of adopted processes; and
//! [`Control`], through which the control server asks.
//!
//! Every control request is one [`Event`] with a reply channel: the run
//! loop, which owns the state, decides it in one step (a reload refused
//! because a canary runs, a rollback, a promotion) and answers.

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::CanaryPlan,
    control::{Controller, Response},
    state::Client,
    status::StatusReport,
};

/// An input of the run loop.
#[derive(Debug)]
pub enum Event {
    /// `reloader reload`, `SIGHUP`, `--watch`: with a reply, it is told
    /// when the request was taken (or, with `wait`, the reload's result).
    Reload {
        wait: bool,
        canary: Option<CanaryPlan>,
        reply: Option<oneshot::Sender<Response>>,
    },
    /// `reloader rollback`: answered (after the rolled-back generation
    /// exited, with `wait`).
    Rollback {
        wait: bool,
        reply: oneshot::Sender<Response>,
    },
    /// `reloader promote`: answered (after the generation beside the
    /// canary exited, with `wait`).
    Promote {
        wait: bool,
        reply: oneshot::Sender<Response>,
    },
    /// `reloader stop`, `SIGTERM`, `SIGINT`.
    Stop,
    /// `reloader handover`: once no reload runs, end without signalling any
    /// generation, leaving them to the next controller (answered at once).
    Handover { reply: oneshot::Sender<Response> },
    /// `SIGCHLD`: children to reap.
    ChildExited,
    /// An adopted generation's leader exited (its pidfd said so).
    AdoptedExited { pid: u32 },
    /// A generation's cgroup gained processes, or lost its last one.
    CgroupChanged { generation: u64, populated: bool },
}

/// The control server's view of the instance: requests go to the run loop
/// as [`Event`]s, status is asked of the state's owner.
#[derive(Clone)]
pub struct Control {
    pub events: mpsc::Sender<Event>,
    pub client: Client,
    /// Why a successor could not adopt this instance's generations (it
    /// runs without pinned maps): a hand-over is refused with it.
    pub no_handover: Option<String>,
}

impl Control {
    /// Sends the event `make` builds around a reply channel and waits for
    /// the answer; `gone` if the run loop has ended meanwhile.
    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Response>) -> Event,
        gone: &str,
    ) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.events.send(make(reply)).await.is_err() {
            return Response::Error {
                message: "the instance is stopping".into(),
            };
        }
        answer.await.unwrap_or_else(|_| Response::Error {
            message: gone.into(),
        })
    }
}

impl Controller for Control {
    async fn reload(&self, wait: bool, canary: Option<CanaryPlan>) -> Response {
        self.ask(
            |reply| Event::Reload {
                wait,
                canary,
                reply: Some(reply),
            },
            "the instance stopped before the reload completed",
        )
        .await
    }

    async fn rollback(&self, wait: bool) -> Response {
        self.ask(
            |reply| Event::Rollback { wait, reply },
            "the instance stopped before the rollback completed",
        )
        .await
    }

    async fn promote(&self, wait: bool) -> Response {
        self.ask(
            |reply| Event::Promote { wait, reply },
            "the instance stopped before the promotion",
        )
        .await
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

    async fn handover(&self) -> Response {
        if let Some(message) = &self.no_handover {
            return Response::Error {
                message: message.clone(),
            };
        }
        self.ask(
            |reply| Event::Handover { reply },
            "the instance stopped before it could hand over",
        )
        .await
    }

    async fn status(&self) -> Option<StatusReport> {
        self.client.status().await
    }
}
