//! Supervisor: spawns generations, reaps every child, holds processes by
//! pidfd so signals reach only processes proven to be ours.
//!
//! The controller is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a
//! server that forks and lets its parent exit still has its processes
//! reparented to us, and we reap them. Reaping is event-driven (`SIGCHLD`)
//! and two-phase: [`peek_exited`] finds an exited child without reaping it
//! (`waitid(WNOWAIT)`), the caller records the exit and kills what is left
//! of the generation's process group while the zombie leader still holds
//! the group id, then [`reap`] releases the pid. std's `Child` is never
//! waited on (that would race with this).

mod claim;
pub mod keeper;
mod process;
mod spawn;
mod stderr;

pub use claim::{Claim, deliver_claimed, spawn_claimed};
#[cfg(test)]
pub(crate) use claim::{REAPING, claimed_pids};
use nix::{
    errno::Errno,
    sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid},
    unistd::Pid,
};
pub use process::{AdoptError, Process, exit_of, start_time};
pub use spawn::{GODEBUG_MPTCP_OFF, Gate, SpawnExtras, Spawned, exec_shim, godebug, spawn};
pub use stderr::{StderrTail, forward as forward_stderr};
use tracing::warn;

/// Makes this process a child subreaper.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A child that has exited and is not reaped yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub pid: u32,
    /// How it ended, for people: `exited with status 1`, `killed by SIGKILL`.
    pub how: String,
    /// Its exit status, if it exited (not killed by a signal).
    pub code: Option<i32>,
}

/// The next child that has exited, left unreaped (its pid stays taken
/// until [`reap`]).
pub fn peek_exited() -> Option<Exit> {
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        return match waitid(Id::All, flags) {
            Ok(status) => describe(status),
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => None,
            Err(error) => {
                warn!(%error, "waitid failed");
                None
            }
        };
    }
}

/// Reaps child `pid` (after [`peek_exited`] named it).
pub fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

/// The exit `status` reports, if it is one.
pub(crate) fn describe(status: WaitStatus) -> Option<Exit> {
    match status {
        WaitStatus::Exited(pid, code) => Some(Exit {
            pid: pid.as_raw() as u32,
            how: format!("exited with status {code}"),
            code: Some(code),
        }),
        WaitStatus::Signaled(pid, signal, _) => Some(Exit {
            pid: pid.as_raw() as u32,
            how: format!("killed by {}", signal.as_str()),
            code: None,
        }),
        _ => None,
    }
}

/// Our direct children (including processes reparented to us). Their pids
/// cannot be reused while they are unreaped, so signalling them by pid is
/// safe.
#[allow(clippy::disallowed_methods)] // a /proc walk: called on blocking threads only
pub fn children() -> Vec<u32> {
    let me = std::process::id() as i32;
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid == me)
        .map(|s| s.pid as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_well() {
        let pid = Pid::from_raw(7);
        assert_eq!(
            describe(WaitStatus::Exited(pid, 3)).unwrap().how,
            "exited with status 3"
        );
        assert_eq!(
            describe(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            ))
            .unwrap()
            .how,
            "killed by SIGKILL"
        );
    }
}
