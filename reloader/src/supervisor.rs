//! Supervisor: spawns generations, reaps every child, sends signals.
//!
//! The controller is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a
//! server that forks and lets its parent exit still has its processes
//! reparented to us, and we reap them. Reaping is one `waitpid(-1, WNOHANG)`
//! loop run on `SIGCHLD`: an event, not a poll. std's `Child` is never
//! waited on (that would race with this loop).
//!
//! Each generation runs in its own process group (leader = the spawned
//! process), so the drain timeout can kill the whole group.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill, killpg},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{debug, warn};

/// How many stderr lines of a generation are kept for failure reports.
const STDERR_TAIL: usize = 20;

/// The last stderr lines of a generation.
#[derive(Clone)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl StderrTail {
    fn new() -> Self {
        Self {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL))),
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    fn push(&self, line: String) {
        let mut lines = self.lines.lock().expect("stderr tail lock");
        if lines.len() == STDERR_TAIL {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, once the process closed its stderr (or `wait`
    /// passed: a crashed server's children may keep it open).
    pub async fn lines(&self, wait: std::time::Duration) -> Vec<String> {
        let mut closed = self.closed.subscribe();
        let _ = tokio::time::timeout(wait, closed.wait_for(|c| *c)).await;
        self.lines
            .lock()
            .expect("stderr tail lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Makes this process a child subreaper.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a generation gets besides its command line.
#[derive(Default)]
pub struct SpawnExtras<'a> {
    /// Listening sockets to hand over as fds 3, 4, … with `LISTEN_FDS`,
    /// `LISTEN_PID` and `LISTEN_FDNAMES` (socket activation).
    pub listen_fds: Vec<(BorrowedFd<'a>, String)>,
    /// `NOTIFY_SOCKET` for the generation (`--ready notify`).
    pub notify_socket: Option<&'a std::path::Path>,
}

/// Spawns `command` as generation `generation` of instance `name`, in its
/// own process group, with stderr captured (forwarded to ours, and its tail
/// kept). Returns the pid and the tail.
pub fn spawn(
    command: &[String],
    generation: u64,
    name: &str,
    extras: &SpawnExtras<'_>,
) -> io::Result<(u32, StderrTail)> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = if extras.listen_fds.is_empty() {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    } else {
        // LISTEN_PID must be the server's own pid, which is unknown before
        // the fork and std builds the environment before it: the child
        // runs our `__exec` shim, which sets it to its pid and execs the
        // server in place (same pid).
        let names: Vec<&str> = extras.listen_fds.iter().map(|(_, n)| n.as_str()).collect();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["__exec", "--listen-fds"])
            .arg(extras.listen_fds.len().to_string())
            .arg("--fd-names")
            .arg(names.join(":"))
            .arg("--")
            .args(command);
        cmd
    };
    cmd.env("RELOADER_GENERATION", generation.to_string())
        .env("RELOADER_NAME", name)
        // Our own NOTIFY_SOCKET (systemd's) is not the server's.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(path) = extras.notify_socket {
        cmd.env("NOTIFY_SOCKET", path);
    }
    let fds: Vec<i32> = extras
        .listen_fds
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .collect();
    if !fds.is_empty() {
        // SAFETY: only fcntl and dup2, both async-signal-safe.
        unsafe {
            cmd.pre_exec(move || place_fds(&fds));
        }
    }
    // The server's stderr is a pipe to us. If the controller dies, the next
    // write to it must fail with EPIPE rather than kill the server with
    // SIGPIPE: generations outlive the controller by design. std resets
    // SIGPIPE to the default before running this hook.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("failed to start {program:?}: {e} (is it installed and on PATH?)"),
        )
    })?;
    let pid = child.id();
    let tail = StderrTail::new();
    if let Some(stderr) = child.stderr.take() {
        let stderr = tokio::process::ChildStderr::from_std(stderr)?;
        let tail = tail.clone();
        let prefix = format!("[{name} gen {generation}]");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{prefix} {line}");
                tail.push(line);
            }
            tail.closed.send_replace(true);
        });
    }
    // Dropping `child` neither waits nor kills: the reaper owns its exit.
    drop(child);
    Ok((pid, tail))
}

/// Reaps every child that has exited; returns (pid, how it ended).
pub fn reap() -> Vec<(u32, String)> {
    let mut reaped = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                reaped.push((
                    pid.as_raw() as u32,
                    describe(ExitStatus::from_raw(code << 8)),
                ));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                reaped.push((
                    pid.as_raw() as u32,
                    format!("killed by {}", signal.as_str()),
                ));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return reaped,
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(error) => {
                warn!(%error, "waitpid failed");
                return reaped;
            }
        }
    }
}

/// Moves `fds` to 3, 4, … without CLOEXEC (in the forked child). First
/// every fd is copied above the target range, so that no `dup2` overwrites
/// a descriptor still to be moved.
fn place_fds(fds: &[i32]) -> io::Result<()> {
    let above = 3 + fds.len() as i32;
    let mut high = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: plain fcntl on a descriptor we own in this child.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        high.push(copy);
    }
    for (i, &fd) in high.iter().enumerate() {
        // SAFETY: dup2 to a fixed low number; the result has no CLOEXEC.
        if unsafe { libc::dup2(fd, 3 + i as i32) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `__exec` shim: sets `LISTEN_PID` to this process, `LISTEN_FDS` and
/// `LISTEN_FDNAMES`, then replaces itself with `command`. Returns only on
/// failure.
pub fn exec_with_listen_fds(count: usize, names: &str, command: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt as _;
    let Some((program, args)) = command.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "empty command");
    };
    Command::new(program)
        .args(args)
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_FDNAMES", names)
        .exec()
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited with status 0".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!(
            "killed by {}",
            Signal::try_from(signal).map_or("unknown signal", |s| s.as_str())
        ),
        _ => "ended".into(),
    }
}

/// Waits until `pid` exits. For processes that are not our children
/// (adopted from a previous controller), so no SIGCHLD and no exit status
/// reach us: a pidfd becomes readable when the process exits (Linux ≥ 5.3).
pub async fn wait_exit(pid: u32) -> String {
    const UNKNOWN: &str = "exited (status unknown: adopted from a previous controller)";
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return UNKNOWN.into();
    }
    // SAFETY: a fresh pidfd we own.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the pidfd stays open and unchanged while the AsyncFd owns it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
            UNKNOWN.into()
        }
        Err(_) => {
            warn!(
                pid,
                "cannot watch the process's pidfd; polling /proc for its exit"
            );
            while crate::state::start_time(pid).is_some() {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            UNKNOWN.into()
        }
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: Signal) {
    match kill(Pid::from_raw(pid as i32), signal) {
        Ok(()) | Err(Errno::ESRCH) => debug!(pid, signal = signal.as_str(), "signalled"),
        Err(error) => warn!(pid, signal = signal.as_str(), %error, "kill failed"),
    }
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: Signal) {
    match killpg(Pid::from_raw(pid as i32), signal) {
        Ok(()) | Err(Errno::ESRCH) => {
            debug!(pgid = pid, signal = signal.as_str(), "signalled group")
        }
        Err(error) => warn!(pgid = pid, signal = signal.as_str(), %error, "killpg failed"),
    }
}

/// Our direct children (including processes reparented to us).
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
        assert_eq!(describe(ExitStatus::from_raw(0)), "exited with status 0");
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
