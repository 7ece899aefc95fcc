//! The state file: what a controller leaves behind for its successor, so that killing the
//! controller (SIGKILL, OOM) never takes the service down:
//!
//! - the steering maps, pinned in bpffs (the program stays attached to the
//!   reuseport groups on its own, and keeps using those maps);
//! - a state file beside the control socket (`NAME.state.json`), written
//!   atomically (write a temporary file, then rename) on every generation
//!   change: which generations live, in which slot, with which pid, and
//!   the pid's start time, which guards against pid reuse.
//!
//! A controller started with the same instance finds both and adopts the
//! generations whose processes still run; it cleans up (and reports) state
//! whose processes are gone.
//!
//! This file holds the format and its load and save; what a starting
//! controller does with each saved generation is decided in `adoption`.
//!
//! Both carry a layout version, because the successor may be another
//! reloader binary (`reloader handover`, a package upgrade): the file's
//! `version` (its format) and `maps_layout` (the pinned maps' layout,
//! [`crate::steering::MAPS_LAYOUT`]). A binary adopts the formats from
//! [`OLDEST_VERSION`] to [`VERSION`] and the maps layouts from
//! [`crate::steering::OLDEST_MAPS_LAYOUT`] to its own; for anything else
//! [`load`] says so ([`LoadError::Incompatible`]) and the
//! controller refuses to start, deleting and signalling nothing: the
//! generations keep serving, and the binary that wrote the file adopts
//! them again.

#![allow(clippy::disallowed_methods)] // the state file: read at start-up and written by the persister, both on blocking threads

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use self::adoption::{Recovery, Verdict, recovery};
use crate::{generation::State, steering::Limits};

mod adoption;
#[cfg(test)]
mod tests;

/// The state file's format version (2: steering maps sized per instance,
/// their sizes recorded; 3: the maps' layout recorded).
pub const VERSION: u32 = 3;
/// The oldest format this binary adopts (1 recorded no map sizes).
pub const OLDEST_VERSION: u32 = 2;
/// The maps' layout a version 2 file implies: every binary that wrote
/// version 2 used layout 1.
const VERSION_2_MAPS_LAYOUT: u32 = 1;

/// A generation as the state file records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGeneration {
    pub number: u64,
    pub slot: u32,
    pub pid: u32,
    /// The process's start time (`/proc/PID/stat` field 22, clock ticks
    /// since boot): a different value means the pid was reused.
    pub start_time: u64,
    pub state: State,
    /// Cookies of the listening sockets registered for it: a successor
    /// adopts it only if its process still holds one of them.
    #[serde(default)]
    pub sockets: Vec<u64>,
    /// The digest of its `--config` files (absent in files of older
    /// controllers: still version 2, read as `None`).
    #[serde(default)]
    pub config_sha256: Option<String>,
}

/// The sizes of the pinned steering maps: a successor must load its
/// object with the same ones to reuse them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLimits {
    pub listeners: u32,
    pub slots: u32,
    pub sockets_per_slot: u32,
}

impl From<Limits> for SavedLimits {
    fn from(l: Limits) -> Self {
        Self {
            listeners: l.listeners,
            slots: l.slots,
            sockets_per_slot: l.sockets_per_slot,
        }
    }
}

impl From<SavedLimits> for Limits {
    fn from(l: SavedLimits) -> Self {
        Self {
            listeners: l.listeners,
            slots: l.slots,
            sockets_per_slot: l.sockets_per_slot,
        }
    }
}

/// A hold (`--keep-previous`) under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHold {
    pub held: u64,
    pub successor: u64,
    /// When it ends, in milliseconds since the epoch.
    pub until_unix_ms: u64,
}

/// The state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// The pinned maps' layout ([`crate::steering::MAPS_LAYOUT`] of the
    /// binary that created them).
    #[serde(default = "version_2_maps_layout")]
    pub maps_layout: u32,
    pub controller_pid: u32,
    /// The `--listen` values, as `reloader status` shows them.
    pub listen: Vec<String>,
    pub limits: SavedLimits,
    pub next_generation: u64,
    pub generations: Vec<SavedGeneration>,
    /// The hold under way, if any.
    #[serde(default)]
    pub hold: Option<SavedHold>,
}

impl Saved {
    /// Checks what no well-written state file lacks; names the field that
    /// is wrong. (The file is read back as root and decides which processes
    /// are adopted and signalled: a duplicate generation once made a stop
    /// wait its whole drain timeout, a duplicate slot a spurious crash
    /// restart.)
    pub fn check(&self) -> Result<(), String> {
        if self.limits.slots == 0 || self.limits.listeners == 0 {
            return Err(format!(
                "limits is {:?}: the maps have no slot or no listener",
                self.limits
            ));
        }
        if self.listen.is_empty() || self.listen.len() > self.limits.listeners as usize {
            return Err(format!(
                "listen has {} addresses for maps of {} listeners",
                self.listen.len(),
                self.limits.listeners
            ));
        }
        let mut numbers = std::collections::BTreeSet::new();
        let mut slots = std::collections::BTreeMap::new();
        for (i, g) in self.generations.iter().enumerate() {
            if !numbers.insert(g.number) {
                return Err(format!(
                    "generations[{i}].number is {}, recorded twice",
                    g.number
                ));
            }
            if g.number >= self.next_generation {
                return Err(format!(
                    "generations[{i}].number is {}, not below next_generation {}",
                    g.number, self.next_generation
                ));
            }
            if g.slot >= self.limits.slots {
                return Err(format!(
                    "generations[{i}].slot is {}, but the maps have {} slots",
                    g.slot, self.limits.slots
                ));
            }
            if g.pid == 0 {
                return Err(format!("generations[{i}].pid is 0"));
            }
            if g.state.is_live()
                && let Some(other) = slots.insert(g.slot, g.number)
            {
                return Err(format!(
                    "generations[{i}].slot is {}, the slot of live generation {other} too",
                    g.slot
                ));
            }
        }
        if let Some(hold) = self.hold {
            for (field, number) in [("hold.held", hold.held), ("hold.successor", hold.successor)] {
                if !numbers.contains(&number) {
                    return Err(format!("{field} is {number}, a generation not recorded"));
                }
            }
        }
        Ok(())
    }

    pub fn new(
        listen: Vec<String>,
        limits: Limits,
        next_generation: u64,
        generations: Vec<SavedGeneration>,
    ) -> Self {
        Self {
            version: VERSION,
            maps_layout: crate::steering::MAPS_LAYOUT,
            controller_pid: std::process::id(),
            listen,
            limits: limits.into(),
            next_generation,
            generations,
            hold: None,
        }
    }
}

fn version_2_maps_layout() -> u32 {
    VERSION_2_MAPS_LAYOUT
}

/// Why a state file cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadError {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// It is not a state file (or one damaged beyond reading).
    #[error("{path} is not a reloader state file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// It reads, but holds what no controller writes ([`Saved::check`]).
    #[error("{path} is invalid: {why} (nothing was deleted)")]
    Invalid { path: PathBuf, why: String },
    /// Another reloader wrote it in a format or with maps this binary
    /// does not adopt (`what` says which).
    #[error("{path} was written by another version of reloader: {what}")]
    Incompatible { path: PathBuf, what: String },
}

/// Whether this binary can adopt what `saved` records: its format and the
/// layout of the maps it names.
pub fn compatible(saved: &Saved) -> Result<(), String> {
    check_version(saved.version)?;
    let (oldest, layout) = (
        crate::steering::OLDEST_MAPS_LAYOUT,
        crate::steering::MAPS_LAYOUT,
    );
    if !(oldest..=layout).contains(&saved.maps_layout) {
        return Err(format!(
            "its pinned steering maps have layout {}, and this binary adopts layouts {oldest} to \
             {layout}",
            saved.maps_layout
        ));
    }
    Ok(())
}

fn check_version(version: u32) -> Result<(), String> {
    if (OLDEST_VERSION..=VERSION).contains(&version) {
        return Ok(());
    }
    Err(format!(
        "state format {version}, and this binary adopts formats {OLDEST_VERSION} to {VERSION} \
         ({} binary wrote it)",
        if version > VERSION {
            "a newer"
        } else {
            "an older"
        }
    ))
}

/// Where instance files live: beside the control socket.
pub fn state_path(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("state.json")
}

/// The bpffs directory of an instance. The name alone is not unique (every
/// instance started without `--name` is `default`, one per network
/// namespace or control socket), so the control socket path is part of it.
pub fn pin_dir(name: &str, control_socket: &Path) -> PathBuf {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in control_socket.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from("/sys/fs/bpf/reloader").join(format!("{name}-{:08x}", hash as u32))
}

/// Writes `saved` to `path` atomically.
pub fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    // A leftover temporary file (a killed writer) goes; the new one is
    // created exclusively, never through a symlink.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?)?;
    // No fsync: the file describes running processes, which a host crash
    // takes with it; what a controller's death needs is that the file is
    // either the old or the new one, which the rename gives through the
    // page cache. (An fsync on a disk-backed directory cost a reload tens
    // of milliseconds: the drain waits for this write.)
    std::fs::rename(&tmp, path)
}

/// Reads the state file, if there is one (`shown`: its path for messages).
/// A file that cannot be read or adopted, or does not hold what a
/// controller writes ([`Saved::check`]), is reported as an error naming
/// what is wrong; it is left in place.
pub fn load(path: &Path, shown: &Path) -> Result<Option<Saved>, LoadError> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .and_then(|mut f| {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map(|_| bytes)
        });
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LoadError::ReadError {
                path: shown.to_owned(),
                source,
            });
        }
    };
    let malformed = |e: serde_json::Error| LoadError::Malformed {
        path: shown.to_owned(),
        reason: e.to_string(),
    };
    // The version first: another format may not parse as this one.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let Versioned { version } = serde_json::from_slice(&bytes).map_err(malformed)?;
    let incompatible = |what| LoadError::Incompatible {
        path: shown.to_owned(),
        what,
    };
    check_version(version).map_err(incompatible)?;
    let saved: Saved = serde_json::from_slice(&bytes).map_err(malformed)?;
    compatible(&saved).map_err(incompatible)?;
    saved.check().map_err(|why| LoadError::Invalid {
        path: shown.to_owned(),
        why,
    })?;
    Ok(Some(saved))
}
