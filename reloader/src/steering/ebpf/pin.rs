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

/// The maps a restarted controller needs: all of them but aya-log's and the
/// listen notifier's (its link dies with the controller).
const PINNED: [&str; 8] = [
    map::LISTENER_KEYS,
    map::LISTENERS,
    map::SLOT_SOCKETS,
    map::SOCKETS,
    map::PROBES,
    map::FLOWS,
    map::COUNTERS,
    map::MIGRATED,
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
