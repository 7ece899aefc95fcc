//! [`Handle`]: the door to an [`InstanceState`], and the only holder of its
//! lock (mini-redis's `Db` has the same shape). A closure given to
//! [`Handle::update`] or [`Handle::read`] runs with the state locked; it is
//! synchronous, so the lock is never held across an `.await`, and it can
//! only use the state's own methods. After every update, waiters see a
//! tick ([`Handle::subscribe`]) and the state file is rewritten on a
//! blocking thread when its content changed ([`Handle::persist_to`]).

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::watch;
use tracing::warn;

use super::{InstanceState, saved::Saved};
use crate::{metrics::Recorder, status::StatusReport};

/// A cheap, cloneable handle to one instance's state.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<InstanceState>,
    /// Ticks after every update.
    changed: watch::Sender<u64>,
    /// The state file's content after the latest update that changed it,
    /// with a version number.
    saved: watch::Sender<(u64, Saved)>,
    /// The version last written to disk.
    persisted: watch::Sender<u64>,
    /// Whether a persister runs (without one, nothing waits for it).
    persisting: AtomicBool,
    metrics: Recorder,
}

impl Handle {
    pub fn new(state: InstanceState) -> Self {
        let saved = state.saved();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: watch::channel(0).0,
                saved: watch::channel((0, saved)).0,
                persisted: watch::channel(0).0,
                persisting: AtomicBool::new(false),
                metrics: Recorder::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InstanceState> {
        self.shared
            .state
            .lock()
            .expect("instance state lock poisoned")
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&InstanceState) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the state, then tells waiters and the persister.
    pub fn update<R>(&self, f: impl FnOnce(&mut InstanceState) -> R) -> R {
        let (result, saved) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.saved())
        };
        self.shared.saved.send_if_modified(|(version, current)| {
            if *current == saved {
                return false;
            }
            *version += 1;
            *current = saved;
            true
        });
        self.shared.changed.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    /// A receiver that sees every later update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Event metrics (reloads by result, phase durations).
    pub fn metrics(&self) -> &Recorder {
        &self.shared.metrics
    }

    /// Waits until the state file holds what the state is now (or the
    /// persister has stopped).
    pub async fn persisted(&self) {
        if !self.shared.persisting.load(Ordering::Relaxed) {
            return;
        }
        let target = self.shared.saved.borrow().0;
        let mut done = self.shared.persisted.subscribe();
        let _ = done.wait_for(|v| *v >= target).await;
    }

    /// The instance's status, with each socket's accept-queue length read
    /// from the kernel on a blocking thread.
    pub async fn status(&self) -> StatusReport {
        let mut report = self.read(InstanceState::status);
        let queues = tokio::task::spawn_blocking(crate::discovery::listeners).await;
        if let Ok(Ok(listening)) = queues {
            let by_inode: std::collections::HashMap<u64, u32> = listening
                .into_iter()
                .map(|l| (l.inode, l.accept_queue))
                .collect();
            for socket in report.generations.iter_mut().flat_map(|g| &mut g.sockets) {
                socket.accept_queue = by_inode.get(&socket.inode).copied();
            }
        }
        report
    }

    /// Writes the state file at `path` whenever its content changes, until
    /// `stop` fires or the handle's last clone is gone. Runs as a task; the
    /// write and its fsync run on a blocking thread.
    ///
    /// Stop it with `stop`, then await it: aborting the task would not stop
    /// a write already on its blocking thread, and that write could land
    /// after the stopping instance removed the file.
    pub async fn persist_to(self, path: PathBuf, mut stop: tokio::sync::oneshot::Receiver<()>) {
        self.shared.persisting.store(true, Ordering::Relaxed);
        let mut saved = self.shared.saved.subscribe();
        let persisted = self.shared.persisted.clone();
        drop(self);
        loop {
            let (version, content) = saved.borrow_and_update().clone();
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || super::saved::save(&path, &content))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            if let Err(error) = written {
                warn!(%error, "cannot write the state file");
            }
            persisted.send_replace(version);
            let stopped = tokio::select! {
                changed = saved.changed() => changed.is_err(),
                _ = &mut stop => true,
            };
            if stopped {
                // Whoever waits for a write that will not come goes on.
                persisted.send_replace(u64::MAX);
                return;
            }
        }
    }
}

impl crate::metrics::Source for Handle {
    async fn status(&self) -> StatusReport {
        Handle::status(self).await
    }

    fn recorder(&self) -> &Recorder {
        self.metrics()
    }
}
