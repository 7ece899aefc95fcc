//! `--watch`: reload when a watched file or directory changes.
//!
//! inotify, read through tokio's `AsyncFd` on the controller's own thread:
//! nothing polls and no timer runs while nothing changes (the controller's
//! idle wake-ups stay as they are; the benchmark measures them). A change
//! starts a burst; the burst ends once [`QUIET`] passes without another
//! relevant event (or [`MAX_BURST`] after it began, so a file rewritten
//! without pause still reloads), and then [`Watcher::next_change`] returns
//! once: twenty writes in 100 ms are one reload. The instance turns that
//! into one reload request, which its scheduler coalesces with any reload
//! already running.
//!
//! The event mask is ours: created, deleted, moved in or out, written and
//! closed, attributes changed (`touch` reloads), and the watched directory
//! itself deleted or moved. Not opens or reads: the server reading its
//! config, or reloader hashing it, must not look like a change. What counts
//! as a change of which path is in [`paths`].
//!
//! After each burst the set of watched directories is computed again
//! (subdirectories created or removed, a directory renamed over) and the
//! watches are updated. Errors after start (a watch that cannot be added,
//! a read error, an event queue overflow) are logged and never stop the
//! controller: an overflow counts as a change.

mod paths;

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
pub use paths::{Target, WatchError, unsafe_dir};
use tokio::{io::unix::AsyncFd, time::Instant};
use tracing::{debug, warn};

/// A burst of changes ends after this long without another.
pub const QUIET: Duration = Duration::from_millis(200);
/// A burst ends this long after it began, however busy.
pub const MAX_BURST: Duration = Duration::from_secs(2);

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// The watches of one instance.
pub struct Watcher {
    fd: AsyncFd<Inotify>,
    watches: Watches,
    targets: Vec<Target>,
    /// Each watch and its directory.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    buffer: Vec<u8>,
}

impl Watcher {
    /// Checks `paths` and watches them; `None` without paths. Needs a tokio
    /// runtime; the checks and the directory walk run on a blocking thread.
    pub async fn start(paths: &[PathBuf]) -> Result<Option<Self>, WatchError> {
        if paths.is_empty() {
            return Ok(None);
        }
        let owned = paths.to_vec();
        let targets = tokio::task::spawn_blocking(move || {
            owned
                .iter()
                .map(|p| Target::of(p))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| WatchError::InotifyError {
            path: paths[0].clone(),
            source: std::io::Error::other(e),
        })??;
        let inotify_error = |source| WatchError::InotifyError {
            path: paths[0].clone(),
            source,
        };
        let inotify = Inotify::init().map_err(inotify_error)?;
        let watches = inotify.watches();
        // SAFETY: the inotify fd is owned by `inotify`, which the AsyncFd
        // now owns: it stays open and the same for as long as it is
        // registered.
        let fd = unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
            .map_err(|e| inotify_error(e.into()))?;
        let mut watcher = Self {
            fd,
            watches,
            targets,
            dirs: HashMap::new(),
            buffer: vec![0; 64 * 1024],
        };
        // At start, a directory that cannot be watched is an error.
        for dir in watcher.wanted().await {
            watcher
                .watches
                .add(&dir, mask())
                .map_err(|source| WatchError::InotifyError {
                    path: dir.clone(),
                    source,
                })?;
        }
        watcher.rewatch().await;
        Ok(Some(watcher))
    }

    /// Waits for a burst of changes to watched paths and its end; returns
    /// the paths that changed (for the log).
    pub async fn next_change(&mut self) -> BTreeSet<PathBuf> {
        let mut changed = BTreeSet::new();
        while changed.is_empty() {
            changed = self.read().await;
        }
        let began = Instant::now();
        let mut quiet_until = began + QUIET;
        loop {
            tokio::select! {
                more = self.read() => {
                    if !more.is_empty() {
                        changed.extend(more);
                        quiet_until = (Instant::now() + QUIET).min(began + MAX_BURST);
                    }
                }
                _ = tokio::time::sleep_until(quiet_until) => break,
            }
        }
        self.rewatch().await;
        changed
    }

    /// Reads the events ready now (waits for some); returns the watched
    /// paths they are about.
    async fn read(&mut self) -> BTreeSet<PathBuf> {
        let mut guard = match self.fd.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                // Cannot happen with a registered fd; do not spin if it does.
                warn!(%error, "--watch: cannot wait for inotify events");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return BTreeSet::new();
            }
        };
        let buffer = &mut self.buffer;
        let events: Vec<(WatchDescriptor, EventMask, Option<std::ffi::OsString>)> =
            match guard.try_io(|inotify| inotify.get_mut().read_events(buffer)) {
                Ok(Ok(events)) => events
                    .map(|e| (e.wd, e.mask, e.name.map(OsStr::to_owned)))
                    .collect(),
                Ok(Err(error)) => {
                    warn!(%error, "--watch: cannot read inotify events");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return BTreeSet::new();
                }
                Err(_would_block) => return BTreeSet::new(),
            };
        let mut changed = BTreeSet::new();
        for (wd, mask, name) in events {
            if mask.contains(EventMask::Q_OVERFLOW) {
                warn!("--watch: inotify queue overflow: counted as a change");
                changed.extend(self.targets.iter().map(|t| t.path().to_owned()));
                continue;
            }
            if mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&wd) else {
                continue;
            };
            for target in &self.targets {
                if target.is_about(dir, name.as_deref()) {
                    debug!(dir = %dir.display(), name = ?name, ?mask, "--watch: change");
                    changed.insert(target.path().to_owned());
                }
            }
        }
        changed
    }

    /// The directories the targets need watched now (a directory walk, on
    /// a blocking thread).
    async fn wanted(&self) -> BTreeSet<PathBuf> {
        let targets = self.targets.clone();
        tokio::task::spawn_blocking(move || wanted(&targets))
            .await
            .unwrap_or_default()
    }

    /// Watches what is wanted now, and only that.
    async fn rewatch(&mut self) {
        let wanted = self.wanted().await;
        let mut dirs = HashMap::new();
        for dir in &wanted {
            match self.watches.add(dir, mask()) {
                Ok(wd) => {
                    dirs.insert(wd, dir.clone());
                }
                // Gone meanwhile (the next change adds it back if it returns).
                Err(error) => debug!(dir = %dir.display(), %error, "--watch: not watched"),
            }
        }
        for (wd, dir) in self.dirs.drain() {
            if !dirs.contains_key(&wd) {
                debug!(dir = %dir.display(), "--watch: no longer watched");
                let _ = self.watches.remove(wd);
            }
        }
        self.dirs = dirs;
    }
}

impl Target {
    /// The `--watch` path.
    pub fn path(&self) -> &Path {
        match self {
            Self::File { path, .. } | Self::Dir { path, .. } => path,
        }
    }
}

/// The directories `targets` need watched now.
fn wanted(targets: &[Target]) -> BTreeSet<PathBuf> {
    let mut wanted = BTreeSet::new();
    for target in targets {
        for (dir, tree) in target.dirs() {
            if tree {
                subdirectories(&dir, &mut wanted);
            } else {
                wanted.insert(dir);
            }
        }
    }
    wanted
}

/// Adds `dir` and its subdirectories to `found`: not through symlinks, not
/// into `..`-prefixed ones (module comment of [`paths`]), not into ones
/// another user can write to (warned). Blocking: a directory walk.
#[allow(clippy::disallowed_methods)] // on a blocking thread (see `Watcher::wanted`)
fn subdirectories(dir: &Path, found: &mut BTreeSet<PathBuf>) {
    if !found.insert(dir.to_owned()) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        use std::os::unix::ffi::OsStrExt;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || entry.file_name().as_bytes().starts_with(b"..") {
            continue;
        }
        let sub = entry.path();
        if let Some(why) = unsafe_dir(&sub, true) {
            warn!(dir = %sub.display(), "--watch: not watched: it is {why}");
            continue;
        }
        subdirectories(&sub, found);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Waits for the next change, or `None` within `wait`.
    async fn change(w: &mut Watcher, wait: Duration) -> Option<BTreeSet<PathBuf>> {
        tokio::time::timeout(wait, w.next_change()).await.ok()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn renames_symlink_swaps_and_bursts_are_one_change_each() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("conf");
        std::fs::create_dir(&d).unwrap();
        let file = d.join("app.conf");
        std::fs::write(&file, "1").unwrap();
        let mut w = Watcher::start(std::slice::from_ref(&file))
            .await
            .unwrap()
            .unwrap();
        // Reading is no change.
        let _ = std::fs::read(&file).unwrap();
        assert_eq!(change(&mut w, Duration::from_millis(400)).await, None);
        // Atomic rename.
        std::fs::write(d.join(".app.conf.tmp"), "2").unwrap();
        std::fs::rename(d.join(".app.conf.tmp"), &file).unwrap();
        let got = change(&mut w, Duration::from_secs(2)).await;
        assert_eq!(got, Some(BTreeSet::from([file.clone()])));
        // A sibling is not the file.
        std::fs::write(d.join("other.conf"), "x").unwrap();
        assert_eq!(change(&mut w, Duration::from_millis(400)).await, None);
        // A burst of writes: one change.
        let writer = tokio::spawn({
            let file = file.clone();
            async move {
                for i in 0..20 {
                    std::fs::write(&file, i.to_string()).unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        assert!(change(&mut w, Duration::from_secs(3)).await.is_some());
        writer.await.unwrap();
        assert_eq!(change(&mut w, Duration::from_millis(400)).await, None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_configmap_swap_and_new_subdirectories_are_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("cm");
        std::fs::create_dir(&d).unwrap();
        std::fs::create_dir(d.join("..2026_1")).unwrap();
        std::fs::write(d.join("..2026_1/f"), "1").unwrap();
        symlink("..2026_1", d.join("..data")).unwrap();
        symlink("..data/f", d.join("f")).unwrap();
        let file = d.join("f");
        let mut wf = Watcher::start(std::slice::from_ref(&file))
            .await
            .unwrap()
            .unwrap();
        let mut wd = Watcher::start(std::slice::from_ref(&d))
            .await
            .unwrap()
            .unwrap();
        std::fs::create_dir(d.join("..2026_2")).unwrap();
        std::fs::write(d.join("..2026_2/f"), "2").unwrap();
        symlink("..2026_2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..2026_1")).unwrap();
        assert_eq!(
            change(&mut wf, Duration::from_secs(2)).await,
            Some(BTreeSet::from([file.clone()]))
        );
        assert_eq!(
            change(&mut wd, Duration::from_secs(2)).await,
            Some(BTreeSet::from([d.clone()]))
        );
        // A new subdirectory is watched after the change that made it.
        std::fs::create_dir(d.join("sites")).unwrap();
        assert!(change(&mut wd, Duration::from_secs(2)).await.is_some());
        std::fs::write(d.join("sites/a.conf"), "a").unwrap();
        assert!(change(&mut wd, Duration::from_secs(2)).await.is_some());
        // The directory renamed over as a whole.
        let new = tmp.path().join("cm.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::rename(&new, &d).unwrap();
        assert!(change(&mut wd, Duration::from_secs(2)).await.is_some());
        std::fs::write(d.join("g"), "g").unwrap();
        assert!(
            change(&mut wd, Duration::from_secs(2)).await.is_some(),
            "the new directory is watched"
        );
    }
}
