//! The instance's runtime directory — the control socket's, holding
//! `NAME.lock`, `NAME.state.json`, `NAME.keeper`, per-generation notify
//! sockets and the socket itself — proven ours, then opened once.
//!
//! reloader runs as root and trusts what it reads back from that directory
//! (which generations to adopt, which pids to signal), so before any file is
//! touched the directory is proven to be ours: a real directory (not a
//! symlink), owned by our uid, not writable by group or others; and every
//! directory above it, as named and as resolved, owned by root or by us and
//! writable by nobody else, but for a root-owned sticky directory such as
//! `/tmp`. A missing one is created with mode 0700. Another user's
//! `/tmp/reloader-UID` (or a symlink planted there) is refused with a
//! message that says what to do.
//!
//! Then it is opened once ([`RuntimeDir`]), and every file in it is reached
//! through that descriptor (`/proc/self/fd/N/NAME`): an ancestor swapped for
//! a symlink after the checks cannot redirect a later write of a root-owned
//! file into another user's directory. Files are opened without following
//! symlinks.

#![allow(clippy::disallowed_methods)] // start-up and clean-up, on blocking threads only (`instance::startup`)

use std::{
    ffi::OsStr,
    fs::{DirBuilder, File, OpenOptions},
    io::{Read, Seek, Write},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// The instance's directory, open for the controller's life.
#[derive(Debug)]
pub struct RuntimeDir {
    fd: OwnedFd,
    /// Its path as named (for messages, and for clients and servers, which
    /// reach it by path).
    real: PathBuf,
}

impl RuntimeDir {
    /// Proves `dir` ours ([`secure_dir`]) and opens it; the descriptor is
    /// checked to be the directory that was proven.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        secure_dir(dir)?;
        let checked = std::fs::symlink_metadata(dir)
            .with_context(|| format!("failed to look at {}", dir.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
            .with_context(|| format!("failed to open {}", dir.display()))?;
        let opened = file.metadata()?;
        if (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
            bail!(
                "{} changed while it was checked: another process is replacing it; refusing",
                dir.display()
            );
        }
        Ok(Self {
            fd: file.into(),
            real: dir.to_owned(),
        })
    }

    /// `name` in it, reached through the descriptor (see the module
    /// comment): for every file operation of the controller.
    pub fn path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name.as_ref())
    }

    /// `name` in it, by its path as named: for other processes (a server's
    /// `NOTIFY_SOCKET`) and for messages.
    pub fn named(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.real.join(name.as_ref())
    }

    /// The descriptor's number (a child that inherits it at the same
    /// number reaches the directory through the same `/proc/self/fd` path).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Makes sure `dir` exists and is ours alone (see the module comment).
pub fn secure_dir(dir: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dir.parent()
        && !parent.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("failed to create {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("failed to look at {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let problem = if meta.file_type().is_symlink() {
        Some("is a symlink".to_owned())
    } else if !meta.is_dir() {
        Some("is not a directory".to_owned())
    } else if meta.uid() != me {
        Some(format!("belongs to uid {}, not to uid {me}", meta.uid()))
    } else if meta.permissions().mode() & 0o022 != 0 {
        Some(format!(
            "is writable by {} (mode {:o})",
            if meta.permissions().mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.permissions().mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        bail!(
            "refusing the runtime directory {}: it {problem}, so another user could plant or \
             replace the files reloader trusts there (its lock, state and control socket). \
             Remove it, or point reloader elsewhere (XDG_RUNTIME_DIR, or --control-socket in a \
             directory only you can write)",
            dir.display()
        );
    }
    // And above it: whoever can rename an ancestor can put another
    // directory in its place (as named, and as symlinks resolve it).
    let resolved = std::fs::canonicalize(dir)
        .with_context(|| format!("failed to resolve {}", dir.display()))?;
    for chain in [dir, resolved.as_path()] {
        for ancestor in chain.ancestors().skip(1) {
            if let Some(why) = crate::watch::unsafe_dir(ancestor, false) {
                bail!(
                    "refusing the runtime directory {}: {} above it is {why}, so another user \
                     could replace it with a directory of their own and have reloader (root) \
                     write its state there. Use a directory whose every ancestor only root or \
                     you can change (the default /run/reloader as root), or fix the ancestor's \
                     owner and mode",
                    dir.display(),
                    ancestor.display()
                );
            }
        }
    }
    Ok(())
}

/// Opens `path` for reading and writing without following a symlink,
/// creating it (mode 0600) if missing.
pub fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The instance lock, held for the controller's lifetime; dropping it
/// removes the file, then releases the lock (a killed controller leaves the
/// file, which the next one reuses).
#[derive(Debug)]
pub struct InstanceLock {
    lock: Option<nix::fcntl::Flock<File>>,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock of instance `name` (`NAME.lock` beside `socket`), so
    /// two controllers never run one instance.
    ///
    /// The file is removed at a clean exit; so that a controller starting
    /// meanwhile cannot hold a lock on a file that is gone, a lock counts
    /// only if the path still names the locked file afterwards.
    pub fn take(path: &Path, name: &str) -> anyhow::Result<Self> {
        let path = path.to_owned();
        for _ in 0..10 {
            let file = open_nofollow(&path)
                .with_context(|| format!("failed to open the instance lock {}", path.display()))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    let locked = lock.metadata()?.ino();
                    let named = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
                    if named != Some(locked) {
                        // Released and removed by the previous holder
                        // between our open and our lock: take the new one.
                        continue;
                    }
                    lock.set_len(0)?;
                    lock.rewind()?;
                    write!(lock, "{}", std::process::id())?;
                    return Ok(Self {
                        lock: Some(lock),
                        path,
                    });
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
                Err((_, errno)) => {
                    return Err(errno)
                        .with_context(|| format!("failed to lock {}", path.display()));
                }
            }
        }
        bail!(
            "the instance lock {} keeps being replaced: another controller is starting and \
             stopping in a loop",
            path.display()
        )
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_directory_is_created_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        secure_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        secure_dir(&dir).expect("ours already");
    }

    #[test]
    fn open_or_planted_directories_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = secure_dir(&open).unwrap_err().to_string();
        assert!(error.contains("writable by everyone"), "{error}");

        let target = base.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = secure_dir(&link).unwrap_err().to_string();
        assert!(error.contains("is a symlink"), "{error}");
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let base = tempfile::tempdir().unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = base.path().join("x.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(open_nofollow(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn the_lock_is_exclusive_and_its_file_removed_at_release() {
        let base = tempfile::tempdir().unwrap();
        let socket = base.path().join("x.sock");
        let lock = InstanceLock::take(&socket.with_extension("lock"), "x").unwrap();
        let error = InstanceLock::take(&socket.with_extension("lock"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("controller pid {}", std::process::id())),
            "{error}"
        );
        drop(lock);
        assert!(!socket.with_extension("lock").exists());
        drop(InstanceLock::take(&socket.with_extension("lock"), "x").unwrap());
    }
}
