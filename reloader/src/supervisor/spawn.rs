//! Spawning a generation: its own process group, stderr captured, the
//! environment it gets, and socket activation (`--pass-fds`).

use std::{
    io,
    os::{
        fd::{AsRawFd, BorrowedFd},
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
}

/// A spawned generation leader.
#[derive(Debug)]
pub struct Spawned {
    pub process: Process,
    pub stderr: StderrTail,
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
    // Held by pidfd before anything can reap it: see `Process::child`.
    let process = Process::child(child.id())?;
    let stderr = match child.stderr.take() {
        Some(stderr) => super::stderr::forward(stderr, name.to_owned(), generation)?,
        None => StderrTail::default(),
    };
    // Dropping `child` neither waits nor kills: the reaper owns its exit.
    drop(child);
    Ok(Spawned { process, stderr })
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
