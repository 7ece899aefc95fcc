//! [`Owner`]: the one task that owns an instance's state, by value. It
//! takes [`Event`]s (control requests, signals, exits) and state
//! [`Command`]s (from the reload task, drains, the tracker, the health
//! checker, status readers) from channels, decides each in one step, and
//! publishes a [`crate::state::Snapshot`] after each. It never blocks: what
//! must sleep (a `/proc` walk for an adopted process group, fork and exec,
//! netlink dumps, fsync) runs on blocking threads through the [`Host`] or
//! in the tasks it starts, and comes back as a command or an event.
//!
//! The shape is tokio-console's aggregator and linkerd2-proxy's pool
//! worker: state owned by a loop, inputs as message enums, a snapshot out.
//!
//! This file holds the loop, the event dispatch and the reload's course;
//! the owner's other steps are beside it: state commands (`commands`),
//! rollback and promotion (`rollout`), stopping (`stop`), handing over
//! (`handover`), exits (`reaper`).

use std::sync::Arc;

use tokio::{
    sync::{mpsc, oneshot},
    task::{JoinHandle, JoinSet},
};
use tracing::{error, info, warn};

use super::events::Event;
use crate::{
    config::CanaryPlan,
    control::Response,
    reload::{
        self, CutOver, Finished, Host,
        scheduler::{Outcome, Scheduler, Start, Waiter, answer},
    },
    state::{Client, InstanceState, Owned, saved::Saved},
    status::{ReloadReport, RollbackReason, RollbackReport},
};

/// A reload under way.
pub(super) struct Running {
    pub(super) task: JoinHandle<Result<CutOver, ReloadReport>>,
    pub(super) waiters: Vec<Waiter>,
    pub(super) first_start: bool,
}

/// What a task the owner started hands back when it ends.
pub(super) enum Done {
    /// A drain (or an adopted canary's) ended.
    Drained,
    /// A reload reached its barrier.
    Finished {
        finished: Box<Finished>,
        waiters: Vec<Waiter>,
        first_start: bool,
    },
    /// A rollback's generation exited (`rollback --wait`).
    RolledBack {
        reply: oneshot::Sender<Response>,
        report: RollbackReport,
    },
    /// The generation beside a promoted canary exited (`promote --wait`).
    Promoted {
        reply: oneshot::Sender<Response>,
        generation: u64,
        previous: u64,
        exited_ms: f64,
    },
}

/// How the loop goes on after an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// Begin the stop.
    Stop,
}

/// How the owner's run ended (once per instance: the size of a variant
/// costs nothing).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Ended {
    /// Every generation has exited; `clean`: each within its drain
    /// timeout; `first_failure`: why the instance's first generation did
    /// not start.
    Stopped {
        clean: bool,
        first_failure: Option<ReloadReport>,
    },
    /// Handed over ([`Event::Handover`]): every generation still runs, for
    /// the next controller to adopt.
    HandedOver,
}

/// The stop under way: every generation drains until `deadline`, then
/// (once) is killed.
pub(super) struct Stopping {
    pub(super) deadline: tokio::time::Instant,
    pub(super) killed: bool,
}

/// The owner of one instance's state; see the module comment.
pub struct Owner<H: Host> {
    pub(super) state: InstanceState,
    pub(super) host: Arc<H>,
    pub(super) client: Client,
    pub(super) owned: Owned,
    pub(super) events: mpsc::Receiver<Event>,
    pub(super) saved: Arc<Saved>,
    pub(super) saved_version: u64,
    pub(super) scheduler: Scheduler,
    pub(super) running: Option<Running>,
    pub(super) tasks: JoinSet<Done>,
    pub(super) first_start: bool,
    /// Why the instance's first generation did not start.
    pub(super) first_failure: Option<ReloadReport>,
    /// When a crashed generation is restarted.
    pub(super) restart_at: Option<tokio::time::Instant>,
    pub(super) stopping: Option<Stopping>,
    /// Whether every generation exited within its drain timeout at stop.
    pub(super) clean: bool,
    /// A hand-over was asked for: it happens once no reload runs.
    pub(super) handing_over: bool,
}

impl<H: Host> Owner<H> {
    /// The owner of `state`, which `client` talks to (`owned`: its ends);
    /// `events` are its other inputs. With `first_start`, it starts the
    /// instance's first generation at once.
    pub fn new(
        state: InstanceState,
        host: Arc<H>,
        (client, owned): (Client, Owned),
        events: mpsc::Receiver<Event>,
        first_start: bool,
    ) -> Self {
        let saved = Arc::new(state.saved());
        let mut owner = Self {
            state,
            host,
            client,
            owned,
            events,
            saved,
            saved_version: 0,
            scheduler: Scheduler::default(),
            running: None,
            tasks: JoinSet::new(),
            first_start,
            first_failure: None,
            restart_at: None,
            stopping: None,
            clean: true,
            handing_over: false,
        };
        if first_start {
            owner.scheduler.request(None, None);
        }
        owner.publish();
        owner
    }

    /// A client of this owner's state.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(super) fn host(&self) -> &H {
        &self.host
    }

    /// The sender of the state file's persisted version, for the persister
    /// (from then on, [`Client::persisted`] waits for its writes).
    pub fn take_persisted(&mut self) -> tokio::sync::watch::Sender<u64> {
        let persisted = self.owned.persisted.take().expect("one persister");
        persisted.send_replace(0);
        persisted
    }

    /// Starts a drain of generation `number` (an adopted draining one).
    pub fn spawn_drain(&mut self, number: u64) {
        let client = self.client.clone();
        self.tasks.spawn(async move {
            reload::drain(&client, number).await;
            Done::Drained
        });
    }

    /// Finishes the eviction of generation `number` (its grace, then the
    /// kill).
    pub fn spawn_eviction(&mut self, number: u64) {
        let client = self.client.clone();
        self.tasks.spawn(async move {
            reload::evicted(&client, number).await;
            Done::Drained
        });
    }

    /// Waits for adopted canary `number`'s verdict.
    pub fn spawn_adopted_canary(&mut self, number: u64, previous: u64) {
        let client = self.client.clone();
        self.tasks.spawn(async move {
            reload::adopted_canary(&client, number, previous).await;
            Done::Drained
        });
    }

    /// Runs until the instance has stopped, or has handed over.
    pub async fn run(mut self) -> Ended {
        loop {
            self.start_pending_reload();
            let replace_at = self.replace_at();
            let flow = tokio::select! {
                Some(command) = self.owned.commands.recv() => {
                    self.apply(command);
                    Flow::Continue
                }
                Some(event) = self.events.recv() => self.on_event(event),
                finished = reload_done(&mut self.running) => self.reload_ended(finished),
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match done {
                        Ok(done) => self.task_done(done),
                        // Aborted at stop, or a panic (logged by the hook
                        // with its location).
                        Err(error) if error.is_panic() => {
                            error!("a drain or reload task panicked; the instance goes on");
                            Flow::Continue
                        }
                        Err(_) => Flow::Continue,
                    }
                }
                () = sleep_until(replace_at) => {
                    self.replace_not_listening();
                    Flow::Continue
                }
                () = sleep_until(self.restart_at) => {
                    self.restart_at = None;
                    if self.stopping.is_none() {
                        self.scheduler.request(None, None);
                    }
                    Flow::Continue
                }
                () = sleep_until(self.stopping.as_ref().map(|s| s.deadline)) => {
                    self.stop_deadline();
                    Flow::Continue
                }
            };
            if flow == Flow::Stop {
                self.begin_stop();
            }
            self.carry_out_effects();
            self.publish();
            if self.stopping.is_some()
                && self.state.live().is_empty()
                && self.state.members_left().is_empty()
            {
                break;
            }
            // A stop asked for meanwhile wins.
            if self.handing_over && self.stopping.is_none() && self.running.is_none() {
                self.hand_over();
                return Ended::HandedOver;
            }
        }
        info!("every generation has exited");
        Ended::Stopped {
            clean: self.clean,
            first_failure: self.first_failure,
        }
    }

    /// Starts the reload the scheduler has pending, unless one runs.
    fn start_pending_reload(&mut self) {
        if self.running.is_some() || self.stopping.is_some() || self.handing_over {
            return;
        }
        let Some(Start { waiters, canary }) = self.scheduler.start() else {
            return;
        };
        if !self.first_start {
            crate::notify::reloading();
        }
        let (client, host) = (self.client.clone(), self.host.clone());
        self.running = Some(Running {
            task: tokio::spawn(async move { reload::run(&client, &*host, canary).await }),
            waiters,
            first_start: self.first_start,
        });
        self.first_start = false;
    }

    /// Publishes the state as it is now; the state file's content gets a
    /// new version when it changed.
    pub(super) fn publish(&mut self) {
        let saved = self.state.saved();
        if saved != *self.saved {
            self.saved = Arc::new(saved);
            self.saved_version += 1;
        }
        let snapshot = self.state.snapshot(self.saved.clone(), self.saved_version);
        self.owned.snapshots.send_replace(Arc::new(snapshot));
    }

    /// Hands what the last step left for a blocking thread to the host.
    fn carry_out_effects(&mut self) {
        let effects = self.state.take_effects();
        if !effects.is_empty() {
            tokio::spawn(self.host.carry_out(effects));
        }
    }

    // ---- Events.

    fn on_event(&mut self, event: Event) -> Flow {
        match event {
            Event::Reload {
                wait,
                canary,
                reply,
            } => self.on_reload(wait, canary, reply),
            Event::Rollback { wait, reply } => {
                self.roll_back(RollbackReason::Manual, wait, Some(reply), None);
            }
            Event::Promote { wait, reply } => self.promote(wait, reply),
            Event::Stop => return Flow::Stop,
            Event::Handover { reply } => self.on_handover(reply),
            Event::ChildExited => self.reap_children(),
            Event::AdoptedExited { pid } => self.adopted_exited(pid),
            Event::CgroupChanged {
                generation,
                populated,
            } => self.cgroup_changed(generation, populated),
        }
        Flow::Continue
    }

    /// A reload request, decided against the state in one step.
    fn on_reload(
        &mut self,
        wait: bool,
        canary: Option<CanaryPlan>,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        let refused = if self.stopping.is_some() || self.state.is_stopping() {
            Some("the instance is stopping".to_owned())
        } else if self.handing_over {
            Some("the controller is handing over to a new one: ask it once it runs".to_owned())
        } else if let Some(Err(why)) = canary.as_ref().map(CanaryPlan::check) {
            // The protocol edge checks plans already; a plan from anywhere
            // else must not reach the state unchecked either.
            Some(why)
        } else if let Some(generation) = self.state.canary() {
            Some(crate::error::ReloadError::CanaryRunning { generation }.to_string())
        } else if canary.is_some() && self.state.active().is_none() {
            Some(
                "no generation is active to run a canary beside: reload without --canary"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(message) = refused {
            if let Some(reply) = reply {
                let _ = reply.send(Response::Error { message });
            }
            return;
        }
        match reply {
            Some(reply) if wait => self.scheduler.request(Some(reply), canary),
            reply => {
                if let Some(reply) = reply {
                    let _ = reply.send(Response::ReloadAccepted);
                }
                self.scheduler.request(None, canary);
            }
        }
    }

    // ---- Reloads.

    /// The reload task ended: it cut over (the rest runs as a task of its
    /// own), or it failed and is concluded here.
    fn reload_ended(&mut self, result: Result<CutOver, ReloadReport>) -> Flow {
        let Running {
            waiters,
            first_start,
            ..
        } = self.running.take().expect("a reload ran");
        let mut report = match result {
            Ok(cut_over) => {
                let client = self.client.clone();
                self.tasks.spawn(async move {
                    Done::Finished {
                        finished: Box::new(cut_over.finish(&client).await),
                        waiters,
                        first_start,
                    }
                });
                return Flow::Continue;
            }
            Err(report) => report,
        };
        // A reload task that ended without a report of its own (it
        // panicked) may leave its candidate behind.
        self.state.fail_candidates();
        self.conclude(&mut report, first_start);
        if first_start {
            error!("{}", report.human());
            answer(waiters, &Outcome::Reported(Box::new(report.clone())));
            self.first_failure = Some(report);
            return Flow::Stop;
        }
        let active = self.state.active();
        crate::notify::ready(&format!(
            "reload to generation {} failed; generation {} active",
            report.generation,
            active.map_or("none".into(), |g| g.to_string())
        ));
        answer(waiters, &Outcome::Reported(Box::new(report)));
        if self.state.replacing_not_listening() {
            // The bridges no longer hold on for it; the next look at the
            // listeners tries again, after the backoff.
            self.state.replacement_failed();
        }
        if active.is_none() && !self.state.is_stopping() {
            self.schedule_restart();
        }
        Flow::Continue
    }

    /// Decides how a reload ended and records it (state and metrics).
    fn conclude(&mut self, report: &mut ReloadReport, first_start: bool) {
        self.state.conclude(report, first_start);
        let recorder = self.client.recorder();
        recorder.config_loaded(report);
        if !first_start {
            recorder.reload(report);
        }
    }

    fn task_done(&mut self, done: Done) -> Flow {
        match done {
            Done::Drained => {}
            Done::Finished {
                finished,
                waiters,
                first_start,
            } => {
                let Finished {
                    mut report,
                    then_drain,
                } = *finished;
                self.conclude(&mut report, first_start);
                let active = self.state.active();
                crate::notify::ready(&format!(
                    "generation {} active",
                    active.map_or("none".into(), |g| g.to_string())
                ));
                answer(waiters, &Outcome::Reported(Box::new(report)));
                if let Some(old) = then_drain {
                    self.spawn_drain(old);
                }
            }
            Done::RolledBack { reply, report } => {
                let _ = reply.send(Response::RolledBack { report });
            }
            Done::Promoted {
                reply,
                generation,
                previous,
                exited_ms,
            } => {
                let _ = reply.send(Response::Promoted {
                    generation,
                    previous,
                    previous_exited_ms: Some(exited_ms),
                    held_ms: None,
                });
            }
        }
        Flow::Continue
    }

    /// When the active generation is to be replaced because it stopped
    /// listening (never while stopping).
    fn replace_at(&self) -> Option<tokio::time::Instant> {
        if self.stopping.is_some() {
            return None;
        }
        self.state.replace_not_listening_at().map(Into::into)
    }

    /// The active generation has not listened on a managed address for as
    /// long as the bridges hold connections: a new generation is started in
    /// its place under the crash policy (reinstating a previous one was
    /// tried when it stopped listening); the bridges hold on meanwhile.
    fn replace_not_listening(&mut self) {
        let Some((generation, addr)) = self.state.replace_not_listening() else {
            return;
        };
        warn!(
            generation,
            %addr,
            "it has not listened on a managed address for {} while still running: starting a \
             new generation in its place",
            crate::generation::human_duration(crate::state::HOLD_LIMIT)
        );
        self.schedule_restart();
    }

    /// Asks for a reload after the restart backoff.
    pub(super) fn schedule_restart(&mut self) {
        let delay = self.state.next_restart_delay();
        info!(delay = %crate::generation::human_duration(delay), "restarting after the backoff");
        self.restart_at = Some(tokio::time::Instant::now() + delay);
    }
}

/// The end of the reload under way (never, if none runs).
async fn reload_done(running: &mut Option<Running>) -> Result<CutOver, ReloadReport> {
    match running {
        Some(running) => match (&mut running.task).await {
            Ok(result) => result,
            Err(error) => Err(ReloadReport {
                error: Some(format!("the reload task ended: {error}")),
                failure: Some(crate::error::ReloadFailure {
                    kind: crate::error::FailureKind::Internal,
                    detail: format!("the reload task ended: {error}"),
                    active: None,
                }),
                ..ReloadReport::default()
            }),
        },
        None => std::future::pending().await,
    }
}

/// Sleeps until `at` (never, without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
