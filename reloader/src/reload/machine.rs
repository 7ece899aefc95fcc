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
    config::CanaryPlan,
    error::ReloadError,
    generation::human_duration,
    state::{Begun, CanaryPhase, CanaryVerdict, Handle, NotNow},
    status::{ReloadReport, ReloadResult},
    supervisor::Spawned,
};

/// How often the steered rates are sampled while a canary runs.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// How often discovery scans while a candidate starts.
const SCAN_INTERVAL: Duration = Duration::from_millis(20);

/// A reload that has cut over (or started its canary); what is left is
/// the canary's verdict and draining the old generation.
#[derive(Debug)]
pub struct CutOver {
    report: ReloadReport,
    t0: Instant,
    cutover: Instant,
    first_start: bool,
    /// It runs as a canary.
    canary: bool,
}

impl CutOver {
    /// The generation now active.
    pub fn generation(&self) -> u64 {
        self.report.generation
    }

    /// Waits for a canary's verdict, drains the previous generation (if
    /// any) and completes the report. `barrier` gets it when `reload
    /// --wait` returns: once the old generation has exited; at the cutover
    /// when it is held (`--keep-previous`; the hold then runs on); when a
    /// canary is rolled back.
    /// Returns the report given to `barrier`.
    pub async fn finish(
        mut self,
        handle: &Handle,
        barrier: impl FnOnce(&ReloadReport),
    ) -> ReloadReport {
        let number = self.report.generation;
        if self.canary {
            match wait_canary(handle, number).await {
                // The old generation drains from the promotion on.
                CanaryVerdict::Promoted => self.cutover = Instant::now(),
                CanaryVerdict::RolledBack { reason, why } => {
                    warn!(generation = number, %reason, "canary rolled back: {why}");
                    self.report.result = ReloadResult::RolledBack;
                    self.report.error = Some(format!("the canary was rolled back: {why}"));
                    self.report.total_ms = Some(ms(self.t0.elapsed()));
                    record(handle, &self.report, self.first_start);
                    barrier(&self.report);
                    return self.report;
                }
            }
        }
        let Some(old) = self.report.previous else {
            self.conclude(handle);
            barrier(&self.report);
            return self.report;
        };
        if let Some(until) = handle.read(|s| s.hold_until(old)) {
            self.report.held_ms = Some(ms(until.saturating_duration_since(self.cutover)));
            self.conclude(handle);
            barrier(&self.report);
            drain(handle, old).await;
            return self.report;
        }
        drain(handle, old).await;
        self.report.cutover_to_old_exited_ms = Some(ms(self.cutover.elapsed()));
        self.conclude(handle);
        barrier(&self.report);
        self.report
    }

    /// Sets the result (the new generation may have failed or been rolled
    /// back meanwhile) and records the report.
    fn conclude(&mut self, handle: &Handle) {
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
            Some((result, reason)) => {
                warn!(
                    generation = self.report.generation,
                    "reload failed: {reason}"
                );
                self.report.result = result;
                self.report.error = Some(reason);
            }
        }
        record(handle, &self.report, self.first_start);
    }
}

/// An adopted canary (a previous controller started it): waits for its
/// verdict, then drains the generation it replaced if it was promoted (a
/// rolled-back canary is drained by the rollback).
pub async fn adopted_canary(handle: &Handle, number: u64, previous: u64) {
    if wait_canary(handle, number).await == CanaryVerdict::Promoted {
        drain(handle, previous).await;
    }
}

/// Waits until canary `number` is promoted or rolled back, moving timed
/// steps on and sampling the steered rates meanwhile.
async fn wait_canary(handle: &Handle, number: u64) -> CanaryVerdict {
    let mut changed = handle.subscribe();
    let mut rates = tokio::time::interval(RATE_INTERVAL);
    loop {
        let step_ends = match handle.read(|s| s.canary_phase(number)) {
            CanaryPhase::Ended(verdict) => return verdict,
            CanaryPhase::Running { step_ends } => step_ends,
        };
        // A step that is due but held back (failing health checks) waits
        // for the next change or rate tick instead of its past deadline.
        let now = Instant::now();
        let due = step_ends.filter(|end| *end > now);
        if step_ends.is_some_and(|end| end <= now) {
            handle.update(|s| s.advance_canary(number, now));
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = rates.tick() => handle.update(|s| s.sample_rates(Instant::now())),
            _ = async {
                match due {
                    Some(end) => tokio::time::sleep_until(end.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Runs one reload up to the cutover. `Err` carries the failure report;
/// the previous generation is still active then. `first_start`: the
/// instance's first generation (reported, not counted as a reload).
pub async fn run<H: Host>(
    handle: &Handle,
    host: &H,
    first_start: bool,
    canary: Option<CanaryPlan>,
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
        canary_percent: canary
            .iter()
            .flat_map(|p| p.steps.iter().map(|w| CanaryPlan::percent(*w)))
            .collect(),
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
                .update(|s| match &canary {
                    Some(plan) => s.start_canary(begun.number, ready, plan),
                    None => s.cut_over(begun.number, ready),
                })
                .map(|cutover| (ready, cutover))
        }
        Err(error) => Err(error),
    };
    match started {
        Ok((ready, cutover)) => {
            report.ready_to_cutover_ms = Some(ms(cutover - ready));
            let canary = handle.read(|s| s.canary() == Some(begun.number));
            if !canary {
                report.canary_percent.clear();
                info!(generation = begun.number, "active");
            }
            Ok(CutOver {
                report,
                t0,
                cutover,
                first_start,
                canary,
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
            Err(NotNow::Canary { generation }) => {
                return Err(ReloadError::CanaryRunning { generation });
            }
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
