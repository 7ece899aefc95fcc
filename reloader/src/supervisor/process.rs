//! A process the controller may signal, held by a pidfd (Linux ≥ 5.3),
//! never by a bare pid: a pid read from a state file, or one whose process
//! has exited and been reaped, may name an unrelated process by the time a
//! signal is sent. A pidfd refers to one process for as long as it is
//! open, so signals sent through it (`pidfd_send_signal`) reach that
//! process or nobody, and it becomes readable when that process exits —
//! also for processes that are not our children (adopted from a previous
//! controller), whose exits send us no `SIGCHLD`.
//!
//! Process groups: a generation runs in its own group led by the spawned
//! process. For our own children, `killpg` is safe while the leader is not
//! reaped (a zombie leader still holds its pid, so the group id cannot be
//! reused): the controller's state reaps only after it has marked the
//! generation ended. For adopted processes there is no such guarantee, so
//! each member is found in `/proc`, opened as a pidfd, re-checked, and
//! signalled through its pidfd while the leader's pidfd shows it alive.

use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use nix::sys::signal::Signal;
use rustix::process::{Pid, PidfdFlags, pidfd_open, pidfd_send_signal};
use tracing::{debug, warn};

/// A process held by a pidfd (cheap to clone: the clones share it).
#[derive(Clone, Debug)]
pub struct Process {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    start_time: u64,
    /// Its process group: its own pid for a generation's leader; for a
    /// worker adopted in place of a leader that is gone, the group the
    /// leader made (it lives on while a member does).
    pgid: u32,
    /// Our child (we reap it, and killpg is safe until then).
    child: bool,
}

/// Why a recorded process cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// No process with that pid runs now.
    #[error("pid {pid} is not running")]
    Gone { pid: u32 },
    /// A process runs with that pid, but it started at another time: the
    /// pid was reused.
    #[error("pid {pid} now belongs to another process (started at tick {found}, not {expected})")]
    Reused { pid: u32, expected: u64, found: u64 },
    /// `pidfd_open` failed for another reason.
    #[error("pidfd_open({pid}) failed")]
    PidfdError {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

impl Process {
    /// Holds our child `pid`, just spawned (it cannot have been reaped:
    /// only the controller reaps, and not before it knows of this child).
    pub fn child(pid: u32) -> io::Result<Self> {
        let pidfd = Arc::new(open(pid)?);
        let start_time = start_time(pid).unwrap_or_default();
        Ok(Self {
            pid,
            pidfd,
            start_time,
            pgid: pid,
            child: true,
        })
    }

    /// Holds `pid` if it is the process that started at `start_time` (a
    /// previous controller's generation). The check comes after the pidfd
    /// is open, so the pidfd refers to the checked process.
    pub fn adopt(pid: u32, expected: u64) -> Result<Self, AdoptError> {
        let pidfd = match open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(AdoptError::Gone { pid });
            }
            Err(source) => return Err(AdoptError::PidfdError { pid, source }),
        };
        match start_time(pid) {
            Some(found) if found == expected => Ok(Self {
                pid,
                pidfd: Arc::new(pidfd),
                start_time: found,
                pgid: group_of(pid).unwrap_or(pid),
                child: false,
            }),
            Some(found) => Err(AdoptError::Reused {
                pid,
                expected,
                found,
            }),
            None => Err(AdoptError::Gone { pid }),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The start time read when it was opened (`/proc/PID/stat` field 22).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Whether it is our child (exits arrive as SIGCHLD with a status).
    pub fn is_child(&self) -> bool {
        self.child
    }

    /// Whether it still runs (a zombie counts as exited).
    pub fn is_alive(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n == 0
    }

    /// Sends `signal` to the process itself. A process that has exited is
    /// not an error.
    pub fn signal(&self, signal: Signal) {
        match send(&self.pidfd, signal) {
            Ok(()) => debug!(pid = self.pid, signal = signal.as_str(), "signalled"),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(error) => {
                warn!(pid = self.pid, signal = signal.as_str(), %error, "pidfd_send_signal failed")
            }
        }
    }

    /// Sends `signal` to every process of the group it leads, while it
    /// runs (a group whose leader has exited is left alone: its id may be
    /// reused once the last member is gone). For our own child this is one
    /// `killpg`, which never sleeps; an adopted process's group is found in
    /// `/proc` first, so the caller must be on a blocking thread then
    /// ([`Self::signal_group_needs_proc`]).
    pub fn signal_group(&self, signal: Signal) {
        if self.child {
            self.signal_child_group(signal);
        } else {
            self.signal_adopted_group(signal);
        }
    }

    /// SIGKILLs an adopted process and its group ([`Self::signal_group`]),
    /// then waits up to `within` for each of them to have exited — and so
    /// closed its sockets: a pidfd polls readable only after the process's
    /// files are released. Blocking (`/proc`, poll): for start-up only.
    pub fn kill_group_and_wait(&self, within: std::time::Duration) {
        let members = self.group_members();
        self.signal_group(Signal::SIGKILL);
        let deadline = std::time::Instant::now() + within;
        let mut fds: Vec<libc::pollfd> = members
            .iter()
            .map(|(_, fd)| fd.as_raw_fd())
            .chain([self.pidfd.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !fds.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                warn!(
                    pid = self.pid,
                    left = fds.len(),
                    "killed processes still run"
                );
                return;
            }
            // SAFETY: valid pollfds of descriptors owned above.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    left.as_millis().max(1) as i32,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            fds.retain(|f| f.revents == 0);
        }
    }

    /// Whether it stands for a generation whose leader is gone (a worker
    /// adopted by the sockets it holds): its group was the leader's.
    pub fn stands_in_for_leader(&self) -> bool {
        self.pgid != self.pid
    }

    /// Whether [`Self::signal_group`] walks `/proc` (an adopted process).
    pub fn signal_group_needs_proc(&self) -> bool {
        !self.child
    }

    fn signal_child_group(&self, signal: Signal) {
        // Safe while unreaped; see the module comment.
        match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {
                debug!(pgid = self.pid, signal = signal.as_str(), "signalled group")
            }
            Err(error) => {
                warn!(pgid = self.pid, signal = signal.as_str(), %error, "killpg failed")
            }
        }
    }

    fn signal_adopted_group(&self, signal: Signal) {
        // The members are opened first, then the leader is seen alive, so
        // the group id was this group's when they were opened.
        let members = self.group_members();
        if !self.is_alive() {
            if !members.is_empty() {
                warn!(
                    pgid = self.pid,
                    members = members.len(),
                    "not signalling the rest of an adopted generation's process group: its \
                     leader has exited, so the group id no longer proves who they are"
                );
            }
            return;
        }
        self.signal(signal);
        for (pid, fd) in &members {
            match send(fd, signal) {
                Ok(()) => debug!(pid, signal = signal.as_str(), "signalled group member"),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(error) => warn!(pid, %error, "pidfd_send_signal failed"),
            }
        }
    }

    /// Other members of its process group, each held by a pidfd opened
    /// before its group was re-checked.
    #[allow(clippy::disallowed_methods)] // on a blocking thread: see signal_group
    fn group_members(&self) -> Vec<(u32, OwnedFd)> {
        let leader = self.pgid as i32;
        let me = self.pid as i32;
        let Ok(all) = procfs::process::all_processes() else {
            return Vec::new();
        };
        all.flatten()
            .filter_map(|p| {
                let stat = p.stat().ok()?;
                if stat.pgrp != leader || stat.pid == me {
                    return None;
                }
                let fd = open(stat.pid as u32).ok()?;
                let again = p.stat().ok()?;
                (again.pgrp == leader && again.starttime == stat.starttime)
                    .then_some((stat.pid as u32, fd))
            })
            .collect()
    }

    /// A future that completes when the process exits; it holds its own
    /// copy of the pidfd, so it may outlive this `Process`.
    pub fn exit_watcher(&self) -> impl Future<Output = ()> + Send + use<> {
        let pid = self.pid;
        let watched = self.pidfd.as_ref().try_clone().and_then(readable);
        async move {
            match watched {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(error) => {
                    warn!(pid, %error, "cannot watch the pidfd; polling for the exit");
                    while start_time(pid).is_some() {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

/// A future that completes when `pid` exits (at once if it does not run):
/// for processes the controller only watches, never signals — a server's
/// workers, whose exits close the listeners they hold. The pid is opened
/// now and not proven to be the process the caller found: should it have
/// exited and its pid been reused in between, the wrong exit wakes the
/// caller (an extra look), and the right one was already past.
pub fn exit_of(pid: u32) -> impl Future<Output = ()> + Send + use<> {
    let watched = open(pid).and_then(readable);
    async move {
        match watched {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(error) => {
                debug!(pid, %error, "cannot watch the exit of a process");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A pidfd registered with the runtime: readable once its process exits.
fn readable(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the pidfd, which stays open and unchanged
    // for as long as the AsyncFd lives.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

fn open(pid: u32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    pidfd_open(pid, PidfdFlags::empty()).map_err(io::Error::from)
}

fn send(pidfd: &OwnedFd, signal: Signal) -> io::Result<()> {
    let signal = rustix::process::Signal::from_named_raw(signal as i32)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    pidfd_send_signal(pidfd.as_fd(), signal).map_err(io::Error::from)
}

/// The process group of `pid`.
#[allow(clippy::disallowed_methods)] // one /proc read, at start-up (a blocking thread)
fn group_of(pid: u32) -> Option<u32> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    u32::try_from(stat.pgrp).ok()
}

/// The start time of `pid` (`/proc/PID/stat` field 22, clock ticks since
/// boot), if it runs (zombies do not count).
#[allow(clippy::disallowed_methods)] // one /proc read: at spawn and start-up (blocking threads)
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    (stat.state != 'Z').then_some(stat.starttime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn a_child_is_signalled_through_its_pidfd_and_seen_to_exit() {
        let mut child = sleeper();
        let process = Process::child(child.id()).unwrap();
        assert!(process.is_alive());
        process.signal(Signal::SIGKILL);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(!process.is_alive(), "exited (and reaped)");
        // Signalling an exited process is harmless.
        process.signal(Signal::SIGTERM);
    }

    #[test]
    fn adoption_checks_the_start_time() {
        let mut child = sleeper();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        assert!(matches!(
            Process::adopt(pid, start + 1),
            Err(AdoptError::Reused { .. })
        ));
        let adopted = Process::adopt(pid, start).unwrap();
        assert!(!adopted.is_child());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            Process::adopt(pid, start),
            Err(AdoptError::Gone { .. })
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn exits_are_events() {
        let mut child = sleeper();
        let process = Process::child(child.id()).unwrap();
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            process.exit_watcher(),
        )
        .await;
        assert!(waited.is_err(), "still running");
        let watcher = process.exit_watcher();
        drop(process);
        child.kill().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("pidfd readable after exit");
        child.wait().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_exit_of_a_process_we_only_watch_is_an_event_also_as_a_zombie() {
        let mut child = sleeper();
        let pid = child.id();
        let exited = exit_of(pid);
        let early = tokio::time::timeout(std::time::Duration::from_millis(100), exit_of(pid)).await;
        assert!(early.is_err(), "still running");
        child.kill().unwrap();
        // Not reaped yet: a worker whose parent has not waited for it still
        // closed its listeners when it exited.
        tokio::time::timeout(std::time::Duration::from_secs(5), exited)
            .await
            .expect("pidfd readable once it exited, before it is reaped");
        child.wait().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), exit_of(pid))
            .await
            .expect("a pid that no longer runs completes at once");
    }
}
