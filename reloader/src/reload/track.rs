//! A generation's listeners are tracked for its whole life, not only at
//! its start: servers open listeners late (gunicorn's workers each open
//! their own, some after the generation was registered), replace them
//! (gunicorn `--max-requests` recycles workers; Apache recreates a bucket
//! listener during its second configuration pass) and close them. A look
//! is one sock_diag dump (on a blocking thread) of the listening sockets on
//! the managed addresses; only when a socket nobody accounts for appeared,
//! or a registered one is gone, are the trees of the tracked generations
//! walked again and their slots rewritten with what they hold now. Nothing
//! at all happens while no generation serves. After a change the interval
//! is [`FAST_INTERVAL`] for a while: servers that recycle workers (gunicorn
//! `--max-requests` under load replaces one every few hundred
//! milliseconds) change again soon, and while a slot's registered sockets
//! have all closed the program holds its connections on the bridge
//! listener (`steering::bridge`) until it is rewritten; each look ends by
//! handing what a bridge holds to the active generation.
//!
//! Events where the kernel allows: the `sock_ops` program on the
//! controller's cgroup reports every `listen(2)` on a managed address (see
//! `reloader-ebpf`), and the tracker looks at once, so a worker that starts
//! listening is registered within milliseconds. The poll every
//! [`TRACK_INTERVAL`] stays: it notices closed sockets, UDP sockets (no
//! `listen`), and works without cgroup v2. (Reporting a listener's close
//! too, with `BPF_SOCK_OPS_STATE_CB_FLAG` set at `listen`, would let the
//! poll go; tried on 6.18, it coincided with connections that gunicorn
//! `--max-requests` workers closed unanswered in 2 of 8 runs, against 0 of
//! 8 without it, and was taken out until that is understood.)

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Host, drain::drain};
use crate::state::{Handle, Refreshed};

/// How often the managed addresses are looked at.
pub const TRACK_INTERVAL: Duration = Duration::from_millis(500);
/// How often, for [`FAST_FOR`] after a change.
pub const FAST_INTERVAL: Duration = Duration::from_millis(50);
const FAST_FOR: Duration = Duration::from_secs(5);

/// Tracks the listeners of serving generations until the task is dropped;
/// `listened` wakes it early (a socket started listening on a managed
/// address).
pub async fn track<H: Host>(handle: Handle, host: Arc<H>, listened: Arc<Notify>) {
    // Listening inodes on managed addresses that no tracked generation
    // holds (a candidate's, another process's): not worth a rescan again.
    let mut foreign: BTreeSet<u64> = BTreeSet::new();
    let mut last_change: Option<tokio::time::Instant> = None;
    let mut last_tracked: Vec<u64> = Vec::new();
    // Generations whose lost listener was already reported: a server that
    // stopped listening for good is said once, not at every look.
    let mut lost: BTreeSet<u64> = BTreeSet::new();
    loop {
        // Also while a bridge holds connections for a generation that does
        // not listen: its hand-over and its time limit are looks.
        let fast = last_change.is_some_and(|t| t.elapsed() < FAST_FOR)
            || handle.read(|s| s.bridge_waiting());
        tokio::select! {
            () = tokio::time::sleep(if fast { FAST_INTERVAL } else { TRACK_INTERVAL }) => {}
            () = listened.notified() => {}
        }
        let tracked = handle.read(|s| s.tracked());
        if tracked.is_empty() {
            continue;
        }
        // A socket that appeared while its generation was still starting
        // (a late worker of a candidate) was set aside as foreign; once
        // that generation is tracked, it must be looked at again.
        let numbers: Vec<u64> = tracked.iter().map(|t| t.number).collect();
        if numbers != last_tracked {
            foreign.clear();
            lost.retain(|n| numbers.contains(n));
            last_tracked = numbers;
        }
        let present = match host.listening().await {
            Ok(present) => present,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot list listening sockets");
                continue;
            }
        };
        if look(&handle, &*host, tracked, &present, &mut foreign, &mut lost).await {
            last_change = Some(tokio::time::Instant::now());
        }
        // After the look: sockets it registered can take what a bridge
        // held. One getsockopt per bridge, no wake-up of its own.
        let _ = handle.update(|s| s.release_bridges(Some(&present)));
    }
}

/// One look at the managed addresses (`present`: the listening inodes on
/// them); true if a tracked generation's registration changed, or it newly
/// lost a listener (`lost`: those already reported).
async fn look<H: Host>(
    handle: &Handle,
    host: &H,
    tracked: Vec<crate::state::Tracked>,
    present: &BTreeSet<u64>,
    foreign: &mut BTreeSet<u64>,
    lost: &mut BTreeSet<u64>,
) -> bool {
    foreign.retain(|inode| present.contains(inode));
    let registered = handle.read(|s| s.registered_inodes());
    let appeared: BTreeSet<u64> = present
        .iter()
        .filter(|i| !registered.contains(i) && !foreign.contains(i))
        .copied()
        .collect();
    let vanished = tracked
        .iter()
        .any(|t| t.inodes.iter().any(|i| !present.contains(i)));
    if appeared.is_empty() && !vanished {
        return false;
    }
    let mut claimed = BTreeSet::new();
    let mut changed = false;
    for t in tracked {
        let scan = match host.scan(t.pid).await {
            Ok(scan) => scan,
            Err(error) => {
                warn!(generation = t.number, error = %crate::error_chain(&error), "cannot rescan");
                continue;
            }
        };
        let now = scan.inodes();
        claimed.extend(now.iter().copied());
        if now == t.inodes {
            continue;
        }
        let found = match host.copy(&scan) {
            Ok(found) => found,
            Err(error) => {
                warn!(generation = t.number, error = %crate::error_chain(&error), "cannot copy new sockets");
                continue;
            }
        };
        match handle.update(|s| s.refresh(t.number, found, present)) {
            Ok(Refreshed::Unchanged) => {}
            Ok(Refreshed::Sockets { added, removed }) => {
                changed = true;
                lost.remove(&t.number);
                info!(
                    generation = t.number,
                    added, removed, "listeners changed; registered what it holds now"
                );
            }
            Ok(Refreshed::Demoted { lost, reinstated }) => {
                changed = true;
                warn!(
                    generation = t.number,
                    lost = %lost,
                    reinstated,
                    "it no longer listens on a managed address: draining it"
                );
                let handle = handle.clone();
                let number = t.number;
                tokio::spawn(async move { drain(&handle, number).await });
            }
            Ok(Refreshed::LostListener { lost: address }) => {
                if lost.insert(t.number) {
                    changed = true;
                    warn!(
                        generation = t.number,
                        lost = %address,
                        "it no longer listens on a managed address, and no previous generation \
                         can take over: new connections there wait on the bridge listener (or, \
                         without one, are left to the kernel)"
                    );
                }
            }
            Err(error) => {
                warn!(generation = t.number, error = %crate::error_chain(&error), "cannot register new sockets")
            }
        }
    }
    foreign.extend(appeared.difference(&claimed));
    changed
}
