//! Steps 7–8: let the old generation settle (it receives nothing new and
//! reads what it already accepted — for UDP, until its receive queues are
//! empty, since queued datagrams die with the socket), signal it to drain,
//! and wait for its
//! exit, killing its process group at the drain timeout. Every wait is
//! bounded: a generation that does not exit even after SIGKILL is given up
//! after [`KILL_GRACE`] and its slot freed.
//!
//! With `--drain-command`, the command is run *instead of* the drain
//! signal (a server whose graceful stop is an API call: Envoy's
//! `/drain_listeners`, a Java service's drain endpoint); the signal is
//! sent only if the command fails. The drain timeout bounds both: it runs
//! from the command's start, the command is killed at it, and so is the
//! generation. `reloader stop` and evictions still send the signal.

use std::time::Duration;

use tracing::warn;

use crate::{
    config::Settle, generation::human_duration, state::Client, status::DrainCommandReport,
};

/// How long a SIGKILLed generation may take to be seen exiting.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// How much longer than `--settle` an old generation may take to read the
/// datagrams already queued in its UDP sockets.
pub const UDP_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How often the queues are looked at meanwhile.
const UDP_QUEUE_POLL: Duration = Duration::from_millis(10);

/// Drains generation `old`; returns when it has exited (or was given up),
/// with how `--drain-command` ran if it did.
pub async fn drain(client: &Client, old: u64) -> Option<DrainCommandReport> {
    let config = client.config().clone();
    // The state file records the cutover before `old` may be told to stop:
    // a controller killed in between must not leave a file naming `old`
    // active and its successor a candidate, which a restarted controller
    // kills (seen with `auto`, which can signal within milliseconds). The
    // settle only looks, so it runs meanwhile: the write (a blocking
    // thread, 1–3 ms) and the first look (a sock_diag walk, 2–5 ms under
    // load) overlap instead of adding up.
    let settled = async {
        settle(client, old, config.drain.settle.floor()).await;
        if matches!(config.drain.settle, Settle::Auto | Settle::Idle) {
            super::settle::by_looks(client, old, config.drain.settle, config.drain.settle_max)
                .await;
        }
    };
    tokio::join!(client.persisted(), settled);
    udp_queues_read(client, old, UDP_QUEUE_WAIT).await;
    let deadline = tokio::time::Instant::now() + config.drain.timeout;
    let (told, report) = match &config.drain.command {
        Some(command) => {
            let pid = client.snapshot().generation(old).and_then(|g| g.pid);
            if !client.drain_begun(old).await {
                return None;
            }
            let report = drain_command(command, &config.name, old, pid, config.drain.timeout).await;
            let told = report.ok || client.drain_signal(old).await;
            (told, Some(report))
        }
        None => (client.drain_signal(old).await, None),
    };
    if !told {
        return report;
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if wait_exit(client, old, left).await {
        return report;
    }
    warn!(
        generation = old,
        timeout = %human_duration(config.drain.timeout),
        "still running at the drain timeout: killing its process group"
    );
    client.kill(old).await;
    if !wait_exit(client, old, KILL_GRACE).await {
        client.abandon(old, KILL_GRACE).await;
    }
    report
}

/// Runs `--drain-command` for generation `old` (first process `pid`),
/// bounded by the drain timeout, and says how it went.
async fn drain_command(
    command: &crate::config::CheckCommand,
    name: &str,
    old: u64,
    pid: Option<u32>,
    timeout: Duration,
) -> DrainCommandReport {
    let ran = super::check::execute(command, name, old, pid, timeout, "--drain-timeout").await;
    let report = match ran {
        Ok(ran) => DrainCommandReport {
            generation: old,
            command: command.text.clone(),
            ok: ran.ok,
            how: ran.how,
            duration_ms: ran.duration.as_secs_f64() * 1000.0,
            output: ran.output,
        },
        Err(error) => DrainCommandReport {
            generation: old,
            command: command.text.clone(),
            ok: false,
            how: format!("could not be started: {error}"),
            ..DrainCommandReport::default()
        },
    };
    if report.ok {
        tracing::info!(
            generation = old,
            duration_ms = report.duration_ms,
            "--drain-command {}",
            report.how
        );
    } else {
        warn!(
            generation = old,
            duration_ms = report.duration_ms,
            output = report.output.join("\n"),
            "--drain-command `{}` {}: sending the drain signal instead",
            report.command,
            report.how
        );
    }
    report
}

/// Finishes the eviction of generation `number` (`state::evict`): waits
/// [`EVICT_GRACE`](crate::state::EVICT_GRACE) for it to exit on its drain
/// signal, then kills its cgroup.
pub async fn evicted(client: &Client, number: u64) {
    if wait_exit(client, number, crate::state::EVICT_GRACE).await {
        return;
    }
    client.kill_evicted(number).await;
    if !wait_exit(client, number, KILL_GRACE).await {
        client.abandon(number, KILL_GRACE).await;
    }
}

/// How often the draining generations' memory is read while any drains
/// (`--max-draining-memory`).
const MEMORY_SAMPLE: Duration = Duration::from_secs(1);

/// `--max-draining-memory`: while generations drain, reads their cgroups'
/// `memory.current` every [`MEMORY_SAMPLE`] and tells the owner, which
/// evicts the oldest when they are over the budget. While none drains it
/// waits for the next snapshot: an idle controller does not wake up.
pub async fn memory_budget(client: Client) {
    let mut snapshots = client.subscribe();
    loop {
        let draining = snapshots.borrow_and_update().draining_cgroups();
        if draining.is_empty() {
            if snapshots.changed().await.is_err() {
                return;
            }
            continue;
        }
        let usage = tokio::task::spawn_blocking(move || {
            draining
                .into_iter()
                .filter_map(|(number, dir)| {
                    #[allow(clippy::disallowed_methods)] // on a blocking thread
                    let text = std::fs::read_to_string(dir.join("memory.current")).ok()?;
                    Some((number, text.trim().parse().ok()?))
                })
                .collect::<Vec<(u64, u64)>>()
        })
        .await
        .unwrap_or_default();
        client.over_memory(usage).await;
        tokio::time::sleep(MEMORY_SAMPLE).await;
    }
}

/// Lets `old` run for `settle` (a fixed `--settle`; 0 for `auto` and
/// `idle`, which then look: [`super::settle`]) while it drains (it receives
/// nothing new), or for as long as it is held (`--keep-previous`: the hold ends at its
/// deadline, or early when a later cutover holds another generation);
/// returns early if it no longer drains (it ended, or was made active
/// again because its successor failed or was rolled back).
async fn settle(client: &Client, old: u64, settle: Duration) {
    let mut snapshots = client.subscribe();
    let settled = tokio::time::Instant::now() + settle;
    loop {
        let held = {
            let snapshot = snapshots.borrow_and_update();
            if !snapshot.is(old, crate::generation::State::Draining) {
                return;
            }
            snapshot.hold_until(old)
        };
        let deadline = held.map_or(settled, |until| settled.max(until.into()));
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() {
                return;
            },
            _ = tokio::time::sleep_until(deadline) => {
                if client.snapshot().hold_until(old) == held {
                    return;
                }
            }
        }
    }
}

/// After the settle, waits (up to `max`) until generation `old`'s sockets
/// of stateless UDP listeners have no datagram queued: when a UDP socket closes, what is
/// queued in it is dropped — the kernel migrates queued TCP connections of
/// a closing listener, never datagrams. A server starved of CPU during a
/// reload may need longer than `--settle` to read them. Returns at once
/// without UDP listeners, or when `old` no longer drains.
async fn udp_queues_read(client: &Client, old: u64, max: Duration) {
    // Stateless listeners only: with flow affinity the old generation keeps
    // receiving its flows' datagrams until it closes, so its queue need
    // not empty, and what it has not read then is its flows' loss either way.
    let inodes = client
        .snapshot()
        .generation(old)
        .map(|g| g.stateless_udp.clone())
        .unwrap_or_default();
    if inodes.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + max;
    loop {
        if !client
            .snapshot()
            .is(old, crate::generation::State::Draining)
        {
            return;
        }
        let queued: u64 = match tokio::task::spawn_blocking(crate::discovery::listeners).await {
            Ok(Ok(sockets)) => sockets
                .iter()
                .filter(|l| inodes.contains(&l.inode))
                .map(|l| u64::from(l.accept_queue))
                .sum(),
            _ => return,
        };
        if queued == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                generation = old,
                bytes = queued,
                "datagrams still queued in its UDP sockets after the settle; draining anyway"
            );
            return;
        }
        tokio::time::sleep(UDP_QUEUE_POLL).await;
    }
}

/// Waits up to `timeout` for generation `number` to end; true if it did.
pub async fn wait_exit(client: &Client, number: u64, timeout: Duration) -> bool {
    let mut snapshots = client.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if snapshots.borrow_and_update().ended(number) {
            return true;
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() {
                return false;
            },
            _ = tokio::time::sleep_until(deadline) => return client.snapshot().ended(number),
        }
    }
}
