//! Short-lived helper processes whose exit status their spawner needs
//! (the `--check` command), in a controller that reaps every child itself.
//!
//! The reaper waits for *any* child (`waitid(P_ALL)`, see the module
//! comment of [`super`]): a helper waited for by its own pid (std's
//! `Child::wait`, tokio's process driver) could be reaped by it first, and
//! its status would be lost. So the spawner *claims* the pid in a
//! process-wide table at spawn, and the reaper hands a claimed child's
//! [`Exit`] to its claimant ([`deliver_claimed`]) instead of looking for a
//! generation. The table's lock is held across the spawn, so a child that
//! exits at once cannot be found by the reaper before it is claimed.
//!
//! A claimed helper runs in its own process group. Whatever it left in
//! that group is killed when its exit is delivered (the zombie leader
//! still holds the group id then), and the whole group is killed when the
//! claim is dropped before the exit (a timeout, or a reload cancelled by a
//! stop): a check never outlives the reload that ran it.

use std::{
    collections::BTreeMap,
    io,
    os::unix::process::CommandExt,
    process::{Child, Command},
    sync::Mutex,
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::sync::oneshot;

use super::Exit;

/// Claimed pids and where their exit goes.
static CLAIMS: Mutex<BTreeMap<u32, oneshot::Sender<Exit>>> = Mutex::new(BTreeMap::new());

fn claims() -> std::sync::MutexGuard<'static, BTreeMap<u32, oneshot::Sender<Exit>>> {
    // A panic elsewhere while holding it leaves a valid map.
    CLAIMS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A claimed child: its exit arrives through [`Claim::exited`].
#[derive(Debug)]
pub struct Claim {
    pid: u32,
    exit: oneshot::Receiver<Exit>,
    delivered: bool,
}

/// Spawns `command` in a process group of its own and claims its exit.
/// Never wait on the returned `Child` (the reaper owns its exit); it is
/// returned for its pipes.
#[allow(clippy::disallowed_methods)] // fork and exec: callers run it on a blocking thread
pub fn spawn_claimed(command: &mut Command) -> io::Result<(Child, Claim)> {
    command.process_group(0);
    let mut table = claims();
    let child = command.spawn()?;
    let (tx, exit) = oneshot::channel();
    table.insert(child.id(), tx);
    drop(table);
    let pid = child.id();
    Ok((
        child,
        Claim {
            pid,
            exit,
            delivered: false,
        },
    ))
}

/// Hands `exit` to its claimant if the pid was claimed, after killing what
/// is left of its process group. Returns whether it was claimed; the
/// caller reaps it either way.
pub fn deliver_claimed(exit: &Exit) -> bool {
    let Some(tx) = claims().remove(&exit.pid) else {
        return false;
    };
    // The leader is a zombie until the caller reaps it: the group id is
    // still its own.
    let _ = nix::sys::signal::killpg(Pid::from_raw(exit.pid as i32), Signal::SIGKILL);
    let _ = tx.send(exit.clone());
    true
}

/// The pids claimed now (for unit tests' own reapers).
#[cfg(test)]
pub(crate) fn claimed_pids() -> Vec<u32> {
    claims().keys().copied().collect()
}

/// Held for their whole run by the unit tests that reap claimed children
/// (`reload::check`'s reaper reaps every claimed pid): one at a time, so
/// that no test's reaper takes another test's child.
#[cfg(test)]
pub(crate) static REAPING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Claim {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the exit (`None` if the reaper is gone).
    pub async fn exited(&mut self) -> Option<Exit> {
        let exit = (&mut self.exit).await.ok();
        self.delivered = true;
        exit
    }

    /// Kills the child's process group, unless it was reaped already.
    pub fn kill(&self) {
        let table = claims();
        // Still claimed: not delivered, so not reaped, so the group id
        // cannot have been reused. The lock keeps the reaper from
        // delivering (and then reaping) meanwhile.
        if table.contains_key(&self.pid) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.delivered {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use nix::sys::wait::{Id, WaitPidFlag, waitid};

    use super::*;
    use crate::supervisor::{describe, reap};

    /// What the instance's reaper does, for this one child (other tests of
    /// this binary have children of their own).
    fn reap_claimed(pid: u32) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let Some(exit) = waitid(Id::Pid(Pid::from_raw(pid as i32)), flags)
            .ok()
            .and_then(describe)
        else {
            return false;
        };
        let claimed = deliver_claimed(&exit);
        reap(exit.pid);
        claimed
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_claimant_gets_the_exit_status_and_the_group_is_killed() {
        let _reaping = REAPING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!("sleep 60 & echo $! > {}; exit 3", pidfile.display());
        let (child, mut claim) = spawn_claimed(Command::new("sh").arg("-c").arg(script)).unwrap();
        drop(child);
        let pid = claim.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reap_claimed(pid) {
            assert!(Instant::now() < deadline, "no exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let exit = claim.exited().await.expect("delivered");
        assert_eq!((exit.pid, exit.code), (pid, Some(3)));
        // The background `sleep` it left in its group was killed with it.
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = |pid: i32| {
            procfs::process::Process::new(pid)
                .and_then(|p| p.stat())
                .map_or(true, |s| s.state == 'Z' || s.pgrp != exit.pid as i32)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(bg) {
            assert!(Instant::now() < deadline, "the background sleep still runs");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_claim_kills_its_child() {
        let _reaping = REAPING.lock().await;
        let (child, claim) = spawn_claimed(Command::new("sleep").arg("60")).unwrap();
        drop(child);
        let pid = claim.pid();
        drop(claim);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reap_claimed(pid) {
            assert!(Instant::now() < deadline, "sleep was not killed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
