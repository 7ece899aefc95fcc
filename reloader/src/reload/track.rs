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
//! Events, not a poll, in the steady state: the `sock_ops` program on the
//! controller's cgroup reports every `listen(2)` on a managed address, and
//! the steering program every connection it holds on a bridge because its
//! target slot has no live socket (see `reloader-ebpf`); and the exit of
//! any process holding a registered socket (a pidfd each: a recycled or
//! crashed worker) is a wake-up too, since that is how listeners close.
//! So a worker that starts listening is registered within milliseconds, a
//! closed one is noticed as its process exits, and an idle controller does
//! not wake: with events and TCP listeners only, the steady-state look is
//! a backstop every [`IDLE_INTERVAL`] (for a listener a live process
//! closes while no connection arrives, or a UDP socket a live worker opens
//! late: UDP sockets do not `listen`). A controller without cgroup v2 is
//! looked at every [`TRACK_INTERVAL`], and so is an instance whose active
//! generation lost a listener.
//!
//! Why not the listener's own close as an event (`BPF_SOCK_OPS_STATE_CB_FLAG`
//! set at `listen`): the callback runs while the closing listener can still
//! pass its `sk_shutdown` to a connection completing its handshake, which
//! then answers with a FIN (docs/how-it-works.md, "Design notes"; measured with
//! gunicorn `--max-requests`: one such connection in 4 of 8 runs).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::Host;
use crate::state::{Client, Refreshed};

/// How often the managed addresses are looked at without events.
pub const TRACK_INTERVAL: Duration = Duration::from_millis(500);
/// How often with events (TCP listeners, cgroup v2): a backstop for a
/// listener closed by a process that lives on, with no connection since.
pub const IDLE_INTERVAL: Duration = Duration::from_secs(30);
/// How often, for [`FAST_FOR`] after a change.
pub const FAST_INTERVAL: Duration = Duration::from_millis(50);
const FAST_FOR: Duration = Duration::from_secs(5);

/// Tracks the listeners of serving generations until the task is dropped;
/// `listened` wakes it early (a socket started listening on a managed
/// address, or a connection waits on a bridge); `steady` is the interval
/// while nothing changes ([`TRACK_INTERVAL`] or [`IDLE_INTERVAL`]).
pub async fn track<H: Host>(client: Client, host: Arc<H>, listened: Arc<Notify>, steady: Duration) {
    // Listening inodes on managed addresses that no tracked generation
    // holds (a candidate's, another process's): not worth a rescan again.
    let mut foreign: BTreeSet<u64> = BTreeSet::new();
    let mut last_change: Option<tokio::time::Instant> = None;
    let mut last_tracked: Vec<u64> = Vec::new();
    // Generations whose lost listener was already reported: a server that
    // stopped listening for good is said once, not at every look.
    let mut lost: BTreeSet<u64> = BTreeSet::new();
    let mut exits = Exits::default();
    let mut snapshots = client.subscribe();
    loop {
        // Also while a bridge holds connections for a generation that does
        // not listen: its hand-over and its time limit are looks.
        let fast = last_change.is_some_and(|t| t.elapsed() < FAST_FOR)
            || snapshots.borrow().bridge_waiting;
        let interval = if fast {
            FAST_INTERVAL
        } else if lost.is_empty() {
            steady
        } else {
            // The active generation lost a listener: not idle.
            TRACK_INTERVAL.min(steady)
        };
        let next = tokio::time::Instant::now() + interval;
        loop {
            // A generation that became tracked (a cutover, an adoption) has
            // its holders watched from now on, and is looked at once: a
            // worker that started listening while it was still starting
            // was set aside as foreign (below).
            let tracked = snapshots.borrow_and_update().tracked.clone();
            exits.follow(&*host, tracked.iter());
            if tracked
                .iter()
                .map(|t| t.number)
                .ne(last_tracked.iter().copied())
            {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                () = listened.notified() => break,
                () = exits.wake.notified() => break,
                changed = snapshots.changed() => if changed.is_err() {
                    return;
                },
            }
        }
        let tracked = client.snapshot().tracked.clone();
        // A socket that appeared while its generation was still starting
        // (a late worker of a candidate) was set aside as foreign; once
        // that generation is tracked, it must be looked at again.
        let numbers: Vec<u64> = tracked.iter().map(|t| t.number).collect();
        if numbers != last_tracked {
            foreign.clear();
            lost.retain(|n| numbers.contains(n));
            last_tracked = numbers;
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
        if look(&client, &*host, tracked, &present, &mut foreign, &mut lost).await {
            last_change = Some(tokio::time::Instant::now());
        }
        // After the look: sockets it registered can take what a bridge
        // held. One getsockopt per bridge, no wake-up of its own.
        client.release_bridges(present).await;
    }
}

/// One look at the managed addresses (`present`: the listening inodes on
/// them); true if a tracked generation's registration changed, or it newly
/// lost a listener (`lost`: those already reported).
async fn look<H: Host>(
    client: &Client,
    host: &H,
    tracked: Vec<crate::state::Tracked>,
    present: &BTreeSet<u64>,
    foreign: &mut BTreeSet<u64>,
    lost: &mut BTreeSet<u64>,
) -> bool {
    foreign.retain(|inode| present.contains(inode));
    let registered = client.snapshot().registered.clone();
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
        let members = super::Members {
            pid: t.pid,
            cgroup: t.cgroup.clone(),
        };
        let scan = match host.scan(members).await {
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
        let found = match host.copy(scan).await {
            Ok(found) => found,
            Err(error) => {
                warn!(generation = t.number, error = %crate::error_chain(&error), "cannot copy new sockets");
                continue;
            }
        };
        match client.refresh(t.number, found, present.clone()).await {
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
                // The owner drains it.
                warn!(
                    generation = t.number,
                    lost = %lost,
                    reinstated,
                    "it no longer listens on a managed address: draining it"
                );
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

/// One exit watch per process that holds a tracked generation's socket;
/// each exit wakes the tracker.
#[derive(Default)]
struct Exits {
    watching: BTreeMap<u32, JoinHandle<()>>,
    wake: Arc<Notify>,
}

impl Exits {
    /// Watches the holders of `tracked`, and no longer those of others. A
    /// holder whose exit was seen stays in the map (not watched again)
    /// until its sockets are no longer registered.
    fn follow<'a, H: Host>(
        &mut self,
        host: &H,
        tracked: impl Iterator<Item = &'a crate::state::Tracked>,
    ) {
        let holders: BTreeSet<u32> = tracked.flat_map(|t| t.holders.iter().copied()).collect();
        self.watching.retain(|pid, task| {
            let keep = holders.contains(pid);
            if !keep {
                task.abort();
            }
            keep
        });
        for pid in holders {
            self.watching.entry(pid).or_insert_with(|| {
                let exited = host.exited(pid);
                let wake = self.wake.clone();
                tokio::spawn(async move {
                    exited.await;
                    wake.notify_one();
                })
            });
        }
    }
}

impl Drop for Exits {
    fn drop(&mut self) {
        for task in self.watching.values() {
            task.abort();
        }
    }
}
