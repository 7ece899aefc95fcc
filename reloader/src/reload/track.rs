//! A generation's listeners are tracked for its whole life, not only at
//! its start: servers open listeners late (gunicorn's workers each open
//! their own, some after the generation was registered), replace them
//! (gunicorn `--max-requests` recycles workers; Apache recreates a bucket
//! listener during its second configuration pass) and close them. Every
//! [`TRACK_INTERVAL`], one sock_diag dump (on a blocking thread) lists the
//! listening sockets on the managed addresses; only when a socket nobody
//! accounts for appeared, or a registered one is gone, are the trees of the
//! tracked generations walked again and their slots rewritten with what
//! they hold now. Steady state: one netlink dump per interval, no `/proc`
//! walk; nothing at all while no generation serves. After a change the
//! interval is [`FAST_INTERVAL`] for a while: servers that recycle workers
//! (gunicorn `--max-requests` under load replaces one every few hundred
//! milliseconds) change again soon, and a slot whose registered sockets
//! have all closed makes the program leave connections to the kernel's
//! hash until it is rewritten.
//!
//! While nothing happens — no connection or datagram reached a tracked
//! generation (the program's counters did not move), no socket appeared
//! or vanished — the interval doubles after each quiet look, up to
//! [`IDLE_INTERVAL`], and the first sign of traffic or change brings it
//! back: an idle controller wakes about once every 8 s instead of twice a
//! second (`cargo xtask idle` measures it). The price: a registered socket
//! that closes during a quiet spell, with no new `listen` to report, is
//! noticed up to 8 s later; connections meanwhile take the slot's other
//! sockets, or the kernel's hash if it has none.
//!
//! Events where the kernel allows: the `sock_ops` program on the
//! controller's cgroup reports every `listen(2)` on a managed address (see
//! `reloader-ebpf`), and the tracker looks at once, so a worker that starts
//! listening is registered within milliseconds. The poll stays: it notices
//! closed sockets, UDP sockets (no `listen`), and works without cgroup v2.

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
/// The longest interval, reached after quiet looks (see the module doc).
pub const IDLE_INTERVAL: Duration = Duration::from_secs(8);

/// The interval after `quiet` looks in a row that saw no traffic and no
/// change: [`TRACK_INTERVAL`], doubled per quiet look, at most
/// [`IDLE_INTERVAL`].
fn interval(fast: bool, quiet: u32) -> Duration {
    if fast {
        return FAST_INTERVAL;
    }
    TRACK_INTERVAL
        .saturating_mul(1 << quiet.min(8))
        .min(IDLE_INTERVAL)
}

/// Tracks the listeners of serving generations until the task is dropped;
/// `listened` wakes it early (a socket started listening on a managed
/// address).
pub async fn track<H: Host>(handle: Handle, host: Arc<H>, listened: Arc<Notify>) {
    // Listening inodes on managed addresses that no tracked generation
    // holds (a candidate's, another process's): not worth a rescan again.
    let mut foreign: BTreeSet<u64> = BTreeSet::new();
    let mut last_change: Option<tokio::time::Instant> = None;
    // Quiet looks in a row, and the traffic the last look saw.
    let mut quiet = 0u32;
    let mut last_traffic = None;
    loop {
        let fast = last_change.is_some_and(|t| t.elapsed() < FAST_FOR);
        tokio::select! {
            () = tokio::time::sleep(interval(fast, quiet)) => {}
            () = listened.notified() => quiet = 0,
        }
        let (tracked, traffic) = handle.read(|s| (s.tracked(), s.traffic()));
        if last_traffic.replace(traffic) == Some(traffic) {
            quiet = quiet.saturating_add(1);
        } else {
            quiet = 0;
        }
        if tracked.is_empty() {
            continue;
        }
        let present = match host.listening().await {
            Ok(present) => present,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot list listening sockets");
                continue;
            }
        };
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
            continue;
        }
        quiet = 0;
        last_change = Some(tokio::time::Instant::now());
        let mut claimed = BTreeSet::new();
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
            match handle.update(|s| s.refresh(t.number, found)) {
                Ok(Refreshed::Unchanged) => {}
                Ok(Refreshed::Sockets { added, removed }) => info!(
                    generation = t.number,
                    added, removed, "listeners changed; registered what it holds now"
                ),
                Ok(Refreshed::Demoted { lost, reinstated }) => {
                    warn!(
                        generation = t.number,
                        lost = %lost,
                        reinstated,
                        "it no longer listens on a managed address: draining it"
                    );
                    let handle = handle.clone();
                    tokio::spawn(async move { drain(&handle, t.number).await });
                }
                Ok(Refreshed::LostListener { lost }) => warn!(
                    generation = t.number,
                    lost = %lost,
                    "it no longer listens on a managed address, and no previous generation can \
                     take over: new connections there are left to the kernel"
                ),
                Err(error) => {
                    warn!(generation = t.number, error = %crate::error_chain(&error), "cannot register new sockets")
                }
            }
        }
        foreign.extend(appeared.difference(&claimed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_doubles_while_quiet_up_to_the_idle_interval() {
        assert_eq!(interval(false, 0), TRACK_INTERVAL);
        assert_eq!(interval(false, 1), Duration::from_secs(1));
        assert_eq!(interval(false, 3), Duration::from_secs(4));
        assert_eq!(interval(false, 4), IDLE_INTERVAL);
        assert_eq!(interval(false, u32::MAX), IDLE_INTERVAL);
        assert_eq!(interval(true, 7), FAST_INTERVAL);
    }
}
