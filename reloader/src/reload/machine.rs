//! The reload machine: steps 1–6 as functions, each with the typed
//! [`ReloadError`]; [`run`] chains them, [`CutOver::finish`] waits for the
//! barrier. The machine is a task of its own that changes the state only
//! through its [`Client`]: the instance can abort it at any await (a stop
//! during a start), and [`crate::state::InstanceState::begin_stop`] then
//! kills the candidate it leaves behind. How a reload ended is decided by
//! the state's owner when the machine hands its report back
//! ([`crate::state::InstanceState::conclude`]).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{Host, Members, Scan, drain::drain, probe::wait_for_probe, ready::NotifySocket};
use crate::{
    config::CanaryPlan,
    error::{FailureKind, ReloadError, ReloadFailure},
    state::{Begun, CanaryPhase, CanaryVerdict, Client, NotNow},
    status::{ReloadReport, ReloadResult, RollbackReason},
    supervisor::Spawned,
};

/// How often the steered rates are sampled while a canary runs.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// How often discovery scans while a candidate starts (without listen
/// events; with them, a backstop), after [`FAST_SCANS_FOR`].
const SCAN_INTERVAL: Duration = Duration::from_millis(20);
/// How often it scans before that: most servers bind within tens of
/// milliseconds, and without an event (UDP: a socket does not `listen()`)
/// the set is found one interval after the bind and confirmed one more
/// later — with 20 ms, 40 ms of Knot DNS's 70 ms spawn → ready. A scan
/// (sock_diag dumps of the managed protocols and the members' descriptors)
/// costs well under a millisecond.
const FAST_SCAN_INTERVAL: Duration = Duration::from_millis(4);
const FAST_SCANS_FOR: Duration = Duration::from_millis(300);
/// How long no listen event must follow a complete scan for its set to be
/// the generation's (see [`discover`]).
const QUIET: Duration = Duration::from_millis(3);

/// How long a candidate may listen elsewhere but not on a managed address
/// before the log says so (a wrong `--listen` port would otherwise be
/// silent for the whole `--ready-timeout`).
const ELSEWHERE_AFTER: Duration = Duration::from_secs(3);

/// A reload that has cut over (or started its canary); what is left is
/// the canary's verdict and draining the old generation.
#[derive(Debug)]
pub struct CutOver {
    report: ReloadReport,
    t0: Instant,
    cutover: Instant,
    /// It runs as a canary.
    canary: bool,
}

/// A reload at its barrier (what `reload --wait` waits for): its report,
/// whose result the state's owner decides, and the generation still to
/// drain after the barrier (a held one).
#[derive(Debug)]
pub struct Finished {
    pub report: ReloadReport,
    pub then_drain: Option<u64>,
}

impl CutOver {
    /// Waits for a canary's verdict and for the old generation (if any)
    /// to drain: the barrier is reached once it has exited; at the cutover
    /// when it is held (`--keep-previous`: it is returned to be drained
    /// after the hold); when a canary is rolled back.
    pub async fn finish(mut self, client: &Client) -> Finished {
        let number = self.report.generation;
        if self.canary {
            match wait_canary(client, number).await {
                // The old generation drains from the promotion on.
                CanaryVerdict::Promoted => self.cutover = Instant::now(),
                CanaryVerdict::RolledBack { reason, why } => {
                    warn!(generation = number, %reason, "canary rolled back: {why}");
                    let detail = format!("the canary was rolled back: {why}");
                    self.report.result = ReloadResult::RolledBack;
                    self.report.error = Some(detail.clone());
                    self.report.failure = Some(ReloadFailure {
                        kind: match reason {
                            RollbackReason::Health => FailureKind::RolledBackByHealth,
                            RollbackReason::Manual => FailureKind::RolledBack,
                            RollbackReason::Crash => FailureKind::CrashedAfterCutover,
                        },
                        detail,
                        active: None,
                    });
                    return self.at_barrier(None);
                }
            }
        }
        let Some(old) = self.report.previous else {
            return self.at_barrier(None);
        };
        if let Some(until) = client.snapshot().hold_until(old) {
            self.report.held_ms = Some(ms(until.saturating_duration_since(self.cutover)));
            return self.at_barrier(Some(old));
        }
        self.report.drain_command = drain(client, old).await;
        self.report.cutover_to_old_exited_ms = Some(ms(self.cutover.elapsed()));
        self.at_barrier(None)
    }

    fn at_barrier(mut self, then_drain: Option<u64>) -> Finished {
        self.report.total_ms = Some(ms(self.t0.elapsed()));
        Finished {
            report: self.report,
            then_drain,
        }
    }
}

/// An adopted canary (a previous controller started it): waits for its
/// verdict, then drains the generation it replaced if it was promoted (a
/// rolled-back canary is drained by the rollback).
pub async fn adopted_canary(client: &Client, number: u64, previous: u64) {
    if wait_canary(client, number).await == CanaryVerdict::Promoted {
        let _ = drain(client, previous).await;
    }
}

/// Waits until canary `number` is promoted or rolled back, moving timed
/// steps on and sampling the steered rates meanwhile.
async fn wait_canary(client: &Client, number: u64) -> CanaryVerdict {
    let mut snapshots = client.subscribe();
    let mut rates = tokio::time::interval(RATE_INTERVAL);
    loop {
        let step_ends = match snapshots.borrow_and_update().canary_phase(number) {
            CanaryPhase::Ended(verdict) => return verdict,
            CanaryPhase::Running { step_ends } => step_ends,
        };
        // A step that is due but held back (failing health checks) waits
        // for the next change or rate tick instead of its past deadline.
        let now = Instant::now();
        let due = step_ends.filter(|end| *end > now);
        if step_ends.is_some_and(|end| end <= now) {
            client.advance_canary(number, now).await;
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() {
                return CanaryVerdict::ended();
            },
            _ = rates.tick() => client.sample_rates(Instant::now()).await,
            _ = async {
                match due {
                    Some(end) => tokio::time::sleep_until(end.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Runs one reload up to the cutover. `Err` carries the failure report
/// (not recorded yet: the owner concludes it); the previous generation is
/// still active then.
pub async fn run<H: Host>(
    client: &Client,
    host: &H,
    canary: Option<CanaryPlan>,
) -> Result<CutOver, ReloadReport> {
    let t0 = Instant::now();
    let config_sha256 = super::preflight::run(client).await?;
    let begun = take_slot(client, config_sha256.clone())
        .await
        .map_err(|error| failed(ReloadReport::default(), &error, t0))?;
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
    let started = match start(client, host, &begun, t0).await {
        Ok(ready) => {
            report.spawn_to_ready_ms = Some(ms(ready - t0));
            client
                .activate(begun.number, ready, canary)
                .await
                .map(|activated| (ready, activated))
        }
        Err(error) => Err(error),
    };
    match started {
        Ok((ready, activated)) => {
            report.ready_to_cutover_ms = Some(ms(activated.cutover - ready));
            if !activated.canary {
                report.canary_percent.clear();
                info!(generation = begun.number, "active");
            }
            Ok(CutOver {
                report,
                t0,
                cutover: activated.cutover,
                canary: activated.canary,
            })
        }
        Err(error) => {
            warn!(generation = begun.number, error = %crate::error_chain(&error), "reload failed");
            let kind = error.kind();
            let text = crate::error_chain(&error);
            if let Some(tail) = client.fail(begun.number, error).await {
                report.stderr_tail = tail.lines(Duration::from_millis(500)).await;
            }
            let (detail, kind) = explain_failure(
                text,
                kind,
                &report.stderr_tail,
                client.config().spawn.inject_reuseport,
            );
            report.error = Some(detail.clone());
            report.failure = Some(ReloadFailure {
                kind,
                detail,
                active: None,
            });
            report.total_ms = Some(ms(t0.elapsed()));
            Err(report)
        }
    }
}

/// A report of a reload that failed with `error` before it spawned
/// anything.
pub(super) fn failed(mut report: ReloadReport, error: &ReloadError, t0: Instant) -> ReloadReport {
    let detail = crate::error_chain(error);
    report.error = Some(detail.clone());
    report.check_failed = error.is_check_failure();
    report.failure = Some(ReloadFailure {
        kind: error.kind(),
        detail,
        active: None,
    });
    report.total_ms = Some(ms(t0.elapsed()));
    report
}

/// Step 1: waits for a free slot within the draining limit.
async fn take_slot(client: &Client, config_sha256: Option<String>) -> Result<Begun, ReloadError> {
    let mut snapshots = client.subscribe();
    let mut said = false;
    loop {
        match client.begin(config_sha256.clone()).await {
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
        if snapshots.changed().await.is_err() {
            return Err(ReloadError::Stopping);
        }
    }
}

/// Steps 2–5: spawn, discover, register, probe. Returns when it was ready.
async fn start<H: Host>(
    client: &Client,
    host: &H,
    begun: &Begun,
    t0: Instant,
) -> Result<Instant, ReloadError> {
    let number = begun.number;
    let config = client.config().clone();
    let deadline = t0 + config.ready.timeout;
    let notify = if config.ready.notify {
        let (bind, named) = host.notify_paths(number);
        Some(NotifySocket::bind(bind, named).await?)
    } else {
        None
    };
    let Spawned {
        process,
        stderr,
        gate,
        cgroup,
    } = host
        .spawn(number, notify.as_ref().map(|n| n.path.clone()))
        .await?;
    let members = Members {
        pid: process.pid(),
        cgroup: cgroup.clone(),
    };
    client.spawned(number, process, stderr, cgroup).await?;
    // The server starts only once the state file names it: a controller
    // killed before this leaves no server a successor does not know.
    client.persisted().await;
    gate.open().map_err(|source| ReloadError::SpawnError {
        command: "the generation's start gate".into(),
        source,
    })?;

    // A daemonizing server's first process holds the sockets when the
    // scan sees them and exits a moment later (nginx without
    // `daemon off;`, seen in CI): the copy then fails with ESRCH, and a
    // new scan finds the daemon holding the same sockets.
    let found = loop {
        let scan = discover(client, host, number, members.clone(), deadline).await?;
        match host.copy(scan).await {
            Err(error) if error.holder_vanished() && Instant::now() < deadline => {
                debug!(generation = number, error = %crate::error_chain(&error), "a holder went away: scanning again");
            }
            found => break found?,
        }
    };
    client.register(number, found).await?;
    if let Some(notify) = &notify {
        notify.wait_ready(client, number, deadline).await?;
    }
    if let Some(probe) = &config.ready.probe {
        wait_for_probe(client, number, probe, deadline).await?;
    }
    Ok(Instant::now())
}

/// Step 3: scans until every address has sockets and the set is stable.
///
/// Stable means: with the `sock_ops` listen notifier and only TCP
/// addresses, no listen on a managed address arrived for [`QUIET`] after
/// a complete scan. The notifier fires from `__inet_listen_sk` after the
/// socket is hashed into its group, for every `listen()` in the instance's
/// cgroups, so a scan that raced a later listen is followed by its event:
/// a scan runs on each event, and the first quiet one is the set. Servers
/// open their listeners in a tight loop (nginx: one per worker, from the
/// master), microseconds apart. A socket opened later still (a worker that
/// listens after it forks) is registered by the tracker when it listens.
///
/// Without the notifier, or with UDP addresses (a UDP socket does not
/// `listen()`), two complete scans [`FAST_SCAN_INTERVAL`] apart must agree
/// ([`SCAN_INTERVAL`] after [`FAST_SCANS_FOR`]): servers bind their
/// sockets in a loop, microseconds apart, and a socket bound later still
/// is registered by the tracker when it looks.
async fn discover<H: Host>(
    client: &Client,
    host: &H,
    number: u64,
    members: Members,
    deadline: Instant,
) -> Result<Scan, ReloadError> {
    let mut snapshots = client.subscribe();
    let tcp_only = client
        .config()
        .listen
        .iter()
        .all(|l| l.transport == crate::net::Transport::Tcp);
    let mut listens = client.listens().filter(|_| tcp_only);
    let mut previous: Option<BTreeSet<u64>> = None;
    let started = Instant::now();
    let elsewhere_after = started + ELSEWHERE_AFTER;
    let mut said_elsewhere = false;
    let interval = || {
        if started.elapsed() < FAST_SCANS_FOR {
            FAST_SCAN_INTERVAL
        } else {
            SCAN_INTERVAL
        }
    };
    loop {
        snapshots.borrow_and_update().check_alive(number)?;
        let scan = host.scan(members.clone()).await?;
        if !said_elsewhere
            && !scan.complete()
            && !scan.listening.is_empty()
            && Instant::now() >= elsewhere_after
            && elsewhere_after < deadline
        {
            said_elsewhere = true;
            let config = client.config();
            let missing: Vec<String> = config
                .listen
                .iter()
                .zip(&scan.per_address)
                .filter(|(_, s)| s.is_empty())
                .map(|(a, _)| a.to_string())
                .collect();
            warn!(
                generation = number,
                missing = %missing.join(", "),
                listens_on = %scan.listening.join(", "),
                "generation {number} listens on {} but not on {} after {}: is --listen the \
                 address the server listens on? (waiting until --ready-timeout {})",
                scan.listening.join(", "),
                missing.join(", "),
                crate::generation::human_duration(ELSEWHERE_AFTER),
                crate::generation::human_duration(config.ready.timeout),
            );
        }
        if scan.complete() {
            if let Some(listens) = &mut listens {
                match tokio::time::timeout(QUIET, listens.changed()).await {
                    Err(_quiet) => return Ok(scan),
                    Ok(Ok(())) => continue,
                    // The notifier stopped: scans decide from here.
                    Ok(Err(_)) => {}
                }
            }
            let inodes = scan.inodes();
            if previous.as_ref() == Some(&inodes) {
                return Ok(scan);
            }
            previous = Some(inodes);
        } else {
            previous = None;
            if Instant::now() >= deadline {
                let config = client.config();
                return Err(ReloadError::NotListening {
                    timeout: config.ready.timeout,
                    missing: config
                        .listen
                        .iter()
                        .zip(&scan.per_address)
                        .filter(|(_, s)| s.is_empty())
                        .map(|(a, _)| *a)
                        .collect(),
                    listening: scan.listening,
                });
            }
        }
        match &mut listens {
            Some(heard) => {
                tokio::select! {
                    _ = heard.changed() => {}
                    _ = snapshots.changed() => {}
                    // A backstop: an event can be lost (a full ring buffer).
                    () = tokio::time::sleep(SCAN_INTERVAL) => {}
                }
            }
            None => {
                let _ = tokio::time::timeout(interval(), snapshots.changed()).await;
            }
        }
    }
}

/// Adds the likely fix to a failure whose stderr shows a bind conflict.
fn explain_failure(
    error: String,
    kind: FailureKind,
    stderr: &[String],
    injecting: bool,
) -> (String, FailureKind) {
    let bind_conflict = stderr
        .iter()
        .any(|l| l.contains("in use") || l.contains("EADDRINUSE"));
    if !bind_conflict {
        return (error, kind);
    }
    let fix = if injecting {
        "--inject-reuseport gives SO_REUSEPORT only to binds of a --listen address in the same \
         form (protocol, address and port, IPv4 or IPv6 socket): if the server binds another \
         form of it ([::] for 0.0.0.0, an IPv4-mapped address), manage that one"
    } else {
        "a server must set SO_REUSEPORT to listen beside it (nginx: `listen ... reuseport`; \
         Envoy: `enable_reuse_port: true`), or run reloader with --inject-reuseport to set it \
         for the server"
    };
    (
        format!("{error}; it could not bind an address the old generation holds: {fix}"),
        FailureKind::NoReuseport,
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
