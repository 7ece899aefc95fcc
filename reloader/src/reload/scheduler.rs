//! Which reload runs next. Requests that arrive while a reload runs
//! coalesce into one follow-up reload whose result every requester gets;
//! they are never queued without bound. The follow-up is a canary if any
//! of its requests asked for one (the last plan given wins). Pure: the
//! instance's run loop owns one and asks it what to start.

use tokio::sync::oneshot;

use crate::{
    config::CanaryPlan,
    control::Response,
    status::{ReloadReport, ReloadResult},
};

/// What a requester of `reload --wait` is told.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The reload ran; its report says how it ended (decided by the
    /// state's owner).
    Reported(Box<ReloadReport>),
    /// The reload never ran (the instance stopped first).
    NotRun(String),
}

impl Outcome {
    /// The control protocol's answer.
    pub fn response(&self) -> Response {
        match self {
            Self::Reported(report) => match report.result {
                ReloadResult::Succeeded => Response::ReloadDone {
                    report: (**report).clone(),
                },
                ReloadResult::Failed => Response::ReloadFailed {
                    report: (**report).clone(),
                },
                ReloadResult::RolledBack => Response::ReloadRolledBack {
                    report: (**report).clone(),
                },
            },
            Self::NotRun(message) => Response::Error {
                message: message.clone(),
            },
        }
    }
}

/// Someone waiting for the result of the next reload.
pub type Waiter = oneshot::Sender<Response>;

/// Tells every waiter `outcome`.
pub fn answer(waiters: Vec<Waiter>, outcome: &Outcome) {
    for waiter in waiters {
        let _ = waiter.send(outcome.response());
    }
}

/// Pending reload requests.
#[derive(Debug, Default)]
pub struct Scheduler {
    pending: bool,
    waiters: Vec<Waiter>,
    canary: Option<CanaryPlan>,
}

/// A reload to start now.
#[derive(Debug)]
pub struct Start {
    pub waiters: Vec<Waiter>,
    pub canary: Option<CanaryPlan>,
}

impl Scheduler {
    /// A reload was requested; `waiter` gets the result of the reload that
    /// starts after this call.
    pub fn request(&mut self, waiter: Option<Waiter>, canary: Option<CanaryPlan>) {
        self.pending = true;
        self.waiters.extend(waiter);
        if canary.is_some() {
            self.canary = canary;
        }
    }

    /// Whether a reload is wanted.
    #[cfg(test)]
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// Starts the pending reload, if any: returns who waits for it.
    pub fn start(&mut self) -> Option<Start> {
        if !self.pending {
            return None;
        }
        self.pending = false;
        Some(Start {
            waiters: std::mem::take(&mut self.waiters),
            canary: self.canary.take(),
        })
    }

    /// Answers everyone still waiting with `reason` (at stop).
    pub fn refuse_all(&mut self, reason: &str) {
        self.pending = false;
        self.canary = None;
        answer(
            std::mem::take(&mut self.waiters),
            &Outcome::NotRun(reason.to_owned()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_during_a_reload_coalesce_into_one_follow_up() {
        let mut s = Scheduler::default();
        assert!(s.start().is_none(), "nothing requested");
        let (a, mut ra) = oneshot::channel();
        s.request(Some(a), None);
        let first = s.start().expect("a reload starts");
        assert_eq!(first.waiters.len(), 1);
        assert!(first.canary.is_none());
        // Three requests while it runs: one follow-up, three waiters; one
        // asked for a canary, so the follow-up is one.
        let (b, mut rb) = oneshot::channel();
        let (c, mut rc) = oneshot::channel();
        let plan = CanaryPlan {
            steps: vec![1000],
            dwell_ms: None,
        };
        s.request(Some(b), None);
        s.request(None, Some(plan.clone()));
        s.request(Some(c), None);
        let second = s.start().expect("one follow-up");
        assert_eq!(second.waiters.len(), 2);
        assert_eq!(second.canary, Some(plan));
        let (first, second) = (first.waiters, second.waiters);
        assert!(s.start().is_none(), "only one follow-up");
        answer(first, &Outcome::NotRun("x".into()));
        assert!(matches!(ra.try_recv(), Ok(Response::Error { .. })));
        answer(second, &Outcome::Reported(Box::default()));
        assert!(matches!(rb.try_recv(), Ok(Response::ReloadFailed { .. })));
        assert!(matches!(rc.try_recv(), Ok(Response::ReloadFailed { .. })));
    }

    #[test]
    fn waiters_are_answered_at_stop() {
        let mut s = Scheduler::default();
        let (a, mut ra) = oneshot::channel();
        s.request(Some(a), None);
        s.refuse_all("the instance is stopping");
        assert!(!s.is_pending());
        match ra.try_recv() {
            Ok(Response::Error { message }) => assert_eq!(message, "the instance is stopping"),
            other => panic!("{other:?}"),
        }
    }
}
