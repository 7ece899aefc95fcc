//! One instance (`reloader run`): boots it ([`recovery`]), runs its tasks,
//! and stops it ([`shutdown`]).
//!
//! Concurrency model: one single-threaded tokio runtime. The state has one
//! owner, [`crate::state::InstanceState`], behind [`Handle`]. The run loop
//! here decides what happens next: it owns the reload [`Scheduler`] and
//! receives every input — signals, [`Event`]s from the control server and
//! the pidfd watchers, the end of a reload — so stop, SIGTERM and reload
//! requests are handled in every phase, a first start included. A reload
//! runs as a task of its own (the machine in [`crate::reload`]), which the
//! loop aborts when the instance stops; drains of old generations run
//! concurrently (`--max-draining` bounds them). Slow work never runs on
//! this thread: discovery, netlink dumps and the state file's fsync go to
//! blocking threads, and output goes through a non-blocking writer.

mod events;
mod files;
mod reaper;
mod recovery;
mod shutdown;
mod watch;

use std::sync::Arc;

use anyhow::Context;
use events::{Control, Event};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc},
    task::{JoinHandle, JoinSet},
};
use tracing::{error, info, warn};

use crate::{
    config::RunConfig,
    control::Response,
    generation::State,
    reload::{
        self, CutOver, System,
        scheduler::{Outcome, Scheduler, Start, Waiter, answer},
    },
    state::{Handle, InstanceState},
    status::{ReloadReport, ReloadResult, RollbackReason, RollbackReport},
    steering::Steering,
    supervisor,
};

/// Events waiting for the run loop at most.
const EVENT_QUEUE: usize = 256;

/// A reload under way.
struct Running {
    task: JoinHandle<Result<CutOver, ReloadReport>>,
    waiters: Vec<Waiter>,
    first_start: bool,
}

/// Runs instance `config` until it is stopped. Returns whether the stop was
/// clean (every generation exited within its drain timeout).
pub async fn run(config: RunConfig) -> anyhow::Result<bool> {
    supervisor::become_subreaper().context("failed to become a child subreaper")?;
    // Before anything starts: a --watch path another user controls is refused.
    let watcher = crate::watch::Watcher::start(&config.watch)?;
    let config = Arc::new(config);
    let dir = config
        .control_socket
        .parent()
        .context("the control socket path has no directory")?;
    files::secure_dir(dir)?;
    let _lock = files::InstanceLock::take(&config.control_socket, &config.name)?;
    let paths = recovery::Paths::of(&config);
    let previous = recovery::look_back(&config, &paths)?;
    let recovered = recovery::clean_up(&previous, &paths);
    let adopting = previous.adopting();
    if !adopting {
        recovery::check_addresses_free(&config.listen)?;
    }
    let control = recovery::bind_control_socket(&config.control_socket, &config.name).await?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let limits = recovery::limits(&config, &previous);
    let mut steering = recovery::load_steering(&config, &paths, limits, adopting)?;
    if let Some(pump) = steering.log_pump() {
        tokio::spawn(pump_logs(pump));
    }
    let listened = Arc::new(Notify::new());
    let events = match own_cgroup().and_then(|cgroup| Ok(steering.listen_events(&cgroup)?)) {
        Ok(events) => {
            tokio::spawn(pump_listen_events(events, listened.clone()));
            true
        }
        Err(error) => {
            warn!(
                error = %crate::error_chain(error.as_ref()),
                "no listen events (cgroup v2 sock_ops): listeners are found by polling"
            );
            false
        }
    };
    // UDP sockets do not listen: new ones are found by polling.
    let steady = if events
        && config
            .listen
            .iter()
            .all(|l| l.transport == crate::net::Transport::Tcp)
    {
        reload::IDLE_INTERVAL
    } else {
        reload::TRACK_INTERVAL
    };

    let (generations, processes) = recovery::generations(&previous, limits);
    let handle = Handle::new(InstanceState::new(
        config.clone(),
        limits,
        Box::new(steering),
        generations,
        processes,
        recovered,
    ));
    let (stop_persister, persister_stop) = tokio::sync::oneshot::channel();
    let persister = tokio::spawn(
        handle
            .clone()
            .persist_to(paths.state.clone(), persister_stop),
    );

    // Signals first, so a child that exits at once is reaped.
    let mut sigchld = signal(SignalKind::child())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let control_task = tokio::spawn(crate::control::server::serve(
        Control {
            events: events_tx.clone(),
            handle: handle.clone(),
        },
        control,
    ));
    let metrics_task = metrics_listener
        .map(|listener| tokio::spawn(crate::metrics::serve(handle.clone(), listener)));
    let watch_task = watcher.map(|w| tokio::spawn(watch::reload_on_change(w, events_tx.clone())));
    info!(
        name = %config.name,
        socket = %config.control_socket.display(),
        listen = ?config.listen,
        "controller started"
    );

    let host = Arc::new(System {
        config: config.clone(),
    });
    let mut scheduler = Scheduler::default();
    let mut drains = JoinSet::new();
    let mut first_start = !adopting;
    if adopting {
        if let Some(hold) = previous.saved.as_ref().and_then(|s| s.hold) {
            handle.update(|s| s.restore_hold(&hold));
        }
        adopt(&handle, &events_tx, &mut drains).await;
        crate::notify::ready("adopted running generations");
    } else {
        scheduler.request(None, None);
    }
    let tracker = tokio::spawn(reload::track(
        handle.clone(),
        host.clone(),
        listened,
        steady,
    ));
    let health = config.health.is_some().then(|| {
        let events = events_tx.clone();
        tokio::spawn(reload::health::watch(handle.clone(), move |number| {
            // A full queue: the next failed check asks again.
            let _ = events.try_send(Event::Rollback {
                reason: RollbackReason::Health,
                wait: false,
                answer: None,
                only_from: Some(number),
            });
        }))
    });
    let mut running: Option<Running> = None;
    let mut first_failure = None;
    loop {
        if running.is_none()
            && let Some(Start { waiters, canary }) = scheduler.start()
        {
            if !first_start {
                crate::notify::reloading();
            }
            let (handle, host) = (handle.clone(), host.clone());
            let first = first_start;
            running = Some(Running {
                task: tokio::spawn(
                    async move { reload::run(&handle, &*host, first, canary).await },
                ),
                waiters,
                first_start,
            });
            first_start = false;
        }
        tokio::select! {
            _ = sigchld.recv() => reaper::reap_children(&handle, &events_tx),
            _ = sighup.recv() => scheduler.request(None, None),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(event) = events.recv() => match event {
                Event::Reload { waiter, canary } => scheduler.request(waiter, canary),
                Event::Rollback { reason, wait, answer, only_from } => {
                    roll_back(&handle, reason, wait, answer, only_from, &mut drains);
                }
                Event::Restart => scheduler.request(None, None),
                Event::AdoptedExited { pid } => reaper::adopted_exited(&handle, &events_tx, pid),
                Event::Stop => break,
            },
            finished = reload_done(&mut running) => {
                let Running { waiters, first_start, .. } = running.take().expect("a reload ran");
                match finished {
                    Ok(cut_over) => {
                        let handle = handle.clone();
                        drains.spawn(async move {
                            let barrier_handle = handle.clone();
                            cut_over.finish(&handle, move |report| {
                                let active = barrier_handle.read(|s| s.active());
                                crate::notify::ready(&format!(
                                    "generation {} active",
                                    active.map_or("none".into(), |g| g.to_string())
                                ));
                                let outcome = match report.result {
                                    ReloadResult::Succeeded => Outcome::Done(report.clone()),
                                    ReloadResult::Failed => Outcome::Failed(report.clone()),
                                    ReloadResult::RolledBack => Outcome::RolledBack(report.clone()),
                                };
                                answer(waiters, &outcome);
                            }).await;
                        });
                    }
                    Err(report) if first_start => {
                        error!("{}", report.human());
                        answer(waiters, &Outcome::Failed(report.clone()));
                        first_failure = Some(report);
                        break;
                    }
                    Err(report) => {
                        let active = handle.read(|s| s.active());
                        crate::notify::ready(&format!(
                            "reload to generation {} failed; generation {} active",
                            report.generation,
                            active.map_or("none".into(), |g| g.to_string())
                        ));
                        answer(waiters, &Outcome::Failed(report));
                        if active.is_none() && !handle.read(|s| s.is_stopping()) {
                            reaper::schedule_restart(&handle, &events_tx);
                        }
                    }
                }
            }
            Some(_) = drains.join_next(), if !drains.is_empty() => {}
        }
    }

    info!("stopping: draining every generation");
    if let Some(running) = running.take() {
        // A start in progress is cancelled; begin_stop kills its candidate.
        running.task.abort();
        answer(
            running.waiters,
            &Outcome::NotRun("the instance stopped before the reload completed".into()),
        );
    }
    scheduler.refuse_all("the instance is stopping");
    drains.abort_all();
    if let Some(task) = health {
        task.abort();
    }
    let clean = shutdown::stop(&handle, &mut sigchld, &mut events, &events_tx).await;
    tracker.abort();
    if let Some(task) = watch_task {
        task.abort();
    }
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = stop_persister.send(());
    let _ = persister.await;
    // After a stop nothing of the instance remains: no state file, no pins.
    let _ = std::fs::remove_file(&paths.state);
    Steering::unpin(&paths.pins);
    let _ = std::fs::remove_file(&config.control_socket);
    if let Some(report) = first_failure {
        anyhow::bail!(
            "the first generation did not start: {}",
            report.error.unwrap_or_default()
        );
    }
    info!(clean, "stopped");
    Ok(clean)
}

/// The end of the reload under way (never, if none runs).
async fn reload_done(running: &mut Option<Running>) -> Result<CutOver, ReloadReport> {
    match running {
        Some(running) => match (&mut running.task).await {
            Ok(result) => result,
            Err(error) => Err(ReloadReport {
                error: Some(format!("the reload task ended: {error}")),
                ..ReloadReport::default()
            }),
        },
        None => std::future::pending().await,
    }
}

/// Takes over the generations a previous controller left running: a
/// candidate that was starting is killed (that reload is lost), draining
/// ones are drained again, and every leader's exit is watched by pidfd.
async fn adopt(handle: &Handle, events: &mpsc::Sender<Event>, drains: &mut JoinSet<()>) {
    let listen = handle.read(|s| s.config().listen.clone());
    for (number, state) in handle.read(|s| s.live()) {
        match state {
            State::Starting | State::Ready => {
                handle.update(|s| s.kill_orphaned_candidate(number));
            }
            State::Active | State::Canary => {
                let Some(pid) = handle.read(|s| s.generation(number).and_then(|g| g.pid)) else {
                    continue;
                };
                let listen = listen.clone();
                let sockets =
                    tokio::task::spawn_blocking(move || recovery::adopted_sockets(pid, &listen))
                        .await
                        .unwrap_or_default();
                handle.update(|s| s.adopted_sockets(number, sockets));
                if state == State::Canary
                    && let Some(previous) = handle.update(|s| s.adopted_canary(number))
                {
                    let handle = handle.clone();
                    drains.spawn(async move {
                        reload::adopted_canary(&handle, number, previous).await;
                    });
                }
            }
            State::Draining => {
                // A held generation can be made active again: its sockets
                // are needed to check it still listens everywhere.
                if handle.read(|s| s.hold_until(number)).is_some()
                    && let Some(pid) = handle.read(|s| s.generation(number).and_then(|g| g.pid))
                {
                    let listen = listen.clone();
                    let sockets = tokio::task::spawn_blocking(move || {
                        recovery::adopted_sockets(pid, &listen)
                    })
                    .await
                    .unwrap_or_default();
                    handle.update(|s| s.adopted_sockets(number, sockets));
                }
                let handle = handle.clone();
                drains.spawn(async move { reload::drain(&handle, number).await });
            }
            State::Exited | State::Failed => {}
        }
    }
    reaper::watch_adopted(handle, events);
}

/// Rolls back (see [`InstanceState::rollback`]) and drains the generation
/// rolled back from. `only_from`: only if that generation is still the new
/// one (a health verdict about a generation that was meanwhile replaced
/// is stale).
fn roll_back(
    handle: &Handle,
    reason: RollbackReason,
    wait: bool,
    answer: Option<tokio::sync::oneshot::Sender<Response>>,
    only_from: Option<u64>,
    drains: &mut JoinSet<()>,
) {
    if let Some(number) = only_from
        && handle.read(|s| s.health_targets().first().copied()) != Some(number)
    {
        return;
    }
    let done = match handle.update(|s| s.rollback(reason)) {
        Ok(done) => done,
        Err(error) => {
            let message = crate::error_chain(&error);
            if reason != RollbackReason::Manual {
                warn!(%reason, "no rollback: {message}");
            }
            if let Some(answer) = answer {
                let _ = answer.send(Response::Error { message });
            }
            return;
        }
    };
    crate::notify::ready(&format!(
        "rolled back: generation {} active, generation {} drains",
        done.to, done.from
    ));
    let mut report = RollbackReport {
        from: done.from,
        to: done.to,
        map_update_us: done.map_update.as_secs_f64() * 1e6,
        from_exited_ms: None,
    };
    let mut answer = answer;
    if !wait && let Some(answer) = answer.take() {
        let _ = answer.send(Response::RolledBack {
            report: report.clone(),
        });
    }
    let handle = handle.clone();
    drains.spawn(async move {
        let t0 = std::time::Instant::now();
        reload::drain(&handle, done.from).await;
        if let Some(answer) = answer {
            report.from_exited_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            let _ = answer.send(Response::RolledBack { report });
        }
    });
}

/// The controller's cgroup (v2): servers it spawns are in it or below. The
/// v2 hierarchy is wherever `cgroup2` is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
fn own_cgroup() -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE ...
    let root = mounts
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split_whitespace().next() == Some("cgroup2")).then(|| {
                fields
                    .split_whitespace()
                    .nth(4)
                    .map(std::path::PathBuf::from)
            })?
        })
        .context("cgroup v2 is not mounted")?;
    let dir = root.join(path.trim_start_matches('/'));
    anyhow::ensure!(
        dir.join("cgroup.procs").exists(),
        "the controller's cgroup {} is not visible here",
        dir.display()
    );
    Ok(dir)
}

/// Wakes the tracker whenever the programs report a new listener or a
/// connection held on a bridge.
async fn pump_listen_events(events: crate::steering::ListenEvents, listened: Arc<Notify>) {
    // SAFETY: the ring buffer map fd stays open and unchanged for as long
    // as `events` (now owned by the AsyncFd) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut woke = !guard.get_inner_mut().drain().is_empty();
        guard.clear_ready();
        // An event that arrived between the drain and clear_ready set no
        // new readiness: look once more.
        woke |= !guard.get_inner_mut().drain().is_empty();
        if woke {
            listened.notify_one();
        }
    }
}

/// Forwards the eBPF program's aya-log records (debug level) to tracing.
async fn pump_logs(pump: crate::steering::LogPump) {
    // SAFETY: LogPump owns its ring buffer map fd, which stays open and
    // unchanged for as long as the pump (now owned by the AsyncFd) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pump, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
