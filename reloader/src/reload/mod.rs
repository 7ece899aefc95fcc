//! One reload, step by step (docs/how-it-works.md):
//!
//! 0. **check** (`--check`) and hash the `--config` files ([`preflight`]):
//!    a failed check ends the reload before anything is taken or started.
//! 1. **take slot**: a free steering slot for generation N+1, waiting while
//!    `--max-draining` generations drain; its counters start at zero.
//! 2. **spawn** N+1 in it (its own process group, held by pidfd).
//! 3. **discover** its listening sockets: every managed address has one in
//!    its process tree, the same set in two scans in a row (nginx opens one
//!    socket per worker, one after another).
//! 4. **register** them: copied with `pidfd_getfd`, checked for
//!    `SO_REUSEPORT`, put in its slot; the program is attached to each group.
//! 5. **probe** through N+1's own listener (`--ready-probe`, routed by the
//!    probe's source port), and `READY=1` with `--ready notify`.
//! 6. **cut over**: one map update per listener.
//! 7. **settle** N ([`settle`]: `auto` until it has answered what it
//!    accepted, `idle` until it holds no connection, or a fixed time), then
//!    **drain** it: the drain signal, SIGKILL at the drain timeout. Done
//!    when N has exited: the `reload --wait` barrier.
//!
//! From then on N+1's listeners are tracked ([`track`]): sockets it opens
//! later are registered, closed ones drop out. If N+1 fails while N still
//! holds its listeners (N settles, not yet signalled), N is made active
//! again and the reload is reported failed.
//!
//! Any failure before step 6 kills N+1 and leaves N active: nothing was
//! routed to N+1, so nothing is lost. The steps are functions of
//! [`machine`] with one error type ([`crate::error::ReloadError`]); what they
//! change lives in [`crate::state`]; spawning and inspecting processes go
//! through [`Host`], so the machine runs in unit tests without privileges.

mod check;
mod drain;
pub mod health;
mod host;
pub mod machine;
mod preflight;
mod probe;
mod ready;
pub mod scheduler;
mod settle;
mod track;

use std::{future::Future, path::PathBuf};

pub use drain::{KILL_GRACE, drain, evicted, memory_budget};
pub use host::System;
pub use machine::{CutOver, Finished, adopted_canary, run};
pub use track::{IDLE_INTERVAL, TRACK_INTERVAL, track};

use crate::{
    discovery::{Holder, Listener},
    error::ReloadError,
    state::{Effect, FoundSocket},
    supervisor::Spawned,
};

/// Where a generation's processes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    /// Its leader (recorded: it may have exited).
    pub pid: u32,
    /// Its cgroup, if it has one: then every process in it.
    pub cgroup: Option<PathBuf>,
}

/// One look at a generation's process tree.
#[derive(Debug, Default)]
pub struct Scan {
    /// For each managed address (same order as `--listen`), its listening
    /// sockets and where the tree holds them.
    pub per_address: Vec<Vec<(Listener, Holder)>>,
    /// Every address the tree listens on, for "not ready" messages.
    pub listening: Vec<String>,
}

impl Scan {
    /// Whether every managed address has at least one socket.
    pub fn complete(&self) -> bool {
        self.per_address.iter().all(|v| !v.is_empty())
    }

    /// The socket inodes found, for comparing two scans.
    pub fn inodes(&self) -> std::collections::BTreeSet<u64> {
        self.per_address
            .iter()
            .flatten()
            .map(|(l, _)| l.inode)
            .collect()
    }
}

/// What the instance does to processes and the kernel outside its state:
/// spawn a generation, look at its sockets, copy them, watch exits, and
/// the blocking side of the state's effects. [`System`] does it for real,
/// each slow call on a blocking thread; unit tests fake it.
pub trait Host: Send + Sync + 'static {
    /// Starts generation `number` (`notify_socket`: its `NOTIFY_SOCKET`);
    /// the fork and exec run on a blocking thread.
    fn spawn(
        &self,
        number: u64,
        notify_socket: Option<PathBuf>,
    ) -> impl Future<Output = Result<Spawned, ReloadError>> + Send;

    /// Where generation `number`'s notify socket is bound, and the path its
    /// server is told (`--ready notify`).
    fn notify_paths(&self, number: u64) -> (PathBuf, PathBuf);

    /// Which listening sockets a generation holds: every process of its
    /// cgroup, or without one the process tree of its leader (slow: runs on
    /// a blocking thread).
    fn scan(&self, of: Members) -> impl Future<Output = Result<Scan, ReloadError>> + Send;

    /// Copies the sockets of `scan` into this process.
    fn copy(
        &self,
        scan: Scan,
    ) -> impl Future<Output = Result<Vec<Vec<FoundSocket>>, ReloadError>> + Send;

    /// The inodes of the sockets listening on managed addresses now (one
    /// cheap kernel query; runs on a blocking thread).
    fn listening(
        &self,
    ) -> impl Future<Output = Result<std::collections::BTreeSet<u64>, ReloadError>> + Send;

    /// Completes when process `pid` (one that holds a registered socket)
    /// exits, at once if it does not run.
    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static;

    /// Carries out what state changes left for a blocking thread, in order.
    fn carry_out(&self, effects: Vec<Effect>) -> impl Future<Output = ()> + Send + 'static;

    /// The next child that has exited, not yet reaped (see
    /// [`crate::supervisor::peek_exited`]). This and [`Self::reap`] are
    /// single non-sleeping syscalls, made on the owner's thread so that an
    /// exit is recorded, and what is left of its process group killed,
    /// before the pid is released.
    fn peek_exited(&self) -> Option<crate::supervisor::Exit>;

    /// Reaps child `pid`.
    fn reap(&self, pid: u32);
}
