//! A cgroup v2 directory per generation: which processes are a generation
//! is a kernel fact, not a guess from process groups and trees. A server
//! that escapes its process group (`setsid()`, a daemon) is still in its
//! generation's cgroup; it is found, signalled and killed with it.
//!
//! Layout, below the controller's own cgroup `BASE` (`/` on this host; a
//! service's cgroup under systemd with `Delegate=yes`):
//!
//! ```text
//! BASE/reloader.NAME-HASH/          the instance (HASH: of its control socket path,
//! BASE/reloader.NAME-HASH/gen-N/    so instances named alike never share it)
//! BASE/reloader.NAME-HASH/controller/   the controller itself, when BASE is not the
//!                                       root: cgroup v2 lets only leaves hold
//!                                       processes once controllers are enabled
//! ```
//!
//! A generation's leader enters `gen-N` before any of the server's code
//! runs (between the fork and the spawn gate). The generation has ended
//! when `gen-N` is empty (`cgroup.events` says `populated 0`; the owner
//! learns it by inotify, [`Watch`]), not when its leader exits. Killing
//! writes `cgroup.kill` (Linux ≥ 5.14), or SIGKILLs every member through a
//! pidfd opened before its membership was checked again. Every call here
//! reads or writes cgroupfs and runs on a blocking thread.
//!
//! Where no writable cgroup v2 exists (a v1-only host, a read-only
//! `/sys/fs/cgroup` in a container), [`prepare`] says what is missing and
//! how to fix it, and the instance runs as before: generations are process
//! groups and trees.

#![allow(clippy::disallowed_methods)] // cgroupfs reads and writes: on blocking threads only

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tracing::{debug, warn};

/// Where the cgroup v2 hierarchy is, and the controller's place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// `reloader.NAME-HASH`, absolute.
    dir: PathBuf,
    /// The mount point of cgroup2.
    mount: PathBuf,
    /// `cgroup.kill` exists (Linux ≥ 5.14).
    pub kill_file: bool,
    /// Controllers enabled for the generations (`memory`, `cpu`, `pids`
    /// where the hierarchy has them).
    pub controllers: Vec<String>,
}

/// Why generations get no cgroups, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The controller's own cgroup v2 directory (absolute) and the mount.
pub fn own() -> Result<(PathBuf, PathBuf), Unavailable> {
    let me = procfs::process::Process::myself()
        .map_err(|e| Unavailable(format!("cannot read /proc/self: {e}")))?;
    let path = me
        .cgroups()
        .map_err(|e| Unavailable(format!("cannot read /proc/self/cgroup: {e}")))?
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
        .ok_or_else(|| {
            Unavailable(
                "the controller is in no cgroup v2 (a cgroup v1 only host): mount cgroup2 (it \
                 is at /sys/fs/cgroup/unified on hybrid hosts) or boot with \
                 systemd.unified_cgroup_hierarchy=1"
                    .into(),
            )
        })?;
    let mount = me
        .mountinfo()
        .map_err(|e| Unavailable(format!("cannot read /proc/self/mountinfo: {e}")))?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or_else(|| {
            Unavailable(
                "cgroup2 is not mounted here: mount it (`mount -t cgroup2 none /sys/fs/cgroup`), \
                 or in a container give it a delegated cgroup (Docker: --cgroupns=private; \
                 Kubernetes: the default cgroup v2 nodes)"
                    .into(),
            )
        })?;
    let dir = mount.join(path.trim_start_matches('/'));
    if !dir.join("cgroup.procs").exists() {
        return Err(Unavailable(format!(
            "the controller's cgroup {} is not visible here (another cgroup namespace or \
             mount): mount cgroup2 for this namespace",
            dir.display()
        )));
    }
    Ok((dir, mount))
}

/// Sets up the instance's cgroup `reloader.NAME-HASH` below the
/// controller's own (moving the controller into a leaf of it when its own
/// is not the root), enabling what controllers it can for the
/// generations. `key` makes the name unique (the control socket's path).
/// The controllers the generations' cgroups below `base` (the
/// controller's own cgroup v2, in the hierarchy mounted at `mount`) can
/// get from [`prepare`]: at the hierarchy's root, every controller it
/// offers (prepare enables them there); anywhere else only what `base`
/// already enables for its children, since prepare never writes the
/// controller's own cgroup there (see the comment in prepare).
pub fn offered_to_generations(base: &Path, mount: &Path) -> Vec<String> {
    let file = if base == mount {
        "cgroup.controllers"
    } else {
        "cgroup.subtree_control"
    };
    std::fs::read_to_string(base.join(file))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

pub fn prepare(name: &str, key: &Path) -> Result<Instance, Unavailable> {
    let (base, mount) = own()?;
    let dir = base.join(format!("reloader.{name}-{:08x}", hash(key)));
    let unwritable = |what: &Path, e: io::Error| {
        Unavailable(format!(
            "cannot write the cgroup {} ({e}): reloader needs a writable cgroup v2 below its own \
             — under systemd, `Delegate=yes` in its unit; in a container, a delegated cgroup \
             (Docker: --cgroupns=private with a writable /sys/fs/cgroup; Kubernetes: cgroup v2 \
             nodes)",
            what.display()
        ))
    };
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(unwritable(&dir, e)),
    }
    if base != mount {
        // Not the root: the controller (and what it starts itself, the log
        // keeper) moves into a leaf, so that the cgroups above may enable
        // controllers for the generations.
        let leaf = dir.join("controller");
        match std::fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(unwritable(&leaf, e)),
        }
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| unwritable(&leaf, e))?;
    }
    let available = offered_to_generations(&base, &mount);
    let mut controllers = Vec::new();
    for wanted in ["cpu", "memory", "pids"] {
        if !available.iter().any(|c| c == wanted) {
            continue;
        }
        // The controller's own cgroup is written only when it is the
        // hierarchy's root. Any other is where whoever started the
        // controller puts the next one (systemd restarting the unit after
        // a crash or a hand-over), and cgroup v2 lets no process into a
        // cgroup that enables controllers for its children: systemd's
        // restart failed with 219/CGROUP. Elsewhere the generations get
        // what that cgroup already enables for its children (under
        // systemd's Delegate=yes: none).
        let enabled = if base == mount {
            std::fs::write(base.join("cgroup.subtree_control"), format!("+{wanted}"))
        } else {
            Ok(())
        }
        .and_then(|()| std::fs::write(dir.join("cgroup.subtree_control"), format!("+{wanted}")));
        match enabled {
            Ok(()) => controllers.push(wanted.to_owned()),
            Err(error) => debug!(controller = wanted, %error, "controller not enabled"),
        }
    }
    Ok(Instance {
        kill_file: dir.join("cgroup.kill").exists() || kill_file_supported(&mount),
        dir,
        mount,
        controllers,
    })
}

/// Whether this kernel has `cgroup.kill` (only non-root cgroups have the
/// file: look for it in any child of the root).
fn kill_file_supported(mount: &Path) -> bool {
    std::fs::read_dir(mount)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .any(|e| e.path().join("cgroup.kill").exists())
}

/// FNV-1a, stable across builds.
fn hash(key: &Path) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as u32
}

impl Instance {
    /// Generation `number`'s cgroup.
    pub fn generation(&self, number: u64) -> PathBuf {
        self.dir.join(format!("gen-{number}"))
    }

    /// Creates generation `number`'s cgroup (a leftover of the same name,
    /// empty, is reused), still empty: what must be in place before its
    /// first process enters (the `--inject-reuseport` programs) is
    /// attached between this and [`admit`].
    pub fn create(&self, number: u64) -> io::Result<PathBuf> {
        let dir = self.generation(number);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(dir)
    }

    /// A scratch cgroup of the instance named `name` (not a generation's:
    /// `existing` and the sweeps never see it). The caller removes it.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The generations whose cgroups exist, by number.
    pub fn existing(&self) -> BTreeMap<u64, PathBuf> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let number = e.file_name().to_str()?.strip_prefix("gen-")?.parse().ok()?;
                Some((number, e.path()))
            })
            .collect()
    }

    /// Removes the instance's cgroup once no generation is left in it (the
    /// controller's own leaf cannot go while it lives in it).
    pub fn remove(&self) {
        for dir in self.existing().into_values() {
            let _ = remove(&dir);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Moves `pid` into the cgroup `dir`.
pub fn admit(dir: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Whether `dir` (or a cgroup below it) holds a process.
pub fn populated(dir: &Path) -> io::Result<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(events
        .lines()
        .any(|l| l.split_whitespace().eq(["populated", "1"])))
}

/// The processes of `dir` and of the cgroups below it.
pub fn members(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        dirs.extend(
            std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    pids
}

/// The members of `dir` whose parent is not a member: the processes the
/// generation's server started from (its leader while it lives; a daemon
/// whose parent exited; the roots of escaped trees).
pub fn roots(dir: &Path) -> Vec<u32> {
    let members = members(dir);
    members
        .iter()
        .copied()
        .filter(|pid| {
            procfs::process::Process::new(*pid as i32)
                .and_then(|p| p.stat())
                .is_ok_and(|s| !members.contains(&(s.ppid as u32)))
        })
        .collect()
}

/// Whether process `pid` is in `dir` (or below it) now.
fn is_member(pid: u32, dir: &Path, mount: &Path) -> bool {
    let relative = format!("/{}", dir.strip_prefix(mount).unwrap_or(dir).display());
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.cgroups())
        .is_ok_and(|groups| {
            groups.into_iter().any(|g| {
                g.hierarchy == 0
                    && (g.pathname == relative || g.pathname.starts_with(&format!("{relative}/")))
            })
        })
}

/// Sends `signal` to `pids` that are still members of `dir`: each through a
/// pidfd opened before its membership is checked again, so a pid reused by
/// a process outside the cgroup is never signalled.
fn signal_members(pids: &[u32], dir: &Path, mount: &Path, signal: nix::sys::signal::Signal) {
    for &pid in pids {
        let Some(pid_arg) = rustix::process::Pid::from_raw(pid as i32) else {
            continue;
        };
        let Ok(pidfd) = rustix::process::pidfd_open(pid_arg, rustix::process::PidfdFlags::empty())
        else {
            continue;
        };
        if !is_member(pid, dir, mount) {
            continue;
        }
        if let Some(signal) = rustix::process::Signal::from_named_raw(signal as i32) {
            let _ = rustix::process::pidfd_send_signal(&pidfd, signal);
        }
    }
}

/// Sends `signal` to the roots of `dir` ([`roots`]).
pub fn signal_roots(dir: &Path, mount: &Path, signal: nix::sys::signal::Signal) {
    signal_members(&roots(dir), dir, mount, signal);
}

/// Kills every process of `dir`: `cgroup.kill` where the kernel has it,
/// else SIGKILL to each member (repeated while members remain and fork,
/// at most a few rounds).
pub fn kill(dir: &Path, mount: &Path) {
    // Opened without O_CREAT: where the file is missing (Linux < 5.14)
    // creating it in cgroupfs fails with EACCES, which hid the reason.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut file| io::Write::write_all(&mut file, b"1"));
    match written {
        Ok(()) => {
            debug!(cgroup = %dir.display(), "killed through cgroup.kill");
            return;
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound && dir.exists() => {
            tracing::info!(
                cgroup = %dir.display(),
                "cgroup.kill is missing (Linux < 5.14): SIGKILL to each member instead"
            );
        }
        Err(error) => debug!(cgroup = %dir.display(), %error, "cgroup.kill"),
    }
    for _ in 0..16 {
        let pids = members(dir);
        if pids.is_empty() {
            return;
        }
        signal_members(&pids, dir, mount, nix::sys::signal::Signal::SIGKILL);
    }
    warn!(cgroup = %dir.display(), "members remain after SIGKILL rounds");
}

/// Removes `dir` and the cgroups a server made below it (deepest first);
/// fails while any is populated.
pub fn remove(dir: &Path) -> io::Result<()> {
    let below: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    for sub in below {
        remove(&sub)?;
    }
    std::fs::remove_dir(dir)
}

impl Instance {
    /// The mount point (for membership checks).
    pub fn mount(&self) -> &Path {
        &self.mount
    }
}

/// Watches generations' `cgroup.events` (inotify: a change of `populated`
/// is a modification of the file); the owner learns of each change.
#[derive(Clone)]
pub struct Watch {
    watches: Watches,
    by_descriptor: Arc<Mutex<BTreeMap<WatchDescriptor, (u64, PathBuf)>>>,
}

impl Watch {
    /// Starts watching; the returned inotify is read by the caller (an
    /// async task).
    pub fn new() -> io::Result<(Self, Inotify)> {
        let inotify = Inotify::init()?;
        Ok((
            Self {
                watches: inotify.watches(),
                by_descriptor: Arc::default(),
            },
            inotify,
        ))
    }

    /// Watches generation `number`'s cgroup `dir`.
    pub fn add(&self, number: u64, dir: &Path) -> io::Result<()> {
        let descriptor = self
            .watches
            .clone()
            .add(dir.join("cgroup.events"), WatchMask::MODIFY)?;
        self.by_descriptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(descriptor, (number, dir.to_owned()));
        Ok(())
    }

    /// The generation and cgroup a watch is for.
    pub fn which(&self, descriptor: &WatchDescriptor) -> Option<(u64, PathBuf)> {
        self.by_descriptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(descriptor)
            .cloned()
    }

    /// Forgets generation `number`'s watch (its cgroup is gone).
    pub fn forget(&self, number: u64) {
        let mut map = self.by_descriptor.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<WatchDescriptor> = map
            .iter()
            .filter(|(_, (n, _))| *n == number)
            .map(|(d, _)| d.clone())
            .collect();
        for descriptor in gone {
            map.remove(&descriptor);
            let _ = self.watches.clone().remove(descriptor);
        }
    }
}
