//! How the instance's other tasks reach its state: [`Command`]s sent to
//! the one task that owns it (the instance's run loop), each answered on a
//! `oneshot` where the sender needs the answer, and the [`Snapshot`] the
//! owner publishes after each one. [`Client`] wraps both in domain methods
//! (`begin`, `register`, `cut_over`, …), the shape of mini-redis's `Db`:
//! nobody outside the owner touches the state, and there is no lock to
//! hold, poison or forget.
//!
//! A command is one step of the owner: a decision that depends on the
//! state is made inside it, whole. When the owner has stopped (the
//! instance is stopping or its run loop ended), every method answers as
//! for a stopping instance.

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Begun, FoundSocket, NotNow, Refreshed, Snapshot};
use crate::{
    config::{CanaryPlan, RunConfig},
    error::ReloadError,
    metrics::Recorder,
    status::StatusReport,
    supervisor::{Process, StderrTail},
};

/// Commands waiting for the owner at most.
pub const COMMAND_QUEUE: usize = 256;

/// Where a candidate's activation left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activated {
    /// When the maps were updated.
    pub cutover: Instant,
    /// It runs as a canary (not active yet).
    pub canary: bool,
}

/// One step asked of the state's owner.
#[derive(Debug)]
pub enum Command {
    /// Step 1: take a slot for the next generation, recording the config
    /// digest it starts with.
    Begin {
        config_sha256: Option<String>,
        reply: oneshot::Sender<Result<Begun, NotNow>>,
    },
    /// Step 2: its leader runs.
    Spawned {
        number: u64,
        process: Process,
        stderr: StderrTail,
        /// Its cgroup, if it has one.
        cgroup: Option<std::path::PathBuf>,
        reply: oneshot::Sender<Result<(), ReloadError>>,
    },
    /// Step 4: register the sockets found, per address.
    Register {
        number: u64,
        found: Vec<Vec<FoundSocket>>,
        reply: oneshot::Sender<Result<(), ReloadError>>,
    },
    /// Step 5: route a probe's SYN (or datagram) from `port` to `number`.
    AddProbe {
        number: u64,
        listener: usize,
        port: u16,
        reply: oneshot::Sender<Result<(), ReloadError>>,
    },
    RemoveProbe {
        listener: usize,
        port: u16,
    },
    /// Step 6: cut over to `number`, or start it as a canary.
    Activate {
        number: u64,
        ready: Instant,
        canary: Option<CanaryPlan>,
        reply: oneshot::Sender<Result<Activated, ReloadError>>,
    },
    /// A candidate that will not become active: killed, its slot emptied.
    /// Answers with its stderr.
    Fail {
        number: u64,
        error: ReloadError,
        reply: oneshot::Sender<Option<StderrTail>>,
    },
    /// Send generation `number` its drain signal (false: it no longer
    /// drains).
    DrainSignal {
        number: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Generation `number`'s drain begins through `--drain-command`:
    /// recorded like a drain signal, no signal sent (false: it no longer
    /// drains).
    DrainBegun {
        number: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Kill its process group (drain timeout).
    Kill {
        number: u64,
    },
    /// An evicted generation's grace is over: kill it.
    KillEvicted {
        number: u64,
    },
    /// The draining generations' memory now (generation, bytes):
    /// `--max-draining-memory` may evict the oldest.
    OverMemory {
        usage: Vec<(u64, u64)>,
    },
    /// It did not exit after SIGKILL: free its slot.
    Abandon {
        number: u64,
        waited: std::time::Duration,
    },
    /// Rewrite a tracked generation's slot with what it holds now.
    Refresh {
        number: u64,
        found: Vec<Vec<FoundSocket>>,
        listening: BTreeSet<u64>,
        reply: oneshot::Sender<Result<Refreshed, ReloadError>>,
    },
    /// Hand what the bridges hold to the active generation.
    ReleaseBridges {
        listening: BTreeSet<u64>,
    },
    /// A health check's result (an unhealthy new generation is rolled
    /// back in the same step).
    HealthChecked {
        number: u64,
        result: Result<(), String>,
    },
    /// Move a timed canary on if its step has passed.
    AdvanceCanary {
        number: u64,
        now: Instant,
    },
    /// Sample the steered rates while a canary runs.
    SampleRates {
        now: Instant,
    },
    /// The status (without what only the kernel knows now: see
    /// [`Client::status`]).
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
}

/// A task's door to the state: commands to its owner, snapshots back.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    persisted: watch::Receiver<u64>,
    config: Arc<RunConfig>,
    recorder: Recorder,
    /// Where the steering program migrated connections to (what `status`
    /// counts them by).
    migrations: Option<crate::steering::MigrationLog>,
    /// How many listens on managed addresses the `sock_ops` notifier has
    /// seen (`None`: no notifier, discovery polls).
    listens: Option<watch::Receiver<u64>>,
}

/// The owner's ends of a [`Client`].
pub struct Owned {
    pub commands: mpsc::Receiver<Command>,
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    /// Which version of the state file is on disk (for the persister,
    /// which takes it).
    pub persisted: Option<watch::Sender<u64>>,
}

impl Client {
    /// A client and the ends its owner keeps; `snapshot` is the first one.
    pub fn new(config: Arc<RunConfig>, recorder: Recorder, snapshot: Snapshot) -> (Self, Owned) {
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (snapshots, snapshots_rx) = watch::channel(Arc::new(snapshot));
        // Nothing to wait for until a persister runs (see `persisted`).
        let (persisted, persisted_rx) = watch::channel(u64::MAX);
        (
            Self {
                commands: commands_tx,
                snapshots: snapshots_rx,
                persisted: persisted_rx,
                config,
                recorder,
                migrations: None,
                listens: None,
            },
            Owned {
                commands,
                snapshots,
                persisted: Some(persisted),
            },
        )
    }

    /// Counts migrated connections by `log` in [`Client::status`].
    pub fn counting_migrations(mut self, log: Option<crate::steering::MigrationLog>) -> Self {
        self.migrations = log;
        self
    }

    /// Hears of listens on managed addresses through `listens` (a count
    /// the listen notifier raises).
    pub fn hearing_listens(mut self, listens: watch::Receiver<u64>) -> Self {
        self.listens = Some(listens);
        self
    }

    /// The count of listens on managed addresses, if a notifier reports
    /// them (marked seen: `changed()` waits for the next).
    pub fn listens(&self) -> Option<watch::Receiver<u64>> {
        self.listens.clone().map(|mut rx| {
            rx.mark_unchanged();
            rx
        })
    }

    /// Where the steering program recorded migrated connections.
    pub fn migrations(&self) -> Option<crate::steering::MigrationLog> {
        self.migrations.clone()
    }

    /// The instance's configuration (fixed for its life).
    pub fn config(&self) -> &Arc<RunConfig> {
        &self.config
    }

    /// The event metrics.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that sees every later snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut rx = self.snapshots.clone();
        rx.mark_unchanged();
        rx
    }

    /// Waits until the state file holds what the state is now (or no
    /// persister runs).
    pub async fn persisted(&self) {
        let target = self.snapshots.borrow().saved_version;
        let mut done = self.persisted.clone();
        let _ = done.wait_for(|v| *v >= target).await;
    }

    /// Sends a command without waiting for anything.
    async fn tell(&self, command: Command) {
        // An owner that has stopped needs no more telling.
        let _ = self.commands.send(command).await;
    }

    /// Sends the command `make` builds around a reply channel and waits
    /// for the answer; `None` when the owner has stopped.
    async fn ask<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Command) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.ok()?;
        answer.await.ok()
    }

    pub async fn begin(&self, config_sha256: Option<String>) -> Result<Begun, NotNow> {
        self.ask(|reply| Command::Begin {
            config_sha256,
            reply,
        })
        .await
        .unwrap_or(Err(NotNow::Stopping))
    }

    pub async fn spawned(
        &self,
        number: u64,
        process: Process,
        stderr: StderrTail,
        cgroup: Option<std::path::PathBuf>,
    ) -> Result<(), ReloadError> {
        self.ask(|reply| Command::Spawned {
            number,
            process,
            stderr,
            cgroup,
            reply,
        })
        .await
        .unwrap_or(Err(ReloadError::Stopping))
    }

    pub async fn register(
        &self,
        number: u64,
        found: Vec<Vec<FoundSocket>>,
    ) -> Result<(), ReloadError> {
        self.ask(|reply| Command::Register {
            number,
            found,
            reply,
        })
        .await
        .unwrap_or(Err(ReloadError::Stopping))
    }

    pub async fn add_probe(
        &self,
        number: u64,
        listener: usize,
        port: u16,
    ) -> Result<(), ReloadError> {
        self.ask(|reply| Command::AddProbe {
            number,
            listener,
            port,
            reply,
        })
        .await
        .unwrap_or(Err(ReloadError::Stopping))
    }

    pub async fn remove_probe(&self, listener: usize, port: u16) {
        self.tell(Command::RemoveProbe { listener, port }).await;
    }

    pub async fn activate(
        &self,
        number: u64,
        ready: Instant,
        canary: Option<CanaryPlan>,
    ) -> Result<Activated, ReloadError> {
        self.ask(|reply| Command::Activate {
            number,
            ready,
            canary,
            reply,
        })
        .await
        .unwrap_or(Err(ReloadError::Stopping))
    }

    pub async fn fail(&self, number: u64, error: ReloadError) -> Option<StderrTail> {
        self.ask(|reply| Command::Fail {
            number,
            error,
            reply,
        })
        .await
        .flatten()
    }

    pub async fn drain_signal(&self, number: u64) -> bool {
        self.ask(|reply| Command::DrainSignal { number, reply })
            .await
            .unwrap_or(false)
    }

    pub async fn drain_begun(&self, number: u64) -> bool {
        self.ask(|reply| Command::DrainBegun { number, reply })
            .await
            .unwrap_or(false)
    }

    pub async fn kill(&self, number: u64) {
        self.tell(Command::Kill { number }).await;
    }

    pub async fn kill_evicted(&self, number: u64) {
        self.tell(Command::KillEvicted { number }).await;
    }

    pub async fn over_memory(&self, usage: Vec<(u64, u64)>) {
        self.tell(Command::OverMemory { usage }).await;
    }

    pub async fn abandon(&self, number: u64, waited: std::time::Duration) {
        self.tell(Command::Abandon { number, waited }).await;
    }

    pub async fn refresh(
        &self,
        number: u64,
        found: Vec<Vec<FoundSocket>>,
        listening: BTreeSet<u64>,
    ) -> Result<Refreshed, ReloadError> {
        self.ask(|reply| Command::Refresh {
            number,
            found,
            listening,
            reply,
        })
        .await
        .unwrap_or(Err(ReloadError::Stopping))
    }

    pub async fn release_bridges(&self, listening: BTreeSet<u64>) {
        self.tell(Command::ReleaseBridges { listening }).await;
    }

    pub async fn health_checked(&self, number: u64, result: Result<(), String>) {
        self.tell(Command::HealthChecked { number, result }).await;
    }

    pub async fn advance_canary(&self, number: u64, now: Instant) {
        self.tell(Command::AdvanceCanary { number, now }).await;
    }

    pub async fn sample_rates(&self, now: Instant) {
        self.tell(Command::SampleRates { now }).await;
    }

    /// Whether the owner answers a status request within `within` (what
    /// `/healthz` reports): false once it has stopped, or while it is
    /// stuck.
    pub async fn answers(&self, within: std::time::Duration) -> bool {
        let asked = self.ask(|reply| Command::Status { reply });
        matches!(tokio::time::timeout(within, asked).await, Ok(Some(_)))
    }

    /// The instance's status, with each registered socket's accept-queue
    /// length read from the kernel on a blocking thread. `None` once the
    /// owner has stopped.
    pub async fn status(&self) -> Option<StatusReport> {
        let report = self.ask(|reply| Command::Status { reply }).await?;
        // What only the kernel knows now, read on a blocking thread.
        let migrations = self.migrations.clone();
        tokio::task::spawn_blocking(move || {
            let mut report = report;
            if let Ok(listening) = crate::discovery::listeners() {
                let by_inode: std::collections::HashMap<u64, u32> = listening
                    .into_iter()
                    .map(|l| (l.inode, l.accept_queue))
                    .collect();
                for socket in report.generations.iter_mut().flat_map(|g| &mut g.sockets) {
                    socket.accept_queue = by_inode.get(&socket.inode).copied();
                }
            }
            crate::holdings::observe(&mut report, migrations.as_ref());
            report
        })
        .await
        .ok()
    }
}

impl crate::metrics::Source for Client {
    async fn status(&self) -> Option<StatusReport> {
        Client::status(self).await
    }

    async fn answers(&self, within: std::time::Duration) -> bool {
        Client::answers(self, within).await
    }

    fn readiness(&self) -> crate::status::Readiness {
        self.snapshot().readiness()
    }

    fn recorder(&self) -> &Recorder {
        &self.recorder
    }
}
