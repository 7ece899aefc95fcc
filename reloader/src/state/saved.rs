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

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{generation::State, steering::Limits};

/// The state file's format version (2: steering maps sized per instance,
/// their sizes recorded).
const VERSION: u32 = 2;

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

/// The state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub controller_pid: u32,
    pub listen: Vec<SocketAddr>,
    pub limits: SavedLimits,
    pub next_generation: u64,
    pub generations: Vec<SavedGeneration>,
}

impl Saved {
    pub fn new(
        listen: Vec<SocketAddr>,
        limits: Limits,
        next_generation: u64,
        generations: Vec<SavedGeneration>,
    ) -> Self {
        Self {
            version: VERSION,
            controller_pid: std::process::id(),
            listen,
            limits: limits.into(),
            next_generation,
            generations,
        }
    }
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
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the state file, if there is one. A file that cannot be read is
/// reported as an error (it is left in place for the user to look at).
pub fn load(path: &Path) -> Result<Option<Saved>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let saved: Saved = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a reloader state file: {e}", path.display()))?;
    if saved.version != VERSION {
        return Err(format!(
            "{} has format version {}, this reloader writes {VERSION}",
            path.display(),
            saved.version
        ));
    }
    Ok(Some(saved))
}

/// What to do with a previous controller's state.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was left behind.
    Fresh,
    /// Generations still run: adopt these (the others are gone).
    Adopt {
        live: Vec<SavedGeneration>,
        gone: Vec<SavedGeneration>,
    },
    /// Something was left, but no generation serves any more.
    Stale { gone: Vec<SavedGeneration> },
}

/// Decides what to do with `saved`, given which of its processes still run
/// (`running(pid, start_time)`). Adoption needs a live active generation:
/// without one there is nothing to keep serving.
pub fn recovery(saved: Option<&Saved>, running: impl Fn(u32, u64) -> bool) -> Recovery {
    let Some(saved) = saved else {
        return Recovery::Fresh;
    };
    let (live, gone): (Vec<_>, Vec<_>) = saved
        .generations
        .iter()
        .filter(|g| g.state.is_live())
        .cloned()
        .partition(|g| running(g.pid, g.start_time));
    if live.iter().any(|g| g.state == State::Active) {
        Recovery::Adopt { live, gone }
    } else {
        Recovery::Stale {
            gone: live.into_iter().chain(gone).collect(),
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
        }
    }

    fn saved(generations: Vec<SavedGeneration>) -> Saved {
        Saved::new(
            vec!["127.0.0.1:80".parse().unwrap()],
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
        assert_eq!(recovery(None, |_, _| true), Recovery::Fresh);
    }

    #[test]
    fn a_live_active_generation_is_adopted_with_its_live_peers() {
        let s = saved(vec![
            generation(6, 60, State::Exited),
            generation(7, 70, State::Draining),
            generation(8, 80, State::Active),
            generation(9, 90, State::Starting),
        ]);
        // 7's pid was reused by another process (different start time).
        let running = |pid: u32, start: u64| pid != 70 && start == 1000 + u64::from(pid);
        match recovery(Some(&s), running) {
            Recovery::Adopt { live, gone } => {
                assert_eq!(
                    live.iter().map(|g| g.number).collect::<Vec<_>>(),
                    vec![8, 9]
                );
                assert_eq!(gone.iter().map(|g| g.number).collect::<Vec<_>>(), vec![7]);
            }
            other => panic!("{other:?}"),
        }
        // The active generation's pid now belongs to another process.
        let reused = saved(vec![generation(8, 80, State::Active)]);
        assert!(matches!(
            recovery(Some(&reused), |_, start| start == 0),
            Recovery::Stale { .. }
        ));
    }

    #[test]
    fn without_a_live_active_generation_the_state_is_stale() {
        let s = saved(vec![
            generation(3, 30, State::Active),
            generation(4, 40, State::Draining),
        ]);
        let only_draining = |pid: u32, _| pid == 40;
        match recovery(Some(&s), only_draining) {
            Recovery::Stale { gone } => assert_eq!(gone.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn state_files_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state.json");
        assert_eq!(load(&path).unwrap(), None);
        let s = saved(vec![generation(8, 80, State::Active)]);
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(
            load(&path)
                .unwrap_err()
                .contains("not a reloader state file")
        );
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
