//! One reload, step by step (README "How it works"):
//!
//! 1. Take a free slot (wait while `--max-draining` generations drain).
//! 2. Spawn generation N+1 in it.
//! 3. Wait until its process tree holds a listening socket for every
//!    managed address, the same set in two scans in a row (nginx opens one
//!    socket per worker, one after another), then copy them with
//!    `pidfd_getfd`, check `SO_REUSEPORT`, register them in its slot.
//! 4. Run the readiness probe through the steering program's probe table,
//!    so it reaches N+1's own listener, not the active one.
//! 5. Cut over: one map update per listener.
//! 6. Let N settle (it gets nothing new and reads what it accepted), then
//!    send the drain signal; kill its process group at the drain timeout.
//! 7. Done when N has exited: the `reload --wait` barrier.
//!
//! Any failure before step 5 kills N+1 and leaves N active: nothing was
//! routed to N+1, so nothing is lost.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};
use tracing::{info, warn};

use crate::{
    config::{Probe, substitute_generation},
    controller::{Shared, generation_healthy},
    discovery::{self, Found},
    generation::{State, human_duration},
    status::ReloadReport,
    steering::SteeringError,
    supervisor,
};

/// How often discovery scans while a candidate starts.
const SCAN_INTERVAL: Duration = Duration::from_millis(20);
/// How often a failing probe is retried.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one probe attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a generation must stay active before its crash resets the
/// restart backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// A reload that has cut over; what is left is draining the old generation.
pub struct CutOver {
    report: ReloadReport,
    t0: Instant,
    cutover: Instant,
}

impl CutOver {
    /// Drains the previous generation (if any) and completes the report:
    /// the `reload --wait` barrier.
    pub async fn finish(mut self, shared: &Arc<Shared>) -> ReloadReport {
        if let Some(old) = self.report.previous {
            drain(shared, old).await;
            self.report.cutover_to_old_exited_ms = Some(ms(self.cutover.elapsed()));
        }
        self.report.total_ms = Some(ms(self.t0.elapsed()));
        self.report.result = "succeeded".into();
        info!(
            generation = self.report.generation,
            total = %human_duration(self.t0.elapsed()),
            "reload complete"
        );
        record(shared, &self.report, true);
        self.report
    }
}

/// Runs one reload up to the cutover (steps 1–5). `Err` carries the failure
/// report; the previous generation is still active then. The drain (steps
/// 6–7) is [`CutOver::finish`], which callers run concurrently so the next
/// reload need not wait for it (`--max-draining` bounds how many drain).
pub async fn reload(shared: &Arc<Shared>) -> Result<CutOver, ReloadReport> {
    let t0 = Instant::now();
    let (number, slot, previous) = take_slot(shared).await.map_err(|error| ReloadReport {
        result: "failed".into(),
        error: Some(error),
        ..ReloadReport::default()
    })?;
    let mut report = ReloadReport {
        generation: number,
        previous,
        result: "failed".into(),
        ..ReloadReport::default()
    };
    info!(generation = number, slot, "starting generation");

    let ready = match start(shared, number, slot, t0).await {
        Ok(ready) => ready,
        Err(error) => {
            fail(shared, number, &error);
            report.stderr_tail = stderr_tail(shared, number).await;
            report.error = Some(explain_failure(error, &report.stderr_tail));
            record(shared, &report, false);
            return Err(report);
        }
    };
    report.spawn_to_ready_ms = Some(ms(ready - t0));

    // Cutover: one map update per listener.
    let cutover = match cut_over(shared, number, slot, previous, ready) {
        Ok(cutover) => cutover,
        Err(error) => {
            fail(shared, number, &error);
            report.stderr_tail = stderr_tail(shared, number).await;
            report.error = Some(error);
            record(shared, &report, false);
            return Err(report);
        }
    };
    shared.notify_changed();
    report.ready_to_cutover_ms = Some(ms(cutover - ready));
    info!(generation = number, "active");
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HEALTHY_AFTER).await;
            if shared.lock().generations.active().map(|g| g.number) == Some(number) {
                generation_healthy(&shared);
            }
        });
    }
    Ok(CutOver {
        report,
        t0,
        cutover,
    })
}

/// Makes `number` active on every listener (one map update each) and
/// marks `previous` draining. Returns when the maps were updated.
fn cut_over(
    shared: &Shared,
    number: u64,
    slot: u32,
    previous: Option<u64>,
    ready: Instant,
) -> Result<Instant, String> {
    let mut inner = shared.lock();
    inner
        .generations
        .transition(number, State::Ready, ready, None)
        .map_err(|e| format!("generation {number} ended while starting: {e}"))?;
    let cutover = Instant::now();
    for listener in 0..shared.config.listen.len() as u32 {
        // Cannot fail for registered listeners; if it does, the old
        // generation keeps the listeners not yet switched.
        inner
            .steering
            .set_active(listener, Some(slot))
            .map_err(|e| format!("cutover failed: {e}"))?;
    }
    let now = Instant::now();
    inner
        .generations
        .transition(number, State::Active, now, None)
        .map_err(|e| e.to_string())?;
    if let Some(old) = previous {
        let _ = inner
            .generations
            .transition(old, State::Draining, now, None);
    }
    Ok(cutover)
}

/// Waits for a free slot within the draining limit and begins the next
/// generation in it. Returns (number, slot, previous active generation).
async fn take_slot(shared: &Arc<Shared>) -> Result<(u64, u32, Option<u64>), String> {
    let mut changed = shared.subscribe();
    let mut said = false;
    loop {
        {
            let mut inner = shared.lock();
            let draining = inner.generations.draining().count() as u32;
            if draining < shared.config.max_draining && inner.generations.free_slot().is_some() {
                let previous = inner.generations.active().map(|g| g.number);
                let generation = inner
                    .generations
                    .begin(Instant::now())
                    .map_err(|e| e.to_string())?;
                return Ok((generation.number, generation.slot, previous));
            }
            if !said {
                info!(
                    draining,
                    max_draining = shared.config.max_draining,
                    "reload waits until a draining generation exits (--max-draining)"
                );
                said = true;
            }
        }
        if shared.is_stopping() {
            return Err("the instance is stopping".into());
        }
        let _ = changed.changed().await;
    }
}

/// Spawns the generation and waits until it is ready; returns when.
async fn start(
    shared: &Arc<Shared>,
    number: u64,
    slot: u32,
    t0: Instant,
) -> Result<Instant, String> {
    let config = &shared.config;
    let command = substitute_generation(&config.command, number);
    // Socket activation: this generation's listeners, opened here. Our
    // copies close right after the spawn; discovery then finds them in the
    // server like any others.
    let passed = if config.pass_fds {
        config
            .listen
            .iter()
            .map(|addr| {
                crate::demo::server::listen(*addr, true).map_err(|e| {
                    format!(
                        "--pass-fds: cannot listen on {addr}: {e} (is it held by a socket without \
                         SO_REUSEPORT?)"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let notify = if config.ready_notify {
        Some(NotifySocket::bind(
            config
                .control_socket
                .with_extension(format!("gen{number}.notify")),
        )?)
    } else {
        None
    };
    let extras = supervisor::SpawnExtras {
        listen_fds: passed
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_fd(), format!("listen{i}")))
            .collect(),
        notify_socket: notify.as_ref().map(|n| n.path.as_path()),
    };
    let spawned = supervisor::spawn(&command, number, &config.name, &extras);
    drop(extras);
    drop(passed);
    let (pid, tail) = spawned.map_err(|e| e.to_string())?;
    {
        let mut inner = shared.lock();
        inner
            .generations
            .set_pid(number, pid)
            .map_err(|e| e.to_string())?;
        inner.stderr.insert(number, tail);
    }
    // A controller killed from here on must know this candidate's pid.
    shared.persist();
    let deadline = t0 + config.ready_timeout;
    let mut changed = shared.subscribe();

    let found = wait_for_listeners(shared, number, pid, deadline, &mut changed).await?;
    register(shared, number, slot, &found)?;
    if let Some(notify) = &notify {
        notify
            .wait_ready(shared, number, deadline, &mut changed)
            .await?;
    }
    if let Some(probe) = &config.ready_probe {
        wait_for_probe(shared, number, slot, probe, deadline, &mut changed).await?;
    }
    Ok(Instant::now())
}

/// A generation's own `NOTIFY_SOCKET` (`--ready notify`); removed on drop.
struct NotifySocket {
    path: std::path::PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    fn bind(path: std::path::PathBuf) -> Result<Self, String> {
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path)
            .map_err(|e| format!("cannot create notify socket {}: {e}", path.display()))?;
        Ok(Self { path, socket })
    }

    /// Waits for a datagram with a `READY=1` line.
    async fn wait_ready(
        &self,
        shared: &Shared,
        number: u64,
        deadline: Instant,
        changed: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; 4096];
        loop {
            check_alive(shared, number)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "not ready within {}: it never sent READY=1 to its NOTIFY_SOCKET (--ready notify)",
                    human_duration(shared.config.ready_timeout)
                ));
            }
            tokio::select! {
                received = self.socket.recv(&mut buf) => {
                    let n = received.map_err(|e| format!("notify socket: {e}"))?;
                    if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                        return Ok(());
                    }
                }
                _ = changed.changed() => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Scans until every address has sockets and two scans agree.
async fn wait_for_listeners(
    shared: &Arc<Shared>,
    number: u64,
    pid: u32,
    deadline: Instant,
    changed: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<Found, String> {
    let listen = &shared.config.listen;
    let mut previous: Option<std::collections::HashSet<u64>> = None;
    loop {
        check_alive(shared, number)?;
        let found = discovery::find(pid, listen).map_err(|e| e.to_string())?;
        if found.complete() {
            let inodes = found.inodes();
            if previous.as_ref() == Some(&inodes) {
                return Ok(found);
            }
            previous = Some(inodes);
        } else {
            previous = None;
            if Instant::now() >= deadline {
                let missing: Vec<String> = listen
                    .iter()
                    .zip(&found.per_address)
                    .filter(|(_, s)| s.is_empty())
                    .map(|(a, _)| a.to_string())
                    .collect();
                return Err(format!(
                    "not ready within {}: no listening socket for {} in its process tree",
                    human_duration(shared.config.ready_timeout),
                    missing.join(", ")
                ));
            }
        }
        let _ = tokio::time::timeout(SCAN_INTERVAL, changed.changed()).await;
    }
}

/// Copies the found sockets, checks them, registers them in `slot` and
/// attaches the program to each group. The copies are closed on return:
/// the map does not need them, and keeping them would keep a listener (and
/// its queue) alive after its generation exits.
fn register(shared: &Arc<Shared>, number: u64, slot: u32, found: &Found) -> Result<(), String> {
    let mut copies: Vec<Vec<OwnedFd>> = Vec::new();
    for sockets in &found.per_address {
        let mut fds = Vec::new();
        for (_, holder) in sockets {
            fds.push(discovery::copy_fd(holder.pid, holder.fd).map_err(|e| e.to_string())?);
        }
        copies.push(fds);
    }
    let mut inner = shared.lock();
    let mut registered = Vec::new();
    for (i, fds) in copies.iter().enumerate() {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let result = inner
            .steering
            .attach(borrowed[0])
            .and_then(|()| inner.steering.set_slot_sockets(i as u32, slot, &borrowed));
        if let Err(error) = result {
            return Err(explain_registration(error, &found.per_address[i]));
        }
        registered.extend(found.per_address[i].iter().map(|(l, _)| (i, l.clone())));
    }
    inner.sockets.insert(number, registered);
    Ok(())
}

fn explain_registration(
    error: SteeringError,
    sockets: &[(discovery::Listener, discovery::Holder)],
) -> String {
    let holder = sockets.first().map(|(_, h)| {
        let name = discovery::process_name(h.pid).unwrap_or_else(|| "?".into());
        format!(" (held by pid {} {name})", h.pid)
    });
    format!("{error}{}", holder.unwrap_or_default())
}

async fn wait_for_probe(
    shared: &Arc<Shared>,
    number: u64,
    slot: u32,
    probe: &Probe,
    deadline: Instant,
    changed: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(), String> {
    let mut last_error;
    loop {
        check_alive(shared, number)?;
        match probe_once(shared, slot, probe).await {
            Ok(()) => return Ok(()),
            Err(error) => last_error = error,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "readiness probe did not pass within {}: {last_error}",
                human_duration(shared.config.ready_timeout)
            ));
        }
        let _ = tokio::time::timeout(PROBE_INTERVAL, changed.changed()).await;
    }
}

/// One probe through the candidate's own listener: the probe socket's
/// source port is registered so the program routes its SYN to `slot`.
async fn probe_once(shared: &Arc<Shared>, slot: u32, probe: &Probe) -> Result<(), String> {
    let addr = probe.addr();
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("probe socket: {e}"))?;
    let any: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    socket.bind(any).map_err(|e| format!("probe bind: {e}"))?;
    let port = socket.local_addr().map_err(|e| e.to_string())?.port();
    let listener = probe.listener() as u32;
    shared
        .lock()
        .steering
        .add_probe(listener, port, slot)
        .map_err(|e| e.to_string())?;
    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        match probe {
            Probe::Tcp { .. } => Ok(()),
            Probe::Http { host, path, .. } => {
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: reloader-probe\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut head = [0u8; 12];
                stream
                    .read_exact(&mut head)
                    .await
                    .map_err(|e| format!("reading the response: {e}"))?;
                let line = String::from_utf8_lossy(&head);
                match line.split_whitespace().nth(1) {
                    Some(code) if code.starts_with('2') => Ok(()),
                    _ => Err(format!("GET {path} answered {:?}", line.trim_end())),
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "no answer within {}",
            human_duration(PROBE_TIMEOUT)
        ))
    });
    let _ = shared.lock().steering.remove_probe(listener, port);
    result
}

/// Fails if the generation already ended (the reaper saw it exit).
fn check_alive(shared: &Shared, number: u64) -> Result<(), String> {
    let inner = shared.lock();
    match inner.generations.get(number) {
        Some(g) if g.state.is_live() => Ok(()),
        Some(g) => Err(g
            .outcome
            .clone()
            .unwrap_or_else(|| format!("generation {number} ended"))),
        None => Err(format!("generation {number} vanished")),
    }
}

/// Kills a candidate that will not become active.
fn fail(shared: &Arc<Shared>, number: u64, error: &str) {
    warn!(generation = number, "{error}");
    let pid = {
        let mut inner = shared.lock();
        let generation = inner.generations.get(number).cloned();
        if let Some(g) = &generation
            && g.state.is_live()
        {
            shared.generation_ended(&mut inner, number, State::Failed, error.to_owned());
        }
        generation.and_then(|g| g.pid)
    };
    if let Some(pid) = pid {
        supervisor::signal_group(pid, Signal::SIGKILL);
    }
    shared.notify_changed();
}

/// Lets `old` settle, signals it to drain, and waits until it exits,
/// killing its process group at the drain timeout.
pub async fn drain(shared: &Arc<Shared>, old: u64) {
    let config = &shared.config;
    let mut changed = shared.subscribe();
    let Some(pid) = shared.lock().generations.get(old).and_then(|g| g.pid) else {
        return;
    };
    tokio::time::sleep(config.settle).await;
    info!(
        generation = old,
        pid,
        signal = config.drain_signal.as_str(),
        "draining"
    );
    supervisor::signal(pid, config.drain_signal);
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    let exited = |shared: &Shared| {
        shared
            .lock()
            .generations
            .get(old)
            .is_none_or(|g| !g.state.is_live())
    };
    loop {
        if exited(shared) {
            return;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    warn!(
        generation = old,
        pid,
        timeout = %human_duration(config.drain_timeout),
        "still running at the drain timeout: killing its process group"
    );
    shared.lock().drain_kills += 1;
    supervisor::signal_group(pid, Signal::SIGKILL);
    while !exited(shared) {
        let _ = changed.changed().await;
    }
}

async fn stderr_tail(shared: &Shared, number: u64) -> Vec<String> {
    let tail = shared.lock().stderr.get(&number).cloned();
    match tail {
        Some(tail) => tail.lines(Duration::from_millis(500)).await,
        None => Vec::new(),
    }
}

/// Adds the likely fix to a failure whose stderr shows a bind conflict.
fn explain_failure(error: String, stderr: &[String]) -> String {
    let bind_conflict = stderr
        .iter()
        .any(|l| l.contains("in use") || l.contains("EADDRINUSE"));
    if bind_conflict {
        format!(
            "{error}; it could not bind an address the old generation holds: a server must set \
             SO_REUSEPORT to listen beside it (nginx: `listen ... reuseport`; Envoy: \
             `enable_reuse_port: true`)"
        )
    } else {
        error
    }
}

fn record(shared: &Shared, report: &ReloadReport, ok: bool) {
    let mut inner = shared.lock();
    inner.last_reload = Some(report.clone());
    // Starting the first generation is not a reload.
    if report.generation == 1 {
        return;
    }
    shared.metrics.reload(report);
    if ok {
        inner.reloads_succeeded += 1;
    } else {
        inner.reloads_failed += 1;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
