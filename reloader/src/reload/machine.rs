//! The reload machine: steps 1–6 as functions, each with the typed
//! [`ReloadError`]; [`run`] chains them, [`CutOver::finish`] drains. The
//! machine is a task of its own: the instance can abort it at any await
//! (a stop during a start), and [`crate::state::InstanceState::begin_stop`]
//! then kills the candidate it leaves behind.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{Host, Scan, drain::drain, probe::wait_for_probe, ready::NotifySocket};
use crate::{
    error::ReloadError,
    generation::human_duration,
    state::{Begun, Handle, NotNow},
    status::{ReloadReport, ReloadResult},
    supervisor::Spawned,
};

/// How often discovery scans while a candidate starts.
const SCAN_INTERVAL: Duration = Duration::from_millis(20);

/// A reload that has cut over; what is left is draining the old generation.
#[derive(Debug)]
pub struct CutOver {
    report: ReloadReport,
    t0: Instant,
    cutover: Instant,
    first_start: bool,
}

impl CutOver {
    /// The generation now active.
    pub fn generation(&self) -> u64 {
        self.report.generation
    }

    /// Drains the previous generation (if any) and completes the report:
    /// the `reload --wait` barrier.
    pub async fn finish(mut self, handle: &Handle) -> ReloadReport {
        if let Some(old) = self.report.previous {
            drain(handle, old).await;
            self.report.cutover_to_old_exited_ms = Some(ms(self.cutover.elapsed()));
        }
        self.report.total_ms = Some(ms(self.t0.elapsed()));
        match handle.read(|s| s.failed_after_cutover(self.report.generation)) {
            None => {
                self.report.result = ReloadResult::Succeeded;
                info!(
                    generation = self.report.generation,
                    total = %human_duration(self.t0.elapsed()),
                    "reload complete"
                );
            }
            Some(reason) => {
                warn!(
                    generation = self.report.generation,
                    "reload failed: {reason}"
                );
                self.report.result = ReloadResult::Failed;
                self.report.error = Some(reason);
            }
        }
        record(handle, &self.report, self.first_start);
        self.report
    }
}

/// Runs one reload up to the cutover. `Err` carries the failure report;
/// the previous generation is still active then. `first_start`: the
/// instance's first generation (reported, not counted as a reload).
pub async fn run<H: Host>(
    handle: &Handle,
    host: &H,
    first_start: bool,
) -> Result<CutOver, ReloadReport> {
    let t0 = Instant::now();
    let config_sha256 = super::preflight::run(handle)
        .await
        .inspect_err(|report| record(handle, report, first_start))?;
    let begun = take_slot(handle).await.map_err(|error| {
        let report = ReloadReport {
            error: Some(crate::error_chain(&error)),
            ..ReloadReport::default()
        };
        record(handle, &report, first_start);
        report
    })?;
    handle.update(|s| s.set_config_sha256(begun.number, config_sha256.clone()));
    let mut report = ReloadReport {
        generation: begun.number,
        previous: begun.previous,
        config_sha256,
        ..ReloadReport::default()
    };
    info!(
        generation = begun.number,
        slot = begun.slot,
        "starting generation"
    );
    let started = match start(handle, host, &begun, t0).await {
        Ok(ready) => {
            report.spawn_to_ready_ms = Some(ms(ready - t0));
            handle
                .update(|s| s.cut_over(begun.number, ready))
                .map(|cutover| (ready, cutover))
        }
        Err(error) => Err(error),
    };
    match started {
        Ok((ready, cutover)) => {
            report.ready_to_cutover_ms = Some(ms(cutover - ready));
            info!(generation = begun.number, "active");
            Ok(CutOver {
                report,
                t0,
                cutover,
                first_start,
            })
        }
        Err(error) => {
            warn!(generation = begun.number, error = %crate::error_chain(&error), "reload failed");
            handle.update(|s| s.fail(begun.number, &error));
            let tail = handle.read(|s| s.stderr(begun.number));
            if let Some(tail) = tail {
                report.stderr_tail = tail.lines(Duration::from_millis(500)).await;
            }
            report.error = Some(explain_failure(
                crate::error_chain(&error),
                &report.stderr_tail,
            ));
            record(handle, &report, first_start);
            Err(report)
        }
    }
}

/// Step 1: waits for a free slot within the draining limit.
async fn take_slot(handle: &Handle) -> Result<Begun, ReloadError> {
    let mut changed = handle.subscribe();
    let mut said = false;
    loop {
        match handle.update(|s| s.begin(Instant::now())) {
            Ok(begun) => return Ok(begun),
            Err(NotNow::Stopping) => return Err(ReloadError::Stopping),
            Err(NotNow::Busy { draining }) if !said => {
                info!(
                    draining,
                    "reload waits until a draining generation exits (--max-draining)"
                );
                said = true;
            }
            Err(NotNow::Busy { .. }) => {}
        }
        let _ = changed.changed().await;
    }
}

/// Steps 2–5: spawn, discover, register, probe. Returns when it was ready.
async fn start<H: Host>(
    handle: &Handle,
    host: &H,
    begun: &Begun,
    t0: Instant,
) -> Result<Instant, ReloadError> {
    let number = begun.number;
    let config = handle.read(|s| s.config().clone());
    let deadline = t0 + config.ready_timeout;
    let notify = if config.ready_notify {
        Some(NotifySocket::bind(
            config
                .control_socket
                .with_extension(format!("gen{number}.notify")),
        )?)
    } else {
        None
    };
    let Spawned {
        process,
        stderr,
        gate,
    } = host.spawn(number, notify.as_ref().map(|n| n.path.as_path()))?;
    let pid = process.pid();
    handle.update(|s| s.spawned(number, process, stderr))?;
    // The server starts only once the state file names it: a controller
    // killed before this leaves no server a successor does not know.
    handle.persisted().await;
    gate.open().map_err(|source| ReloadError::SpawnError {
        command: "the generation's start gate".into(),
        source,
    })?;

    let scan = discover(handle, host, number, pid, deadline).await?;
    let found = host.copy(&scan)?;
    handle.update(|s| s.register(number, found))?;
    if let Some(notify) = &notify {
        notify.wait_ready(handle, number, deadline).await?;
    }
    if let Some(probe) = &config.ready_probe {
        wait_for_probe(handle, number, probe, deadline).await?;
    }
    Ok(Instant::now())
}

/// Step 3: scans until every address has sockets and two scans agree.
async fn discover<H: Host>(
    handle: &Handle,
    host: &H,
    number: u64,
    pid: u32,
    deadline: Instant,
) -> Result<Scan, ReloadError> {
    let mut changed = handle.subscribe();
    let mut previous: Option<BTreeSet<u64>> = None;
    loop {
        handle.read(|s| s.check_alive(number))?;
        let scan = host.scan(pid).await?;
        if scan.complete() {
            let inodes = scan.inodes();
            if previous.as_ref() == Some(&inodes) {
                return Ok(scan);
            }
            previous = Some(inodes);
        } else {
            previous = None;
            if Instant::now() >= deadline {
                let listen = handle.read(|s| s.config().listen.clone());
                return Err(ReloadError::NotListening {
                    timeout: handle.read(|s| s.config().ready_timeout),
                    missing: listen
                        .iter()
                        .zip(&scan.per_address)
                        .filter(|(_, s)| s.is_empty())
                        .map(|(a, _)| *a)
                        .collect(),
                    listening: scan.listening,
                });
            }
        }
        let _ = tokio::time::timeout(SCAN_INTERVAL, changed.changed()).await;
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

fn record(handle: &Handle, report: &ReloadReport, first_start: bool) {
    handle.update(|s| s.record(report, first_start));
    handle.metrics().config_loaded(report);
    if !first_start {
        handle.metrics().reload(report);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
