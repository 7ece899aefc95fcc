//! Spawning a generation: its own process group, stderr captured, the
//! environment it gets, and socket activation (`--pass-fds`).
//!
//! Every generation starts as reloader's own `__exec` shim (same pid, the
//! server replaces it with `exec`), which waits on a [`Gate`] before
//! starting the server: the controller opens it only once the state file
//! records the new pid. A controller killed in between closes the gate's
//! write end by dying, the shim sees EOF and exits without starting the
//! server — so no server ever runs that no state file names (a successor
//! could neither adopt nor stop it).

#![allow(clippy::disallowed_methods)] // fork and exec: `reload::System::spawn` runs it on a blocking thread

use std::{
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
};

use super::{Process, StderrTail};

/// What a generation gets besides its command line.
#[derive(Default)]
pub struct SpawnExtras<'a> {
    /// Listening sockets to hand over as fds 3, 4, … with `LISTEN_FDS`,
    /// `LISTEN_PID` and `LISTEN_FDNAMES` (socket activation).
    pub listen_fds: Vec<(BorrowedFd<'a>, String)>,
    /// `NOTIFY_SOCKET` for the generation (`--ready notify`).
    pub notify_socket: Option<&'a std::path::Path>,
    /// The log keeper, which gets a copy of the stderr pipe's read end.
    pub keeper: Option<&'a super::keeper::Link>,
}

/// A spawned generation leader.
#[derive(Debug)]
pub struct Spawned {
    pub process: Process,
    pub stderr: StderrTail,
    /// Starts the server; see the module comment.
    pub gate: Gate,
    /// The generation's cgroup, which the leader entered before the gate
    /// opens (`None` without cgroups).
    pub cgroup: Option<std::path::PathBuf>,
}

/// The write end of a generation's start gate.
#[derive(Debug)]
pub struct Gate(Option<OwnedFd>);

impl Gate {
    /// A gate that holds nothing back (unit tests' fake processes).
    pub fn none() -> Self {
        Self(None)
    }

    /// Lets the server start. Dropping the gate unopened makes the shim
    /// exit instead.
    pub fn open(mut self) -> io::Result<()> {
        if let Some(fd) = self.0.take() {
            nix::unistd::write(&fd, b"1")?;
        }
        Ok(())
    }
}

/// Spawns `command` as generation `generation` of instance `name`, in its
/// own process group, with stderr captured (forwarded to the log sink, and
/// its tail kept).
pub fn spawn(
    command: &[String],
    generation: u64,
    name: &str,
    extras: &SpawnExtras<'_>,
) -> io::Result<Spawned> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    check_program(program)?;
    // The gate: its read end goes to the shim at fd 3 + (listen fds).
    let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let gate_fd = 3 + extras.listen_fds.len() as i32;
    // LISTEN_PID must be the server's own pid, which is unknown before the
    // fork and std builds the environment before it: the shim sets it to
    // its pid and execs the server in place (same pid).
    let names: Vec<&str> = extras.listen_fds.iter().map(|(_, n)| n.as_str()).collect();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__exec")
        .arg("--gate-fd")
        .arg(gate_fd.to_string())
        .arg("--listen-fds")
        .arg(extras.listen_fds.len().to_string())
        .arg("--fd-names")
        .arg(names.join(":"))
        .arg("--")
        .args(command);
    let _ = args;
    cmd.env("RELOADER_GENERATION", generation.to_string())
        .env("RELOADER_NAME", name)
        .env("GODEBUG", godebug(std::env::var("GODEBUG").ok().as_deref()))
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
        .chain(Some(gate_read.as_raw_fd()))
        .collect();
    // Allocated before the fork: the child may not allocate (another thread
    // of the controller may have held the allocator's lock at the fork).
    let mut high = vec![0; fds.len()];
    // SAFETY: only fcntl and dup2, both async-signal-safe, and no
    // allocation.
    unsafe {
        cmd.pre_exec(move || place_fds(&fds, &mut high));
    }
    ignore_sigpipe(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("failed to start {program:?}: {e} (is it installed and on PATH?)"),
        )
    })?;
    // Held by pidfd before anything can reap it: see `Process::child`.
    let process = Process::child(child.id())?;
    let stderr = match child.stderr.take() {
        Some(stderr) => {
            let stderr = OwnedFd::from(stderr);
            if let Some(keeper) = extras.keeper {
                keeper.hold(generation, &stderr);
            }
            super::stderr::forward(stderr, name.to_owned(), generation)?
        }
        None => StderrTail::default(),
    };
    // Dropping `child` neither waits nor kills: the reaper owns its exit.
    drop(child);
    drop(gate_read);
    Ok(Spawned {
        process,
        stderr,
        gate: Gate(Some(gate_write)),
        cgroup: None,
    })
}

/// The `GODEBUG` a generation gets: the controller's own, plus
/// `multipathtcp=0` unless it sets that key already. Go ≥ 1.24 listens
/// with `IPPROTO_MPTCP` by default, and the kernel lets no `SK_REUSEPORT`
/// program select an MPTCP listener (`EOPNOTSUPP` attaching to it, and its
/// TCP subflow listener cannot be put in any socket map), so reloader could
/// not steer to a modern Go server; with this key Go listens with plain
/// TCP. The last value of a repeated key wins in Go, so a user's explicit
/// `multipathtcp=1` is kept (and then refused with a clear error at
/// registration).
pub fn godebug(current: Option<&str>) -> String {
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => GODEBUG_MPTCP_OFF.to_owned(),
        Some(current)
            if current
                .split(',')
                .any(|kv| kv.trim().split('=').next() == Some("multipathtcp")) =>
        {
            current.to_owned()
        }
        Some(current) => format!("{current},{GODEBUG_MPTCP_OFF}"),
    }
}

/// What [`godebug`] adds.
pub const GODEBUG_MPTCP_OFF: &str = "multipathtcp=0";

/// Moves `fds` to 3, 4, … without CLOEXEC (in the forked child). First
/// every fd is copied above the target range (into `high`, as long as
/// `fds`), so that no `dup2` overwrites a descriptor still to be moved.
fn place_fds(fds: &[i32], high: &mut [i32]) -> io::Result<()> {
    let above = 3 + fds.len() as i32;
    for (i, &fd) in fds.iter().enumerate() {
        // SAFETY: plain fcntl on a descriptor we own in this child.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        high[i] = copy;
    }
    for (i, &fd) in high.iter().enumerate() {
        // SAFETY: dup2 to a fixed low number; the result has no CLOEXEC.
        if unsafe { libc::dup2(fd, 3 + i as i32) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `__exec` shim: waits until the controller opens the gate on
/// `gate_fd` (exits with status 1 if the controller died first), then, with
/// `count` listening sockets passed, sets `LISTEN_PID` to this process,
/// `LISTEN_FDS` and `LISTEN_FDNAMES`, and replaces itself with `command`.
/// Returns only on failure.
pub fn exec_shim(gate_fd: i32, count: usize, names: &str, command: &[String]) -> io::Error {
    use std::os::{fd::FromRawFd, unix::process::CommandExt as _};
    // SAFETY: the controller passed this descriptor to us, for us alone.
    let gate = unsafe { OwnedFd::from_raw_fd(gate_fd) };
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(&gate, &mut byte) {
            Ok(1) => break,
            Ok(_) => {
                eprintln!(
                    "reloader: the controller ended before it recorded this generation; not \
                     starting the server"
                );
                std::process::exit(1);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return io::Error::from(error),
        }
    }
    drop(gate);
    let Some((program, args)) = command.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "empty command");
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    ignore_sigpipe(&mut cmd);
    if count > 0 {
        cmd.env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDS", count.to_string())
            .env("LISTEN_FDNAMES", names);
    }
    cmd.exec()
}

/// The server's stderr is a pipe to the controller. If the controller dies,
/// the next write to it must fail with EPIPE rather than kill the server
/// with SIGPIPE: generations outlive the controller by design. std resets
/// SIGPIPE to the default before running `pre_exec` hooks, in `spawn` and
/// in `exec` alike, so both the shim and the server it execs set it here.
fn ignore_sigpipe(cmd: &mut Command) {
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
}

/// Fails unless `program` names an executable file (directly, or found on
/// `PATH`): said before anything is spawned.
fn check_program(program: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
        })
    };
    if found {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{program:?} is not an executable file (is it installed and on PATH?)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_servers_listen_with_plain_tcp_unless_told_otherwise() {
        assert_eq!(godebug(None), "multipathtcp=0");
        assert_eq!(godebug(Some("")), "multipathtcp=0");
        assert_eq!(godebug(Some("http2debug=1")), "http2debug=1,multipathtcp=0");
        assert_eq!(
            godebug(Some("multipathtcp=1,x=2")),
            "multipathtcp=1,x=2",
            "the user's own choice is kept"
        );
    }
}
