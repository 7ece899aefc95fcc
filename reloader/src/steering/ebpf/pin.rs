//! What the load needs from the system besides the object: bpffs, where the
//! maps are pinned so a restarted controller can adopt running generations,
//! and the `RLIMIT_MEMLOCK` raise.
//!
//! Kernel behaviour this relies on: a map pinned in bpffs outlives the
//! process that created it, and loading with a pin path whose file exists
//! reuses that map instead of creating one; before Linux 5.11 BPF
//! memory is charged against `RLIMIT_MEMLOCK`, from 5.11 on to the cgroup.

#![allow(clippy::disallowed_methods)] // pinning at start-up and unpinning at stop, on blocking threads only

use std::{io, path::Path};

use aya::EbpfLoader;
use reloader_ebpf::map;
use tracing::{debug, info};

use super::Steering;
use crate::steering::{Result, SteeringError};

/// The layout of the pinned maps: the version of their types, keys, values
/// and meaning. The state file records it, and a controller adopts only
/// maps of a layout from [`OLDEST_MAPS_LAYOUT`] to its own (aya reuses a
/// pinned map of the same name without comparing its definition, so a
/// changed map would be misread). Bump it with any change to a map in
/// [`PINNED`]; the test `the_pinned_maps_are_the_recorded_layout` fails
/// until then. Layouts: 1 the first; 2 added `MIGRATED`; 3 added
/// `LISTENER_HINTS`; 4 added `LISTENER_INDEX`.
pub const MAPS_LAYOUT: u32 = 4;

/// The oldest layout whose pins this binary adopts. Layouts 2, 3 and 4
/// only added a map each: adopting older pins, the load creates and pins
/// the missing maps beside them, and the others mean what they meant.
/// (`LISTENER_HINTS` and `LISTENER_INDEX` are filled by `adopt_listener`,
/// from `PROBES` and the configuration, before this binary's program is
/// attached anywhere; the previous binary's program, still attached until
/// the next registration, never reads them. An empty `LISTENER_INDEX` is
/// correct anyway: the program then asks `LISTENER_KEYS`.) A binary of an
/// older layout refuses newer pins
/// (the state file says which layout they are): downgrading needs a
/// restart of the instance. Raise it to [`MAPS_LAYOUT`] when a map in use
/// changes.
pub const OLDEST_MAPS_LAYOUT: u32 = 1;

/// The maps a restarted controller needs: all of them but aya-log's and the
/// listen notifier's (its link dies with the controller).
const PINNED: [&str; 10] = [
    map::LISTENER_KEYS,
    map::LISTENERS,
    map::SLOT_SOCKETS,
    map::SOCKETS,
    map::PROBES,
    map::FLOWS,
    map::COUNTERS,
    map::MIGRATED,
    map::LISTENER_HINTS,
    map::LISTENER_INDEX,
];

/// Mounts bpffs if needed, creates `dir` and pins every map of [`PINNED`]
/// there; returns whether a previous controller's pins are there to reuse.
pub(super) fn pin_maps(loader: &mut EbpfLoader<'_>, dir: &Path) -> Result<bool> {
    ensure_bpffs()?;
    std::fs::create_dir_all(dir).map_err(|source| SteeringError::PinDirError {
        path: dir.display().to_string(),
        source,
    })?;
    let reused = dir.join(map::LISTENERS).exists();
    for name in PINNED {
        loader.map_pin_path(name, dir.join(name));
    }
    Ok(reused)
}

impl Steering {
    /// Whether an instance's maps are pinned in `dir` (so a successor can
    /// adopt its generations).
    pub fn pinned_in(dir: &Path) -> bool {
        dir.join(map::LISTENERS).exists()
    }

    /// Removes the pinned maps in `dir` (after a clean stop, or stale ones).
    pub fn unpin(dir: &Path) {
        for name in PINNED {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }
}

/// Mounts bpffs at /sys/fs/bpf unless it is there.
fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    let _ = std::fs::create_dir_all("/sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SteeringError::BpffsUnavailable { source })?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

pub(super) fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        // Kernels >= 5.11 account BPF memory to the cgroup instead, so this
        // only matters on older ones; the load error will say more.
        debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (map, BPF map type, key size, value size).
    type MapDefinition = (&'static str, u32, u32, u32);

    /// The definitions of the maps each layout pins. Types: 1 hash, 2
    /// array, 6 per-CPU array, 9 LRU hash, 20 reuseport sockarray.
    const LAYOUTS: &[(u32, &[MapDefinition])] = &[
        (
            1,
            &[
                ("LISTENER_KEYS", 1, 28, 4),
                ("LISTENERS", 1, 4, 16),
                ("SLOT_SOCKETS", 2, 4, 8),
                ("SOCKETS", 20, 4, 4),
                ("PROBES", 1, 8, 8),
                ("FLOWS", 9, 24, 8),
                ("COUNTERS", 6, 4, 40),
            ],
        ),
        (
            2,
            &[
                ("LISTENER_KEYS", 1, 28, 4),
                ("LISTENERS", 1, 4, 16),
                ("SLOT_SOCKETS", 2, 4, 8),
                ("SOCKETS", 20, 4, 4),
                ("PROBES", 1, 8, 8),
                ("FLOWS", 9, 24, 8),
                ("COUNTERS", 6, 4, 40),
                ("MIGRATED", 9, 8, 4),
            ],
        ),
        (
            3,
            &[
                ("LISTENER_KEYS", 1, 28, 4),
                ("LISTENERS", 1, 4, 16),
                ("SLOT_SOCKETS", 2, 4, 8),
                ("SOCKETS", 20, 4, 4),
                ("PROBES", 1, 8, 8),
                ("FLOWS", 9, 24, 8),
                ("COUNTERS", 6, 4, 40),
                ("MIGRATED", 9, 8, 4),
                ("LISTENER_HINTS", 2, 4, 8),
            ],
        ),
        (
            4,
            &[
                ("LISTENER_KEYS", 1, 28, 4),
                ("LISTENERS", 1, 4, 16),
                ("SLOT_SOCKETS", 2, 4, 8),
                ("SOCKETS", 20, 4, 4),
                ("PROBES", 1, 8, 8),
                ("FLOWS", 9, 24, 8),
                ("COUNTERS", 6, 4, 40),
                ("MIGRATED", 9, 8, 4),
                ("LISTENER_HINTS", 2, 4, 8),
                ("LISTENER_INDEX", 2, 4, 8),
            ],
        ),
    ];

    #[test]
    fn the_pinned_maps_are_the_recorded_layout() {
        let object = aya_obj::Object::parse(super::super::OBJECT).expect("the embedded object");
        let found: Vec<MapDefinition> = PINNED
            .iter()
            .map(|name| {
                let m = &object.maps[*name];
                (*name, m.map_type(), m.key_size(), m.value_size())
            })
            .collect();
        let layout = |n: u32| LAYOUTS.iter().find(|(l, _)| *l == n).map(|(_, maps)| *maps);
        assert_eq!(
            Some(&found[..]),
            layout(MAPS_LAYOUT),
            "the pinned maps changed: bump MAPS_LAYOUT (now {MAPS_LAYOUT}) and record the new \
             definitions here"
        );
        // Every older layout this binary adopts pins nothing it reads
        // otherwise: each of its maps is here unchanged (a map may be new).
        for older in OLDEST_MAPS_LAYOUT..MAPS_LAYOUT {
            for map in layout(older).expect("every adopted layout is recorded") {
                assert!(
                    found.contains(map),
                    "layout {older}'s {map:?} changed: raise OLDEST_MAPS_LAYOUT to {MAPS_LAYOUT}"
                );
            }
        }
    }
}
