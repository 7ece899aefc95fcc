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

use crate::{generation::State, steering::Limits};

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

/// Whether a recorded generation's process is still that generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It runs, and is proven ours: same pid and start time, and it holds a
    /// socket recorded for it (or, before it had any, its environment names
    /// this instance and generation).
    Ours,
    /// Its leader is gone, but process `holder` (started at `start_time`)
    /// still holds a socket recorded for it: its workers serve. Adopted by
    /// that holder (the generation is never destroyed while it serves).
    Orphaned { holder: u32, start_time: u64 },
    /// Its leader is gone, but its cgroup still has processes: adopted
    /// through its cgroup (membership is proof).
    InCgroup,
    /// Its process is gone (or the pid was reused: another start time), and
    /// no process holds a socket recorded for it.
    Gone,
    /// A process runs with that pid and start time, but nothing proves it
    /// is ours: never adopted, never signalled. Says what it is.
    Unproven(String),
}

/// What to do with a previous controller's state.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was left behind.
    Fresh,
    /// Generations still run: adopt `live` (the others are gone, or not
    /// proven to be ours).
    Adopt {
        live: Vec<SavedGeneration>,
        gone: Vec<SavedGeneration>,
        unproven: Vec<(SavedGeneration, String)>,
    },
    /// Something was left, but no proven generation serves any more: the
    /// proven ones in `ours` are stopped, the unproven ones left alone.
    Stale {
        ours: Vec<SavedGeneration>,
        gone: Vec<SavedGeneration>,
        unproven: Vec<(SavedGeneration, String)>,
    },
}

/// Decides what to do with `saved`, given each recorded generation's
/// [`Verdict`]. Adoption needs a proven active generation: without one
/// there is nothing to keep serving.
pub fn recovery(saved: Option<&Saved>, verdict: impl Fn(&SavedGeneration) -> Verdict) -> Recovery {
    let Some(saved) = saved else {
        return Recovery::Fresh;
    };
    let (mut ours, mut gone, mut unproven) = (Vec::new(), Vec::new(), Vec::new());
    for g in saved.generations.iter().filter(|g| g.state.is_live()) {
        match verdict(g) {
            Verdict::Ours | Verdict::InCgroup => ours.push(g.clone()),
            Verdict::Orphaned { holder, start_time } => ours.push(SavedGeneration {
                pid: holder,
                start_time,
                ..g.clone()
            }),
            Verdict::Gone => gone.push(g.clone()),
            Verdict::Unproven(what) => unproven.push((g.clone(), what)),
        }
    }
    if ours.iter().any(|g| g.state == State::Active) {
        Recovery::Adopt {
            live: ours,
            gone,
            unproven,
        }
    } else {
        Recovery::Stale {
            ours,
            gone,
            unproven,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(number: u64, pid: u32, state: State) -> SavedGeneration {
        SavedGeneration {
            number,
            slot: number as u32 % 8,
            pid,
            start_time: 1000 + u64::from(pid),
            state,
            sockets: vec![u64::from(pid) * 10],
            config_sha256: Some(format!("{pid:064x}")),
        }
    }

    fn saved(generations: Vec<SavedGeneration>) -> Saved {
        Saved::new(
            vec!["127.0.0.1:80".into()],
            Limits {
                listeners: 1,
                slots: 6,
                sockets_per_slot: 16,
            },
            9,
            generations,
        )
    }

    #[test]
    fn nothing_saved_is_a_fresh_start() {
        assert_eq!(recovery(None, |_| Verdict::Ours), Recovery::Fresh);
    }

    #[test]
    fn a_proven_active_generation_is_adopted_with_its_proven_peers() {
        let s = saved(vec![
            generation(6, 60, State::Exited),
            generation(7, 70, State::Draining),
            generation(8, 80, State::Active),
            generation(9, 90, State::Starting),
            generation(10, 100, State::Draining),
        ]);
        // 7's pid was reused; 100 runs but holds none of its sockets.
        let verdict = |g: &SavedGeneration| match g.pid {
            70 => Verdict::Gone,
            100 => Verdict::Unproven("sleep".into()),
            _ => Verdict::Ours,
        };
        match recovery(Some(&s), verdict) {
            Recovery::Adopt {
                live,
                gone,
                unproven,
            } => {
                assert_eq!(
                    live.iter().map(|g| g.number).collect::<Vec<_>>(),
                    vec![8, 9]
                );
                assert_eq!(gone.iter().map(|g| g.number).collect::<Vec<_>>(), vec![7]);
                assert_eq!(unproven.len(), 1);
                assert_eq!(unproven[0].0.number, 10);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unproven_active_generation_is_neither_adopted_nor_stopped() {
        let s = saved(vec![
            generation(3, 30, State::Active),
            generation(4, 40, State::Draining),
        ]);
        let verdict = |g: &SavedGeneration| match g.pid {
            30 => Verdict::Unproven("sleep (holds no socket recorded for it)".into()),
            _ => Verdict::Ours,
        };
        match recovery(Some(&s), verdict) {
            Recovery::Stale {
                ours,
                gone,
                unproven,
            } => {
                assert_eq!(ours.iter().map(|g| g.number).collect::<Vec<_>>(), vec![4]);
                assert!(gone.is_empty());
                assert_eq!(unproven[0].0.number, 3, "left alone");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn state_files_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state.json");
        assert_eq!(load(&path, &path).unwrap(), None);
        let s = saved(vec![generation(8, 80, State::Active)]);
        save(&path, &s).unwrap();
        assert_eq!(load(&path, &path).unwrap(), Some(s));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(
            load(&path, &path)
                .unwrap_err()
                .to_string()
                .contains("not a reloader state file")
        );
    }

    /// What a newer binary does with what an older one left (and the
    /// reverse): adopt the formats it knows, refuse the others by name,
    /// never touch the file.
    #[test]
    fn older_layouts_are_adopted_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state.json");
        let s = saved(vec![generation(8, 80, State::Active)]);
        assert_eq!(
            (s.version, s.maps_layout),
            (3, crate::steering::MAPS_LAYOUT)
        );
        let write = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut json = serde_json::to_value(&s).unwrap();
            edit(&mut json);
            std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        };
        // Version 2, as the binaries before layouts were recorded wrote it.
        write(&|j| {
            j["version"] = 2.into();
            j.as_object_mut().unwrap().remove("maps_layout");
        });
        let read = load(&path, &path).unwrap().unwrap();
        assert_eq!((read.version, read.maps_layout), (2, 1));
        // A newer format, even one this binary could not parse.
        write(&|j| {
            j["version"] = 4.into();
            j["generations"] = "moved elsewhere".into();
        });
        let error = load(&path, &path).unwrap_err();
        assert!(matches!(error, LoadError::Incompatible { .. }), "{error}");
        assert!(
            error.to_string().contains("state format 4")
                && error.to_string().contains("a newer binary"),
            "{error}"
        );
        write(&|j| j["version"] = 1.into());
        assert!(
            load(&path, &path)
                .unwrap_err()
                .to_string()
                .contains("an older binary")
        );
        // Maps of another layout.
        write(&|j| j["maps_layout"] = 99.into());
        let error = load(&path, &path).unwrap_err().to_string();
        assert!(error.contains("maps have layout 99"), "{error}");
        assert!(path.exists(), "never deleted");
    }

    #[test]
    fn a_version_2_file_without_config_digests_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state.json");
        let s = saved(vec![generation(8, 80, State::Active)]);
        let mut json = serde_json::to_value(&s).unwrap();
        json["generations"][0]
            .as_object_mut()
            .unwrap()
            .remove("config_sha256");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let read = load(&path, &path).unwrap().unwrap();
        assert_eq!(read.generations[0].config_sha256, None);
        assert_eq!(read.generations[0].number, 8);
    }

    #[test]
    fn invalid_state_files_are_refused_naming_the_field() {
        let ok = saved(vec![
            generation(2, 70, State::Draining),
            generation(3, 80, State::Active),
        ]);
        assert_eq!(ok.check(), Ok(()));
        let mut duplicate = ok.clone();
        duplicate.generations[0].number = 3;
        let mut same_slot = ok.clone();
        same_slot.generations[0].slot = same_slot.generations[1].slot;
        let mut slot_99 = ok.clone();
        slot_99.generations[1].slot = 99;
        let mut pid_0 = ok.clone();
        pid_0.generations[1].pid = 0;
        let mut hold = ok.clone();
        hold.hold = Some(SavedHold {
            held: 5,
            successor: 3,
            until_unix_ms: 0,
        });
        for (bad, says) in [
            (duplicate, "generations[1].number is 3, recorded twice"),
            (
                same_slot,
                "generations[1].slot is 3, the slot of live generation 2 too",
            ),
            (
                slot_99,
                "generations[1].slot is 99, but the maps have 6 slots",
            ),
            (pid_0, "generations[1].pid is 0"),
            (hold, "hold.held is 5, a generation not recorded"),
        ] {
            assert_eq!(bad.check(), Err(says.to_owned()));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.state.json");
            save(&path, &bad).unwrap();
            let error = load(&path, Path::new("/shown")).unwrap_err();
            let error = error.to_string();
            assert!(error.starts_with("/shown is invalid: "), "{error}");
            assert!(path.exists(), "nothing deleted");
        }
    }

    #[test]
    fn pin_dirs_differ_per_control_socket() {
        let a = pin_dir("default", Path::new("/run/reloader/default.sock"));
        let b = pin_dir("default", Path::new("/tmp/x/control.sock"));
        assert_ne!(a, b);
        assert!(a.starts_with("/sys/fs/bpf/reloader"));
        assert_eq!(
            a,
            pin_dir("default", Path::new("/run/reloader/default.sock"))
        );
    }
}
