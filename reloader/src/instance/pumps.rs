//! The tasks [`super::run`] starts beside the owner to carry what the
//! kernel reports to it, each until its source closes: signals
//! (`SIGCHLD`, `SIGHUP`, `SIGTERM`, `SIGINT`) and `cgroup.events` changes
//! become [`Event`]s, the programs' listen events wake the tracker, the
//! eBPF program's log records go to tracing; and the one that carries the
//! owner's snapshot out to the state file.

use std::sync::Arc;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::Event;
use crate::{state::Client, steering::ListenEvent};

/// Turns the signals the controller handles into events: `SIGCHLD` reaps,
/// `SIGHUP` reloads, `SIGTERM` and `SIGINT` stop.
pub(super) fn forward_signals(events: mpsc::Sender<Event>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (kind, make) in [
        (
            SignalKind::child(),
            (|| Event::ChildExited) as fn() -> Event,
        ),
        (SignalKind::hangup(), || Event::Reload {
            wait: false,
            canary: None,
            reply: None,
        }),
        (SignalKind::terminate(), || Event::Stop),
        (SignalKind::interrupt(), || Event::Stop),
    ] {
        let mut stream = signal(kind)?;
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if events.send(make()).await.is_err() {
                    return;
                }
            }
        }));
    }
    Ok(tasks)
}

/// Writes the state file whenever the snapshot's content of it changes,
/// until `stop` fires; tells `persisted` which version is on disk. The
/// write and its fsync run on a blocking thread.
///
/// Stop it with `stop`, then await it: aborting the task would not stop a
/// write already on its blocking thread, and that write could land after
/// the stopping instance removed the file.
pub(super) async fn persist(
    client: Client,
    persisted: tokio::sync::watch::Sender<u64>,
    path: std::path::PathBuf,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut snapshots = client.subscribe();
    let mut written = None;
    loop {
        let (version, content) = {
            let snapshot = snapshots.borrow_and_update();
            (snapshot.saved_version, snapshot.saved.clone())
        };
        if written != Some(version) {
            let path = path.clone();
            let saved =
                tokio::task::spawn_blocking(move || crate::state::saved::save(&path, &content))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
            if let Err(error) = saved {
                warn!(%error, "cannot write the state file");
            }
            written = Some(version);
            persisted.send_replace(version);
        }
        let stopped = tokio::select! {
            changed = snapshots.changed() => changed.is_err(),
            _ = &mut stop => true,
        };
        if stopped {
            // Whoever waits for a write that will not come goes on.
            persisted.send_replace(u64::MAX);
            return;
        }
    }
}

/// Tells the owner whenever a generation's cgroup gains or loses its last
/// process (inotify on `cgroup.events`: no polling).
pub(super) async fn watch_cgroups(
    inotify: inotify::Inotify,
    watch: crate::cgroup::Watch,
    events: mpsc::Sender<Event>,
) {
    // SAFETY: the AsyncFd owns the inotify, whose fd stays open and the
    // same for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let descriptors: Vec<inotify::WatchDescriptor> =
            match guard.try_io(|i| i.get_mut().read_events(&mut buffer)) {
                Ok(Ok(read)) => read.map(|e| e.wd).collect(),
                Ok(Err(_)) | Err(_) => continue,
            };
        for descriptor in descriptors {
            let Some((generation, dir)) = watch.which(&descriptor) else {
                continue;
            };
            let populated =
                tokio::task::spawn_blocking(move || crate::cgroup::populated(&dir)).await;
            // A cgroup that is gone (removed) has no process.
            let populated = matches!(populated, Ok(Ok(true)));
            if events
                .send(Event::CgroupChanged {
                    generation,
                    populated,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Wakes the tracker whenever the programs report a new listener or a
/// connection held on a bridge.
pub(super) async fn pump_listen_events(
    events: crate::steering::ListenEvents,
    listened: Arc<Notify>,
    listens: tokio::sync::watch::Sender<u64>,
) {
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
        let mut events = guard.get_inner_mut().drain();
        guard.clear_ready();
        // An event that arrived between the drain and clear_ready set no
        // new readiness: look once more.
        events.extend(guard.get_inner_mut().drain());
        if events.is_empty() {
            continue;
        }
        let listening: Vec<u32> = events
            .iter()
            .filter(|e| e.kind == ListenEvent::LISTEN)
            .map(|e| e.listener)
            .collect();
        if !listening.is_empty() {
            debug!(listeners = ?listening, "listen event: a socket started listening on a managed address");
            listens.send_modify(|n| *n += listening.len() as u64);
        }
        listened.notify_one();
    }
}

/// Forwards the eBPF program's aya-log records (debug level) to tracing.
pub(super) async fn pump_logs(pump: crate::steering::LogPump) {
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
