//! The controller of one instance (`reloader run`): owns all state, runs
//! reloads one at a time, answers the control socket, reaps children and
//! stops everything cleanly.
//!
//! Concurrency model: one single-threaded tokio runtime. State lives in
//! [`Inner`] behind a mutex that is never held across an `.await`. A
//! `watch` channel ticks on every generation state change, so waiters
//! (ready loop, drain, `reload --wait`) react to exits at once instead of
//! polling. Reload requests that arrive during a reload coalesce into one
//! follow-up reload whose result every requester receives.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Notify, Semaphore, oneshot, watch},
};
use tracing::{error, info, warn};

use crate::{
    config::RunConfig,
    control::{self, MAX_REQUEST, Request, Response},
    discovery::{self, Listener},
    generation::{Generations, State},
    reload,
    status::{
        CounterStatus, GenerationStatus, ListenerStatus, ReloadReport, SocketStatus, StatusReport,
    },
    steering::{MAX_SLOTS, Options, Steering},
    supervisor::{self, StderrTail},
};

/// Ended generations kept for `status`.
const HISTORY: usize = 8;
/// Control connections served at once. Beyond that a connection is told
/// "busy" at once rather than queued: idle connections (each may hold its
/// place up to the 5 s request timeout) must never delay a reload.
const MAX_CLIENTS: usize = 256;
/// First delay before restarting a crashed active generation.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// State shared by the controller's tasks.
pub struct Shared {
    pub config: RunConfig,
    /// The state file a restarted controller adopts from.
    state_path: std::path::PathBuf,
    /// What this controller found from a previous one, for `status`.
    recovered: Option<String>,
    pub metrics: crate::metrics::Metrics,
    started: Instant,
    inner: Mutex<Inner>,
    /// Ticks whenever a generation changes state.
    changed: watch::Sender<u64>,
    /// A reload was requested.
    reload_wanted: Notify,
    /// Set once a stop began.
    stopping: watch::Sender<bool>,
}

/// Everything the controller knows; see [`Shared::lock`].
pub struct Inner {
    pub steering: Steering,
    pub generations: Generations,
    /// Requesters waiting for the next reload's result.
    waiters: Vec<oneshot::Sender<Response>>,
    /// A reload is requested and has not started yet.
    pending: bool,
    pub last_reload: Option<ReloadReport>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub restarts: u64,
    pub drain_kills: u64,
    restart_backoff: Duration,
    /// Registered sockets per generation: (listener index, socket).
    pub sockets: HashMap<u64, Vec<(usize, Listener)>>,
    /// Counters of ended generations (their slot may be reused).
    final_counters: HashMap<u64, CounterStatus>,
    pub stderr: HashMap<u64, StderrTail>,
}

impl Shared {
    /// Locks the state. Never hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("controller state lock poisoned")
    }

    /// A receiver that sees every later generation state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells waiters that generations changed, and records the change in
    /// the state file for a successor controller.
    pub fn notify_changed(&self) {
        self.persist();
        self.changed.send_modify(|n| *n += 1);
    }

    /// Writes the state file (see [`crate::state`]).
    pub fn persist(&self) {
        let saved = {
            let inner = self.lock();
            let generations = inner
                .generations
                .live()
                .filter_map(|g| {
                    let pid = g.pid?;
                    Some(crate::state::SavedGeneration {
                        number: g.number,
                        slot: g.slot,
                        pid,
                        start_time: crate::state::start_time(pid)?,
                        state: g.state,
                    })
                })
                .collect();
            crate::state::Saved::new(
                self.config.listen.clone(),
                inner.generations.next_number(),
                generations,
            )
        };
        if let Err(error) = crate::state::save(&self.state_path, &saved) {
            warn!(%error, path = %self.state_path.display(), "cannot write the state file");
        }
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Counters of generation `number` summed over listeners: live from the
    /// map, or as recorded when it ended.
    pub fn counters(&self, inner: &Inner, number: u64) -> CounterStatus {
        if let Some(done) = inner.final_counters.get(&number) {
            return *done;
        }
        let Some(generation) = inner.generations.get(number) else {
            return CounterStatus::default();
        };
        let mut sum = CounterStatus::default();
        for listener in 0..self.config.listen.len() as u32 {
            if let Ok(c) = inner.steering.counters(listener, generation.slot) {
                sum += c.into();
            }
        }
        sum
    }

    /// Records that generation `number`'s process ended (the reaper saw it,
    /// or it was killed), freezing its counters and emptying its slot.
    pub fn generation_ended(&self, inner: &mut Inner, number: u64, next: State, outcome: String) {
        let counters = self.counters(inner, number);
        let now = Instant::now();
        if let Err(error) = inner
            .generations
            .transition(number, next, now, Some(outcome))
        {
            warn!(%error, "generation state");
            return;
        }
        inner.final_counters.insert(number, counters);
        inner
            .final_counters
            .retain(|n, _| inner.generations.get(*n).is_some());
        inner
            .stderr
            .retain(|n, _| *n == number || inner.generations.get(*n).is_some());
        inner
            .sockets
            .retain(|n, _| inner.generations.get(*n).is_some());
        let slot = inner.generations.get(number).map(|g| g.slot);
        if let Some(slot) = slot {
            for listener in 0..self.config.listen.len() as u32 {
                if let Err(error) = inner.steering.clear_slot(listener, slot) {
                    warn!(%error, "clearing slot");
                }
            }
        }
    }
}

/// Runs instance `config` until it is stopped. Returns whether the stop was
/// clean (every generation exited within its drain timeout).
pub async fn run(config: RunConfig) -> anyhow::Result<bool> {
    supervisor::become_subreaper().context("failed to become a child subreaper")?;
    let _lock = lock_instance(&config.control_socket, &config.name)?;
    let state_path = crate::state::state_path(&config.control_socket);
    let pin_dir = crate::state::pin_dir(&config.name, &config.control_socket);
    let saved = crate::state::load(&state_path).map_err(|e| {
        anyhow::anyhow!(
            "{e}: remove it if no generation of instance {:?} runs",
            config.name
        )
    })?;
    let recovery = crate::state::recovery(saved.as_ref(), |pid, start| {
        crate::state::start_time(pid) == Some(start)
    });
    let recovered = match &recovery {
        crate::state::Recovery::Fresh => {
            // Pins without a state file: nothing to adopt.
            Steering::unpin(&pin_dir);
            None
        }
        crate::state::Recovery::Stale { gone } => {
            for g in gone {
                // A generation whose leader runs but that cannot be adopted
                // (no active generation to keep serving): not ours to keep.
                if crate::state::start_time(g.pid) == Some(g.start_time) {
                    supervisor::signal_group(g.pid, Signal::SIGKILL);
                }
            }
            Steering::unpin(&pin_dir);
            let _ = std::fs::remove_file(&state_path);
            let text = format!(
                "a previous controller (pid {}) left state behind, but none of its generations \
                 ({}) serves any more: cleaned up, starting fresh",
                saved.as_ref().map_or(0, |s| s.controller_pid),
                list(gone, |g| g.number.to_string())
            );
            warn!("{text}");
            Some(text)
        }
        crate::state::Recovery::Adopt { live, gone } => {
            let saved = saved.as_ref().expect("adoption has a state file");
            if saved.listen != config.listen {
                bail!(
                    "instance {:?} has running generations (pids {}) serving {:?}: restart it with \
                     the same --listen addresses, or stop them first",
                    config.name,
                    list(live, |g| g.pid.to_string()),
                    saved.listen
                );
            }
            let text = format!(
                "adopted generations {} from a previous controller (pid {}){}",
                list(live, |g| format!(
                    "{} ({}, pid {})",
                    g.number, g.state, g.pid
                )),
                saved.controller_pid,
                if gone.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; generations {} had exited meanwhile",
                        list(gone, |g| g.number.to_string())
                    )
                }
            );
            info!("{text}");
            Some(text)
        }
    };
    let adopting = matches!(recovery, crate::state::Recovery::Adopt { .. });
    if !adopting {
        check_addresses_free(&config.listen)?;
    }
    let control = bind_control_socket(&config.control_socket, &config.name).await?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };

    let options = Options {
        force_select_only: config.force_select_only,
        ebpf_debug_logs: tracing::enabled!(target: "reloader::ebpf", tracing::Level::DEBUG),
        pin_dir: Some(pin_dir.clone()),
    };
    let mut steering = match Steering::load(&options) {
        Err(
            error @ (crate::steering::SteeringError::BpffsUnavailable { .. }
            | crate::steering::SteeringError::PinDirError { .. }),
        ) if !adopting => {
            warn!(%error, "running without pinned maps: a restarted controller cannot adopt");
            Steering::load(&Options {
                pin_dir: None,
                ..options
            })?
        }
        other => other?,
    };
    if adopting && !steering.reused_maps() {
        bail!(
            "generations of instance {:?} still run, but the steering maps pinned in {} are gone: \
             stop those generations, then start again",
            config.name,
            pin_dir.display()
        );
    }
    for (i, addr) in config.listen.iter().enumerate() {
        if adopting {
            steering.adopt_listener(i as u32, *addr)?;
        } else {
            steering.add_listener(i as u32, *addr)?;
        }
    }
    let generations = match &recovery {
        crate::state::Recovery::Adopt { live, .. } => Generations::restore(
            MAX_SLOTS,
            HISTORY,
            saved.as_ref().map_or(1, |s| s.next_generation),
            live.iter().map(|g| (g.number, g.slot, g.pid, g.state)),
            Instant::now(),
        ),
        // Numbering continues after a previous controller's generations.
        _ => Generations::restore(
            MAX_SLOTS,
            HISTORY,
            saved.as_ref().map_or(1, |s| s.next_generation),
            [],
            Instant::now(),
        ),
    };
    if let Some(pump) = steering.log_pump() {
        tokio::spawn(pump_logs(pump));
    }
    let (changed, _) = watch::channel(0);
    let (stopping, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        inner: Mutex::new(Inner {
            steering,
            generations,
            waiters: Vec::new(),
            pending: false,
            last_reload: None,
            reloads_succeeded: 0,
            reloads_failed: 0,
            restarts: 0,
            drain_kills: 0,
            restart_backoff: RESTART_BACKOFF_MIN,
            sockets: HashMap::new(),
            final_counters: HashMap::new(),
            stderr: HashMap::new(),
        }),
        changed,
        reload_wanted: Notify::new(),
        stopping,
        config,
        metrics: crate::metrics::Metrics::default(),
        state_path,
        recovered,
    });

    // Signals first, so a child that exits at once is reaped.
    let mut sigchld = signal(SignalKind::child())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    tokio::spawn(serve_control(shared.clone(), control));
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(shared.clone(), listener));
    }
    info!(
        name = %shared.config.name,
        socket = %shared.config.control_socket.display(),
        listen = ?shared.config.listen,
        "controller started"
    );

    if adopting {
        adopt(&shared);
        crate::notify::ready("adopted running generations");
    } else {
        start_first(&shared, &mut sigchld, &mut sigterm, &mut sigint).await?;
    }

    tokio::spawn(reload_worker(shared.clone()));
    let mut stop_requested = shared.stopping.subscribe();
    loop {
        tokio::select! {
            _ = sigchld.recv() => handle_exits(&shared),
            _ = sighup.recv() => request_reload(&shared, None),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = stop_requested.wait_for(|s| *s) => break,
        }
    }
    info!("stopping: draining every generation");
    let clean = stop_all(&shared, &mut sigchld).await;
    forget_instance(&shared, &pin_dir);
    remove_socket(&shared.config.control_socket);
    info!(clean, "stopped");
    Ok(clean)
}

/// After a stop, nothing of the instance remains: no state file, no pins.
fn forget_instance(shared: &Shared, pin_dir: &Path) {
    let _ = std::fs::remove_file(&shared.state_path);
    Steering::unpin(pin_dir);
}

/// Takes over the generations a previous controller left running: they
/// are not our children, so their exits are watched through pidfds; a
/// candidate that was starting is killed (that reload is lost); draining
/// ones are drained again.
fn adopt(shared: &Arc<Shared>) {
    let live: Vec<(u64, u32, State)> = shared
        .lock()
        .generations
        .live()
        .filter_map(|g| g.pid.map(|p| (g.number, p, g.state)))
        .collect();
    for (number, pid, state) in live {
        match state {
            State::Starting | State::Ready => {
                supervisor::signal_group(pid, Signal::SIGKILL);
                let mut inner = shared.lock();
                shared.generation_ended(
                    &mut inner,
                    number,
                    State::Failed,
                    "killed: it was starting when the previous controller died".into(),
                );
                continue;
            }
            State::Active => {
                if let Ok(found) = discovery::find(pid, &shared.config.listen) {
                    let sockets = found
                        .per_address
                        .iter()
                        .enumerate()
                        .flat_map(|(i, v)| v.iter().map(move |(l, _)| (i, l.clone())))
                        .collect();
                    shared.lock().sockets.insert(number, sockets);
                }
            }
            State::Draining => {
                let shared = shared.clone();
                tokio::spawn(async move { reload::drain(&shared, number).await });
            }
            State::Exited | State::Failed => continue,
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let how = supervisor::wait_exit(pid).await;
            exited(&shared, vec![(pid, how)]);
        });
    }
    shared.notify_changed();
}

/// Starts the first generation; if it cannot start there is nothing to
/// serve, and the controller exits.
async fn start_first(
    shared: &Arc<Shared>,
    sigchld: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let shared = shared.clone();
    let first = reload::reload(&shared);
    tokio::pin!(first);
    let first_result = loop {
        tokio::select! {
            result = &mut first => break result,
            _ = sigchld.recv() => handle_exits(&shared),
            _ = sigterm.recv() => { shared.stopping.send_replace(true); }
            _ = sigint.recv() => { shared.stopping.send_replace(true); }
        }
    };
    match first_result {
        // Nothing to drain for the first generation.
        Ok(cut_over) => {
            let report = cut_over.finish(&shared).await;
            crate::notify::ready(&format!("generation {} active", report.generation));
        }
        Err(report) => {
            error!("{}", report.human());
            stop_all(&shared, sigchld).await;
            let _ = std::fs::remove_file(&shared.state_path);
            remove_socket(&shared.config.control_socket);
            bail!(
                "the first generation did not start: {}",
                report.error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Asks for a reload; `waiter` gets the result of the reload that starts
/// after this call.
pub fn request_reload(shared: &Shared, waiter: Option<oneshot::Sender<Response>>) {
    let mut inner = shared.lock();
    inner.pending = true;
    if let Some(w) = waiter {
        inner.waiters.push(w);
    }
    drop(inner);
    shared.reload_wanted.notify_one();
}

/// Runs requested reloads one after another; requests that arrive during a
/// reload are served by one follow-up reload.
async fn reload_worker(shared: Arc<Shared>) {
    let mut stopping = shared.stopping.subscribe();
    loop {
        let waiters = {
            let mut inner = shared.lock();
            if inner.pending {
                inner.pending = false;
                Some(std::mem::take(&mut inner.waiters))
            } else {
                None
            }
        };
        let Some(waiters) = waiters else {
            tokio::select! {
                _ = shared.reload_wanted.notified() => continue,
                _ = stopping.wait_for(|s| *s) => return,
            }
        };
        if shared.is_stopping() {
            for w in waiters {
                let _ = w.send(Response::Error {
                    message: "the instance is stopping".into(),
                });
            }
            return;
        }
        crate::notify::reloading();
        match reload::reload(&shared).await {
            Ok(cut_over) => {
                // The drain runs on its own; the next reload may start now.
                let shared = shared.clone();
                tokio::spawn(async move {
                    let report = cut_over.finish(&shared).await;
                    crate::notify::ready(&format!("generation {} active", report.generation));
                    answer(waiters, &Response::ReloadDone { report });
                });
            }
            Err(report) => {
                let active = shared.lock().generations.active().map(|g| g.number);
                crate::notify::ready(&format!(
                    "reload to generation {} failed; generation {} active",
                    report.generation,
                    active.map_or("none".into(), |g| g.to_string())
                ));
                answer(waiters, &Response::ReloadFailed { report });
            }
        }
    }
}

fn answer(waiters: Vec<oneshot::Sender<Response>>, response: &Response) {
    for w in waiters {
        let _ = w.send(response.clone());
    }
}

/// Handles SIGCHLD: reaps, and updates the generations whose leader exited.
fn handle_exits(shared: &Arc<Shared>) {
    let reaped = supervisor::reap();
    if !reaped.is_empty() {
        exited(shared, reaped);
    }
}

/// Updates the generations whose leader ended (`(pid, how)`): reaped
/// children, or adopted processes whose pidfd reported their exit.
fn exited(shared: &Arc<Shared>, ended: Vec<(u32, String)>) {
    let reaped = ended;
    let mut restart = false;
    {
        let mut inner = shared.lock();
        for (pid, how) in reaped {
            let Some(generation) = inner.generations.by_pid(pid).cloned() else {
                // A worker of a generation, or a process reparented to us.
                continue;
            };
            let number = generation.number;
            match generation.state {
                State::Starting | State::Ready => {
                    warn!(generation = number, pid, "{how} before it was ready");
                    shared.generation_ended(
                        &mut inner,
                        number,
                        State::Failed,
                        format!("{how} before it was ready"),
                    );
                }
                State::Draining => {
                    info!(generation = number, pid, "drained: {how}");
                    shared.generation_ended(&mut inner, number, State::Exited, how);
                }
                State::Active => {
                    error!(
                        generation = number,
                        pid, "active generation {how}; restarting"
                    );
                    // Its sockets are gone with it; leave selection to the
                    // kernel until a new generation is active.
                    for listener in 0..shared.config.listen.len() as u32 {
                        let _ = inner.steering.set_active(listener, None);
                    }
                    shared.generation_ended(&mut inner, number, State::Exited, how);
                    inner.restarts += 1;
                    restart = !shared.is_stopping();
                }
                State::Exited | State::Failed => {}
            }
            // Whatever remains of its process group goes too.
            supervisor::signal_group(pid, Signal::SIGKILL);
        }
    }
    shared.notify_changed();
    if restart {
        let backoff = {
            let mut inner = shared.lock();
            let backoff = inner.restart_backoff;
            inner.restart_backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            backoff
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            request_reload(&shared, None);
        });
    }
}

/// Resets the crash backoff once a generation has been active a while.
pub fn generation_healthy(shared: &Shared) {
    shared.lock().restart_backoff = RESTART_BACKOFF_MIN;
}

/// Drains every live generation (drain signal, then SIGKILL at the drain
/// timeout), kills what is left of our children, and reports whether every
/// generation exited on its own.
async fn stop_all(shared: &Arc<Shared>, sigchld: &mut tokio::signal::unix::Signal) -> bool {
    shared.stopping.send_replace(true);
    crate::notify::stopping();
    let live: Vec<(u64, u32, State)> = shared
        .lock()
        .generations
        .live()
        .filter_map(|g| g.pid.map(|p| (g.number, p, g.state)))
        .collect();
    {
        // The active generation drains now too: its exit is not a crash.
        let mut inner = shared.lock();
        for &(number, _, state) in &live {
            if state == State::Active {
                let _ = inner
                    .generations
                    .transition(number, State::Draining, Instant::now(), None);
            }
        }
    }
    for &(number, pid, state) in &live {
        match state {
            State::Active | State::Draining => {
                info!(generation = number, pid, "sending drain signal");
                supervisor::signal(pid, shared.config.drain_signal);
            }
            _ => supervisor::signal_group(pid, Signal::SIGKILL),
        }
    }
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    let mut clean = true;
    loop {
        handle_exits(shared);
        let remaining: Vec<u32> = shared
            .lock()
            .generations
            .live()
            .filter_map(|g| g.pid)
            .collect();
        if remaining.is_empty() {
            break;
        }
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = tokio::time::sleep_until(deadline) => {
                warn!(pids = ?remaining, "drain timeout: killing");
                for pid in &remaining {
                    supervisor::signal_group(*pid, Signal::SIGKILL);
                }
                clean = false;
                // Reaped on the next SIGCHLD.
                tokio::time::sleep(Duration::from_millis(50)).await;
                handle_exits(shared);
                let mut inner = shared.lock();
                let still: Vec<u64> = inner.generations.live().map(|g| g.number).collect();
                for number in still {
                    shared.generation_ended(&mut inner, number, State::Exited, "killed at stop".into());
                }
                break;
            }
        }
    }
    // Anything reparented to us (daemonized helpers) goes too.
    for pid in supervisor::children() {
        supervisor::signal(pid, Signal::SIGKILL);
    }
    let give_up = Instant::now() + Duration::from_secs(2);
    while !supervisor::children().is_empty() && Instant::now() < give_up {
        supervisor::reap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    supervisor::reap();
    clean
}

/// Takes the instance's lock (`NAME.lock` beside its control socket) for
/// the controller's lifetime, so two controllers never run one instance.
fn lock_instance(socket: &Path, name: &str) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open the instance lock {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            write!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "instance {name:?} is already running (controller pid {}): stop it with \
                 `reloader stop --name {name}`, or choose another --name",
                pid.trim()
            )
        }
        Err((_, errno)) => Err(errno).with_context(|| format!("failed to lock {}", path.display())),
    }
}

/// Refuses addresses that some socket already listens on: another reloader
/// instance, or a server started outside reloader. Sharing a reuseport
/// group with them would either fail or steer their connections.
fn check_addresses_free(listen: &[std::net::SocketAddr]) -> anyhow::Result<()> {
    let existing = discovery::listeners()?;
    for addr in listen {
        let overlapping = existing.iter().any(|l| {
            l.addr.port() == addr.port()
                && l.addr.is_ipv4() == addr.is_ipv4()
                && (l.addr.ip() == addr.ip()
                    || l.addr.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if !overlapping {
            continue;
        }
        let holders: Vec<String> = discovery::holders_of(*addr)?
            .into_iter()
            .map(|(l, holder)| match holder {
                Some(h) => format!(
                    "pid {} ({}) on {}",
                    h.pid,
                    discovery::process_name(h.pid).unwrap_or_else(|| "?".into()),
                    l.addr
                ),
                None => format!("a socket on {} (inode {})", l.addr, l.inode),
            })
            .collect();
        bail!(
            "{addr} is already served by {}: another reloader instance or a server started \
             outside reloader holds it; stop it first (reloader must own the addresses it \
             steers)",
            holders.join(", ")
        );
    }
    Ok(())
}

/// Binds the control socket: refuses when another controller answers on
/// it, replaces a stale file otherwise. Mode 0600.
async fn bind_control_socket(path: &Path, name: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "instance {name:?} is already running (its control socket {} answers): stop it \
                 with `reloader stop --name {name}`, or choose another --name",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("failed to bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to chmod {}", path.display()))?;
    Ok(listener)
}

fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Serves control connections, at most [`MAX_CLIENTS`] at once; never
/// waits for a place.
async fn serve_control(shared: Arc<Shared>, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let owner = nix::unistd::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = Response::Error {
                    message: format!("busy: {MAX_CLIENTS} control connections are open; try again"),
                };
                let mut stream = stream;
                let _ = stream.write_all(&control::encode(&busy)).await;
            });
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_client(&shared, stream, owner).await {
                warn!(%error, "control connection");
            }
            drop(permit);
        });
    }
}

async fn serve_client(shared: &Arc<Shared>, stream: UnixStream, owner: u32) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if !control::peer_allowed(peer.uid(), owner) {
        warn!(uid = peer.uid(), "control connection refused: wrong uid");
        let message = format!(
            "permission denied: uid {} may not control this instance (owned by uid {owner})",
            peer.uid()
        );
        write
            .write_all(&control::encode(&Response::Error { message }))
            .await?;
        return Ok(());
    }
    let response = match read_request(read).await {
        Ok(request) => handle_request(shared, request).await,
        Err(message) => Response::Error { message },
    };
    write.write_all(&control::encode(&response)).await?;
    write.shutdown().await
}

/// Reads one request line within [`MAX_REQUEST`] bytes and 5 seconds.
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut line = Vec::new();
    let limited = tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64);
    let mut reader = BufReader::new(limited);
    let n = tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| "timed out waiting for a request line".to_string())?
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        let error = if n >= MAX_REQUEST {
            control::DecodeError::TooLarge
        } else {
            control::DecodeError::Truncated
        };
        return Err(error.to_string());
    }
    line.pop();
    control::decode_request(&line).map_err(|e| e.to_string())
}

async fn handle_request(shared: &Arc<Shared>, request: Request) -> Response {
    match request {
        Request::Status {} => Response::Status {
            status: Box::new(status(shared)),
        },
        Request::Stop {} => {
            shared.stopping.send_replace(true);
            Response::Stopping
        }
        Request::Reload { .. } if shared.is_stopping() => Response::Error {
            message: "the instance is stopping".into(),
        },
        Request::Reload { wait: false } => {
            request_reload(shared, None);
            Response::ReloadAccepted
        }
        Request::Reload { wait: true } => {
            let (tx, rx) = oneshot::channel();
            request_reload(shared, Some(tx));
            rx.await.unwrap_or(Response::Error {
                message: "the instance stopped before the reload completed".into(),
            })
        }
    }
}

/// A snapshot of the instance for `status`.
pub fn status(shared: &Shared) -> StatusReport {
    let queues: HashMap<u64, u32> = discovery::listeners()
        .map(|all| all.into_iter().map(|l| (l.inode, l.accept_queue)).collect())
        .unwrap_or_default();
    let inner = shared.lock();
    let now = Instant::now();
    let active = inner.generations.active().map(|g| (g.number, g.slot));
    let listeners = shared
        .config
        .listen
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let slot = inner.steering.active(i as u32).ok().flatten();
            ListenerStatus {
                addr: addr.to_string(),
                active_generation: active.filter(|(_, s)| Some(*s) == slot).map(|(n, _)| n),
            }
        })
        .collect();
    let generations = inner
        .generations
        .all()
        .iter()
        .rev()
        .map(|g| {
            let sockets = inner
                .sockets
                .get(&g.number)
                .map(|v| {
                    v.iter()
                        .map(|(_, l)| SocketStatus {
                            addr: l.addr.to_string(),
                            inode: l.inode,
                            cookie: l.cookie,
                            accept_queue: queues.get(&l.inode).copied(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let spawned = g.timeline.spawned.unwrap_or(now);
            let end = g.timeline.ended.unwrap_or(now);
            GenerationStatus {
                generation: g.number,
                pid: g.pid,
                state: g.state.to_string(),
                age_ms: end.saturating_duration_since(spawned).as_millis() as u64,
                slot: g.slot,
                outcome: g.outcome.clone(),
                sockets,
                counters: shared.counters(&inner, g.number),
            }
        })
        .collect();
    StatusReport {
        name: shared.config.name.clone(),
        pid: std::process::id(),
        steering: inner.steering.mode().to_string(),
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        listeners,
        generations,
        last_reload: inner.last_reload.clone(),
        reloads_succeeded: inner.reloads_succeeded,
        reloads_failed: inner.reloads_failed,
        restarts: inner.restarts,
        drain_kills: inner.drain_kills,
        unmanaged_fallback: inner
            .steering
            .unmanaged_counters()
            .map(|c| c.fallback)
            .unwrap_or_default(),
        map_entries: inner.steering.entry_counts().unwrap_or_default(),
        recovered: shared.recovered.clone(),
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

/// `items` as a comma-separated list, each written by `f` (for messages).
fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}
