//! The test harness: a fake host of `sleep` processes with loopback
//! listeners, and an owner running in a task.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::TcpListener,
    os::{fd::OwnedFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use tokio::sync::{mpsc, oneshot};

use super::super::{Ended, Event, Owner};
use crate::{
    config::{CanaryPlan, RunConfig},
    control::Response,
    discovery::{Holder, Listener},
    error::ReloadError,
    generation::Generations,
    metrics::Recorder,
    reload::{Host, Scan},
    state::{Client, Effect, FoundSocket, HISTORY, InstanceState},
    status::{ReloadReport, StatusReport},
    steering::fake::FakeSteering,
    supervisor::{Exit, Gate, Process, Spawned, StderrTail},
};

/// Spawns `sleep` processes; those of generations `listens` accepts get
/// one loopback listener per address.
pub(super) struct FakeHost {
    pub(super) addresses: usize,
    pub(super) listens: fn(u64) -> bool,
    pub(super) sockets: Mutex<HashMap<u32, Vec<TcpListener>>>,
    pub(super) pids: Arc<Mutex<Vec<u32>>>,
    /// How long one scan of a process tree takes (on a blocking thread,
    /// as the real one's `/proc` walk).
    pub(super) scan_takes: Duration,
}

impl FakeHost {
    pub(super) fn new(addresses: usize, listens: fn(u64) -> bool) -> Self {
        Self {
            addresses,
            listens,
            sockets: Mutex::default(),
            pids: Arc::default(),
            scan_takes: Duration::ZERO,
        }
    }

    pub(super) fn waitid(pid: u32) -> Option<Exit> {
        let id = Id::Pid(nix::unistd::Pid::from_raw(pid as i32));
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(id, flags) {
            Ok(status @ (WaitStatus::Signaled(..) | WaitStatus::Exited(..))) => {
                crate::supervisor::describe(status)
            }
            _ => None,
        }
    }
}

impl Host for FakeHost {
    async fn spawn(&self, number: u64, _: Option<PathBuf>) -> Result<Spawned, ReloadError> {
        let child = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Never waited through std: the harness's reaper owns its exit.
        drop(child);
        self.pids.lock().unwrap().push(pid);
        if (self.listens)(number) {
            let listeners = (0..self.addresses)
                .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            self.sockets.lock().unwrap().insert(pid, listeners);
        }
        Ok(Spawned {
            process: Process::child(pid).expect("pidfd"),
            stderr: StderrTail::default(),
            gate: Gate::none(),
            cgroup: None,
        })
    }

    fn notify_paths(&self, number: u64) -> (PathBuf, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "reloader-unit-{}-{number}.notify",
            std::process::id()
        ));
        (path.clone(), path)
    }

    async fn scan(&self, of: crate::reload::Members) -> Result<Scan, ReloadError> {
        let pid = of.pid;
        if !self.scan_takes.is_zero() {
            let takes = self.scan_takes;
            #[allow(clippy::disallowed_methods)] // a blocking thread, as the real walk
            let slow = tokio::task::spawn_blocking(move || std::thread::sleep(takes));
            slow.await.unwrap();
        }
        let sockets = self.sockets.lock().unwrap();
        let per_address = (0..self.addresses)
            .map(|i| {
                sockets
                    .get(&pid)
                    .map(|l| {
                        vec![(
                            Listener {
                                transport: crate::net::Transport::Tcp,
                                inode: u64::from(pid) * 100 + i as u64,
                                cookie: 0,
                                addr: l[i].local_addr().unwrap(),
                                accept_queue: 0,
                                backlog: 128,
                            },
                            Holder {
                                pid,
                                fd: 3 + i as i32,
                            },
                        )]
                    })
                    .unwrap_or_default()
            })
            .collect();
        Ok(Scan {
            per_address,
            listening: Vec::new(),
        })
    }

    async fn listening(&self) -> Result<BTreeSet<u64>, ReloadError> {
        Ok(BTreeSet::new())
    }

    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static {
        crate::supervisor::exit_of(pid)
    }

    async fn copy(&self, scan: Scan) -> Result<Vec<Vec<FoundSocket>>, ReloadError> {
        let sockets = self.sockets.lock().unwrap();
        Ok(scan
            .per_address
            .iter()
            .enumerate()
            .map(|(i, found)| {
                found
                    .iter()
                    .map(|(socket, holder)| FoundSocket {
                        socket: socket.clone(),
                        holder: *holder,
                        process: "sleep".into(),
                        go: false,
                        copy: OwnedFd::from(sockets[&holder.pid][i].try_clone().unwrap()),
                    })
                    .collect()
            })
            .collect())
    }

    fn carry_out(&self, effects: Vec<Effect>) -> impl Future<Output = ()> + Send + 'static {
        assert!(effects.is_empty(), "no adopted process here: {effects:?}");
        async {}
    }

    fn peek_exited(&self) -> Option<Exit> {
        let pids = self.pids.lock().unwrap().clone();
        pids.into_iter().find_map(Self::waitid)
    }

    fn reap(&self, pid: u32) {
        let _ = waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        self.pids.lock().unwrap().retain(|p| *p != pid);
    }
}

/// An owner running in a task, and what a test talks to it through.
pub(super) struct Harness {
    pub(super) events: mpsc::Sender<Event>,
    pub(super) client: Client,
    pub(super) fake: FakeSteering,
    pub(super) host: Arc<FakeHost>,
    pub(super) owner: tokio::task::JoinHandle<Ended>,
    pub(super) reaper: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Starts an instance (its first generation too) with `config`.
    pub(super) fn start(config: RunConfig, host: FakeHost) -> Self {
        let fake = FakeSteering::default();
        let config = Arc::new(config);
        let state = InstanceState::new(
            config.clone(),
            config.limits(),
            Box::new(fake.clone()),
            Generations::new(config.limits().slots, HISTORY),
            HashMap::new(),
            None,
        );
        let host = Arc::new(host);
        let (events, events_rx) = mpsc::channel(64);
        let snapshot = state.snapshot(Arc::new(state.saved()), 0);
        let link = Client::new(config, Recorder::default(), snapshot);
        let owner = Owner::new(state, host.clone(), link, events_rx, true);
        let client = owner.client().clone();
        let reaper = tokio::spawn(reaper(host.pids.clone(), events.clone()));
        Self {
            events,
            client,
            fake,
            host,
            owner: tokio::spawn(owner.run()),
            reaper,
        }
    }

    pub(super) async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Response>) -> Event,
    ) -> Response {
        let (reply, answer) = oneshot::channel();
        self.events.send(make(reply)).await.expect("the owner runs");
        tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("an answer in time")
            .expect("an answer")
    }

    pub(super) async fn reload(&self, canary: Option<CanaryPlan>) -> Response {
        self.ask(|reply| Event::Reload {
            wait: true,
            canary,
            reply: Some(reply),
        })
        .await
    }

    pub(super) async fn status(&self) -> StatusReport {
        self.client.status().await.expect("the owner answers")
    }

    /// Waits until `condition` holds for the latest snapshot.
    pub(super) async fn until(
        &self,
        what: &str,
        condition: impl Fn(&crate::state::Snapshot) -> bool,
    ) {
        let mut snapshots = self.client.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !condition(&snapshots.borrow_and_update()) {
                snapshots.changed().await.expect("the owner runs");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    /// Stops the instance; returns whether the stop was clean and why the
    /// first generation did not start, as the owner's run returned them.
    pub(super) async fn stop(self) -> (bool, Option<ReloadReport>) {
        self.events.send(Event::Stop).await.expect("the owner runs");
        match self.ended().await {
            Ended::Stopped {
                clean,
                first_failure,
            } => (clean, first_failure),
            Ended::HandedOver => panic!("a stop ended in a hand-over"),
        }
    }

    /// Waits (at most 10 s) until the owner's run has ended.
    pub(super) async fn ended(self) -> Ended {
        let ended = tokio::time::timeout(Duration::from_secs(10), self.owner)
            .await
            .expect("ended in time")
            .expect("no panic");
        self.reaper.abort();
        ended
    }
}

/// Tells the owner whenever one of `pids` has exited (unreaped), as
/// `SIGCHLD` does for the real instance.
async fn reaper(pids: Arc<Mutex<Vec<u32>>>, events: mpsc::Sender<Event>) {
    loop {
        let known = pids.lock().unwrap().clone();
        if known.into_iter().any(|pid| FakeHost::waitid(pid).is_some()) {
            let _ = events.send(Event::ChildExited).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn report(response: Response) -> ReloadReport {
    match response {
        Response::ReloadDone { report }
        | Response::ReloadFailed { report }
        | Response::ReloadRolledBack { report } => report,
        other => panic!("not a reload report: {other:?}"),
    }
}
