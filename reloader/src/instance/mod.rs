//! One instance (`reloader run`): starts it ([`startup`], [`recovery`]),
//! hands its state to the [`Owner`] — the one task that owns it — and
//! cleans up after the owner has stopped every generation. [`run`]'s
//! start-up wiring (adopting what a previous controller left, resuming its
//! logs) is here; the tasks that carry signals and kernel events to the
//! owner are in [`pumps`].
//!
//! Concurrency model: one single-threaded tokio runtime. The owner's run
//! loop holds [`crate::state::InstanceState`] by value and receives every
//! input: [`Event`]s (control requests, signals, `--watch` bursts, exits
//! of adopted processes) and state [`crate::state::Command`]s from the
//! tasks it started — the reload (the machine in [`crate::reload`]),
//! drains of old generations, the listener tracker, health checks — and
//! status readers (control, metrics). Those tasks read the snapshot it
//! publishes after each step. Slow work never runs on this thread:
//! discovery, netlink dumps, `/proc` walks, fork and exec, and the state
//! file's fsync go to blocking threads (clippy's `disallowed-methods`
//! list names the calls that may not appear elsewhere), and output goes
//! through a non-blocking writer.
//!
//! A panic in a task the owner started is caught at its boundary; the
//! owner's own panic ends the controller without touching the servers
//! (`super::run` in `main`): they keep serving, and the next controller
//! adopts them, as after a SIGKILL.

mod claims;
mod commands;
mod events;
mod handover;
mod owner;
mod pumps;
mod reaper;
mod recovery;
mod rollout;
mod startup;
mod stop;
mod watch;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Context;
pub(crate) use events::Event;
use handover::hand_over;
pub(crate) use owner::{Ended, Owner};
use pumps::{forward_signals, persist, pump_listen_events, pump_logs, watch_cgroups};
use stop::{kill_reparented, remove_files};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::{
    config::RunConfig,
    generation::State,
    metrics::{Endpoints, Recorder},
    reload::{self, System},
    state::{Client, InstanceState},
    supervisor,
};

/// Events waiting for the run loop at most.
const EVENT_QUEUE: usize = 256;

/// `reloader run`'s exit status after a hand-over (`EX_TEMPFAIL`): the
/// generations still run, and the next controller adopts them (the systemd
/// unit restarts it at once: `RestartForceExitStatus=75`).
pub const HANDED_OVER: u8 = 75;

/// How `reloader run` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every generation has exited; `clean`: each within its drain timeout.
    Stopped { clean: bool },
    /// Handed over: every generation still runs, and the state file, the
    /// pinned maps and the log keeper are left for the next controller.
    HandedOver,
}

/// Runs instance `config` until it is stopped or hands over.
pub async fn run(config: RunConfig) -> anyhow::Result<Outcome> {
    supervisor::become_subreaper().context("failed to become a child subreaper")?;
    // Before anything starts: a --watch path another user controls is refused.
    let watcher = crate::watch::Watcher::start(&config.changes.watch).await?;
    let config = Arc::new(config);
    let prepared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || startup::prepare(&config))
            .await
            .context("the start-up thread")??
    };
    let startup::Prepared {
        lock,
        claims,
        paths,
        adopting,
        recovered,
        limits,
        steering,
        pinned,
        log_pump,
        listen_events,
        control,
        metrics,
        health,
        generations,
        processes,
        leaderless,
        cgroups,
        hold,
        adopted_sockets,
        bridge_templates,
        keeper,
        taken,
        injector,
    } = prepared;
    let keeper = keeper.map(Arc::new);
    // Registering with the runtime cannot fail once it runs; should it,
    // nothing the start made is left (and a keeper kept for adopted
    // generations goes on keeping).
    let registered = tokio::net::UnixListener::from_std(control).and_then(|control| {
        let metrics = metrics.map(tokio::net::TcpListener::from_std).transpose()?;
        let health = health.map(tokio::net::TcpListener::from_std).transpose()?;
        Ok((control, metrics, health))
    });
    let (control, metrics_listener, health_listener) = match registered {
        Ok(registered) => registered,
        Err(error) => {
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(keeper) = keeper.filter(|_| !adopting) {
                    keeper.exit();
                }
                if !adopting {
                    remove_files(&paths);
                }
                drop(lock);
            })
            .await;
            return Err(error).context("cannot serve the control socket");
        }
    };
    if let Some(pump) = log_pump {
        tokio::spawn(pump_logs(pump));
    }
    let listened = Arc::new(Notify::new());
    // Counts listens on managed addresses: discovery of a starting
    // generation scans at once on each (reload::machine::discover).
    let (listens_tx, listens) = tokio::sync::watch::channel(0u64);
    let events = match listen_events {
        Ok(events) => {
            tokio::spawn(pump_listen_events(events, listened.clone(), listens_tx));
            true
        }
        Err(error) => {
            warn!(
                %error,
                "no listen events (cgroup v2 sock_ops): listeners are found by polling"
            );
            false
        }
    };
    // With events, the steady look is a backstop, also with UDP listeners
    // (a UDP socket does not `listen()`: one a live worker opens late is
    // registered at the next event — a holder's exit, a cutover — or at
    // the backstop; UDP servers open theirs before they are ready).
    let steady = if events {
        reload::IDLE_INTERVAL
    } else {
        reload::TRACK_INTERVAL
    };

    let mut state = InstanceState::new(
        config.clone(),
        limits,
        Box::new(steering),
        generations,
        processes,
        recovered,
    );
    if let Some(hold) = hold {
        state.restore_hold(&hold);
    }
    // A cgroup per generation, or why not (said once, here and in status).
    let (cgroups, cgroup_watch) = match cgroups {
        Ok(cgroups) => match crate::cgroup::Watch::new() {
            Ok((watch, inotify)) => {
                let cgroups = Arc::new(cgroups);
                for (number, _) in state.live() {
                    let dir = cgroups.generation(number);
                    if watch.add(number, &dir).is_ok() {
                        state.set_cgroup(number, dir);
                    }
                }
                for number in leaderless {
                    state.adopted_leaderless(number);
                }
                (Some((cgroups, watch)), Some(inotify))
            }
            Err(error) => {
                let why = format!("cannot watch cgroups (inotify: {error})");
                warn!("no cgroup per generation: {why}");
                state.set_cgroup_unavailable(why);
                (None, None)
            }
        },
        Err(why) => {
            warn!(
                "no cgroup per generation (reloader runs without: generations are process groups \
                 and trees): {why}"
            );
            state.set_cgroup_unavailable(why.0);
            (None, None)
        }
    };
    // The bridges at once, not at the tracker's next registration: a
    // connection that finds the adopted generation without a listener
    // waits on one from the first moment.
    state.open_bridges(bridge_templates);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    resume_logs(&config.name, &mut state, taken);
    let host = Arc::new(System {
        config: config.clone(),
        keeper: keeper.clone(),
        dir: paths.dir.clone(),
        cgroups: cgroups.clone(),
        inject: injector.map(Arc::new),
        socket_name: config
            .control_socket
            .file_name()
            .map(ToOwned::to_owned)
            .unwrap_or_default(),
    });
    let snapshot = state.snapshot(Arc::new(state.saved()), 0);
    let (client, owned) = Client::new(config.clone(), Recorder::default(), snapshot);
    let client = client.counting_migrations(state.migration_log());
    let client = if events {
        client.hearing_listens(listens)
    } else {
        client
    };
    let link = (client, owned);
    let mut owner = Owner::new(state, host.clone(), link, events_rx, !adopting);
    let client = owner.client().clone();
    if adopting {
        adopt(&mut owner, adopted_sockets, &events_tx);
        crate::notify::ready("adopted running generations");
    }

    let (stop_persister, persister_stop) = tokio::sync::oneshot::channel();
    let persister = tokio::spawn(persist(
        client.clone(),
        owner.take_persisted(),
        paths.state.clone(),
        persister_stop,
    ));
    let claims = tokio::spawn(claims.answer(format!(
        "instance {:?} (controller pid {})",
        config.name,
        std::process::id()
    )));
    let signals = forward_signals(events_tx.clone())?;
    let cgroup_task = match (cgroup_watch, &cgroups) {
        (Some(inotify), Some((_, watch))) => Some(tokio::spawn(watch_cgroups(
            inotify,
            watch.clone(),
            events_tx.clone(),
        ))),
        _ => None,
    };
    let control_task = tokio::spawn(crate::control::server::serve(
        events::Control {
            events: events_tx.clone(),
            client: client.clone(),
            no_handover: (!pinned).then(|| {
                "this controller runs without pinned steering maps (bpffs was unavailable at its \
                 start), so no successor could adopt its generations: not handing over"
                    .to_owned()
            }),
        },
        control,
    ));
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            client.clone(),
            listener,
            Endpoints::MetricsAndProbes,
        ))
    });
    let probes_task = health_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            client.clone(),
            listener,
            Endpoints::Probes,
        ))
    });
    let watch_task = watcher.map(|w| tokio::spawn(watch::reload_on_change(w, events_tx.clone())));
    let tracker = tokio::spawn(reload::track(client.clone(), host, listened, steady));
    let health = config
        .rollout
        .health
        .is_some()
        .then(|| tokio::spawn(reload::health::watch(client.clone())));
    let memory_budget = config
        .drain
        .max_memory
        .is_some()
        .then(|| tokio::spawn(reload::memory_budget(client.clone())));
    info!(
        name = %config.name,
        socket = %config.control_socket.display(),
        listen = ?config.listen,
        "controller started"
    );
    drop(events_tx);

    // The owner runs as a task of its own, so that its panic (a bug) is
    // caught here: the controller then exits without touching the servers
    // or the files a successor adopts them by (state file, pins).
    let ended = match tokio::spawn(owner.run()).await {
        Ok(ended) => ended,
        Err(error) => {
            tracing::error!(
                %error,
                "the instance's state owner ended unexpectedly: exiting without touching the \
                 servers (they keep serving; start reloader again to adopt them)"
            );
            anyhow::bail!(
                "internal error: the controller's run loop ended ({error}); the servers were \
                 left running: start `reloader run` again with the same options to adopt them"
            );
        }
    };

    let handed_over = matches!(ended, Ended::HandedOver);
    // After a hand-over every generation still runs (our children, most of
    // them) and the keeper holds their stderr: neither is touched.
    if !handed_over {
        // The keeper first: it is our child too (when this controller
        // started it), and killed it would leave its socket behind.
        if let Some(keeper) = keeper.clone() {
            let _ = tokio::task::spawn_blocking(move || keeper.exit()).await;
        }
        kill_reparented().await;
    }
    for task in [
        Some(tracker),
        Some(control_task),
        Some(claims),
        cgroup_task,
        metrics_task,
        probes_task,
        watch_task,
        health,
        memory_budget,
    ]
    .into_iter()
    .flatten()
    .chain(signals)
    {
        task.abort();
    }
    let _ = stop_persister.send(());
    let _ = persister.await;
    if handed_over {
        return hand_over(&client, paths, lock).await;
    }
    let Ended::Stopped {
        clean,
        first_failure,
    } = ended
    else {
        unreachable!("a hand-over returned above");
    };
    // After a stop nothing of the instance remains: no state file, no pins,
    // no socket, no lock.
    let _ = tokio::task::spawn_blocking(move || {
        remove_files(&paths);
        if let Some((cgroups, _)) = cgroups {
            cgroups.remove();
        }
        // The lock's file goes through the directory's descriptor: before
        // the paths (and the descriptor) are dropped.
        drop(lock);
        drop(paths);
    })
    .await;
    if let Some(report) = first_failure {
        anyhow::bail!(
            "the first generation did not start: {}",
            report.error.unwrap_or_default()
        );
    }
    info!(clean, "stopped");
    Ok(Outcome::Stopped { clean })
}

/// Forwards the stderr of adopted generations again, from the pipes the log
/// keeper held while no controller ran; logs the lines it kept meanwhile and
/// how many it dropped. Pipes of generations not adopted are closed.
fn resume_logs(name: &str, state: &mut InstanceState, taken: Vec<supervisor::keeper::Taken>) {
    let adopted: std::collections::BTreeSet<u64> =
        state.live().into_iter().map(|(n, _)| n).collect();
    for t in taken {
        if !adopted.contains(&t.generation) {
            continue;
        }
        for line in &t.lines {
            crate::logging::server_line(name, t.generation, line);
        }
        if t.dropped > 0 {
            warn!(
                generation = t.generation,
                dropped = t.dropped,
                kept = t.lines.len(),
                "stderr lines of the generation were dropped while no controller ran (the log \
                 keeper keeps the last {} KiB)",
                supervisor::keeper::KEEP_BYTES / 1024
            );
        } else if !t.lines.is_empty() {
            info!(
                generation = t.generation,
                lines = t.lines.len(),
                "forwarded the stderr lines the log keeper kept while no controller ran"
            );
        }
        if let Some(pipe) = t.pipe {
            match supervisor::forward_stderr(pipe, name.to_owned(), t.generation) {
                Ok(tail) => state.resume_stderr(t.generation, tail),
                Err(error) => warn!(generation = t.generation, %error, "cannot forward its stderr"),
            }
        }
    }
}

/// Takes over the generations a previous controller left running: a
/// candidate that was starting is killed (that reload is lost), draining
/// ones are drained again, an adopted canary waits for its verdict, and
/// every leader's exit is watched by pidfd.
fn adopt(
    owner: &mut Owner<System>,
    sockets: Vec<(u64, Vec<crate::state::RegisteredSocket>)>,
    events: &mpsc::Sender<Event>,
) {
    for (number, sockets) in sockets {
        owner.state.adopted_sockets(number, sockets);
    }
    for (number, state) in owner.state.live() {
        match state {
            State::Starting | State::Ready => owner.state.kill_orphaned_candidate(number),
            State::Canary => {
                if let Some(previous) = owner.state.adopted_canary(number) {
                    owner.spawn_adopted_canary(number, previous);
                }
            }
            State::Draining => owner.spawn_drain(number),
            State::Active | State::Exited | State::Failed => {}
        }
    }
    reaper::watch_adopted(&owner.state, events);
}
