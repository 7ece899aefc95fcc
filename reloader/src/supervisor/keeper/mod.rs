//! The log keeper: a small process (`reloader __keeper`) that holds a copy
//! of the read end of every generation's stderr pipe, so that a server's
//! stderr always has a reader, also while no controller runs.
//!
//! Why: a generation's stderr is a pipe the controller reads. Were the
//! controller its only reader, its death (SIGKILL, OOM, a crash) would
//! make the server's next log line fail with `EPIPE`, and with it often
//! the server: Go reinstalls its own `SIGPIPE` handling and exits on
//! `EPIPE` to fd 2 (Caddy with `log` stopped serving at once), a C server
//! with `SIGPIPE` at default is killed, Python raises `BrokenPipeError`.
//! Ignoring `SIGPIPE` in the child before exec does not survive Go's
//! runtime. A second reader that outlives the controller removes the
//! cause: the pipe never breaks.
//!
//! How: the controller spawns the keeper in a session of its own and hands
//! it a duplicate of each new generation's read end ([`Link::hold`], over a
//! `SOCK_SEQPACKET` socket beside the control socket, with `SCM_RIGHTS`).
//! While the controller is connected the keeper only watches each pipe for
//! its hang-up (every writer gone: the generation's processes exited) and
//! closes its copy; it reads nothing, so the controller alone forwards the
//! lines. When the connection breaks without a goodbye (the controller
//! died), the keeper reads every pipe itself, keeping the last
//! [`KEEP_BYTES`] of lines per generation and counting the lines it had to
//! drop. A restarted controller connects, takes the pipes and the kept
//! lines back ([`Link::take`]), logs them, and forwards again; the keeper
//! returns to watching. A clean stop says goodbye ([`Link::exit`]). A
//! keeper left with no controller and no live pipe exits.
//!
//! The keeper is blocking code with `poll(2)`: it never wakes while nothing
//! happens.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::{
    cmsg_space,
    sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
        connect, getsockopt, recvmsg, sendmsg, socket, sockopt,
    },
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Bytes of lines kept per generation while no controller runs (the most
/// recent ones; older lines are dropped and counted).
pub const KEEP_BYTES: usize = 64 * 1024;
/// Longest message on the keeper's socket.
const MAX_MESSAGE: usize = KEEP_BYTES * 2 + 4096;
/// Longest line kept; the rest is cut (as the controller cuts them).
const MAX_LINE: usize = 4096;

/// What the controller tells the keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
enum ToKeeper {
    /// Hold the attached read end of generation `generation`'s stderr.
    Hold { generation: u64 },
    /// Hand back every pipe held and the lines kept.
    Take {},
    /// The controller stops cleanly: exit.
    Exit {},
}

/// What the keeper answers to `Take`: one `Pipe` per held pipe (its read
/// end attached unless it hung up), then `Done`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
enum FromKeeper {
    Pipe {
        generation: u64,
        lines: Vec<String>,
        dropped: u64,
        /// Its read end is attached (false: every writer had gone).
        open: bool,
    },
    Done {},
}

/// A generation's stderr as a restarted controller takes it back.
#[derive(Debug)]
pub struct Taken {
    pub generation: u64,
    /// Lines the keeper read while no controller ran, oldest first.
    pub lines: Vec<String>,
    /// Lines it dropped (beyond [`KEEP_BYTES`]).
    pub dropped: u64,
    /// The read end, if a writer still holds the pipe.
    pub pipe: Option<OwnedFd>,
}

mod process;

pub use process::run;

// ---- The controller's side.

/// The controller's connection to its keeper. Its calls block (a few
/// syscalls each): make them on a blocking thread.
#[derive(Debug)]
pub struct Link {
    socket: Mutex<Option<OwnedFd>>,
    path: PathBuf,
}

impl Link {
    /// Connects to the keeper at `path`, starting one (`exe __keeper`) if
    /// none answers there. `path` may reach its directory through
    /// descriptor `dir_fd` (`/proc/self/fd/N/…`): the keeper inherits it at
    /// the same number.
    pub fn connect_or_spawn(path: &Path, exe: &Path, dir_fd: RawFd) -> io::Result<Self> {
        let socket = match connect_to(path) {
            Ok(socket) => socket,
            Err(_) => {
                spawn_keeper(path, exe, dir_fd)?;
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    match connect_to(path) {
                        Ok(socket) => break socket,
                        Err(error) if Instant::now() >= deadline => {
                            return Err(io::Error::new(
                                error.kind(),
                                format!(
                                    "the log keeper did not answer on {} within 5s: {error}",
                                    path.display()
                                ),
                            ));
                        }
                        Err(_) => {
                            #[allow(clippy::disallowed_methods)] // a blocking thread
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            }
        };
        Ok(Self {
            socket: Mutex::new(Some(socket)),
            path: path.to_owned(),
        })
    }

    /// Hands the keeper a copy of generation `generation`'s stderr read
    /// end. A keeper that is gone is reported and not replaced here.
    pub fn hold(&self, generation: u64, pipe: &OwnedFd) {
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = socket.as_ref() else {
            return;
        };
        let sent = send(fd, &ToKeeper::Hold { generation }, Some(pipe.as_raw_fd()));
        if let Err(error) = sent {
            warn!(
                %error,
                keeper = %self.path.display(),
                "the log keeper is gone: servers' stderr no longer outlives this controller \
                 (restart reloader to start a new one)"
            );
            *socket = None;
        }
    }

    /// Takes back every pipe the keeper holds and the lines it kept.
    pub fn take(&self) -> io::Result<Vec<Taken>> {
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let fd = socket
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        send(fd, &ToKeeper::Take {}, None)?;
        let mut taken = Vec::new();
        loop {
            let (message, pipe): (FromKeeper, _) = receive(fd)?;
            match message {
                FromKeeper::Pipe {
                    generation,
                    lines,
                    dropped,
                    open,
                } => taken.push(Taken {
                    generation,
                    lines,
                    dropped,
                    pipe: if open { pipe } else { None },
                }),
                FromKeeper::Done {} => return Ok(taken),
            }
        }
    }

    /// A clean stop: the keeper removes its socket and exits; returns once
    /// it has closed the connection (at most 2 s).
    pub fn exit(&self) {
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = socket.take()
            && send(&fd, &ToKeeper::Exit {}, None).is_ok()
        {
            let timeout = nix::sys::time::TimeVal::new(2, 0);
            let _ = nix::sys::socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout);
            let mut byte = [0u8; 1];
            // EOF once the keeper has exited (or the timeout).
            let _ = nix::sys::socket::recv(fd.as_raw_fd(), &mut byte, MsgFlags::empty());
        }
    }
}

fn connect_to(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    // Only a keeper of our own uid is trusted with servers' logs.
    let peer = getsockopt(&fd, sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by uid {}, not by us (uid {me})",
                path.display(),
                peer.uid()
            ),
        ));
    }
    Ok(fd)
}

/// Starts `exe __keeper --socket PATH` in a session of its own (so that
/// neither a terminal's signals nor the controller's death reach it).
fn spawn_keeper(path: &Path, exe: &Path, dir_fd: RawFd) -> io::Result<()> {
    #[allow(clippy::disallowed_methods)] // a blocking thread (start-up)
    let _ = std::fs::remove_file(path);
    let mut command = std::process::Command::new(exe);
    command
        .arg("__keeper")
        .arg("--socket")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: setsid and fcntl are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            // Kept across exec, at the same number (see `connect_or_spawn`).
            if libc::fcntl(dir_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[allow(clippy::disallowed_methods)] // a blocking thread (start-up)
    let child = command.spawn()?;
    // Never waited through std: the controller's reaper reaps it.
    info!(pid = child.id(), socket = %path.display(), "log keeper started");
    drop(child);
    Ok(())
}

fn remove(path: &Path) {
    #[allow(clippy::disallowed_methods)] // the keeper process has no runtime
    let _ = std::fs::remove_file(path);
}

fn send<T: Serialize>(fd: &OwnedFd, message: &T, attached: Option<RawFd>) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let fds: Vec<RawFd> = attached.into_iter().collect();
    let control = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &control };
    sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(&body)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

fn receive<T: for<'de> Deserialize<'de>>(fd: &OwnedFd) -> io::Result<(T, Option<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space = cmsg_space!([RawFd; 1]);
    let (n, received) = {
        let mut iov = [IoSliceMut::new(&mut body)];
        let message = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut received = None;
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: SCM_RIGHTS gave us this descriptor.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    received.get_or_insert(owned);
                }
            }
        }
        (message.bytes, received)
    };
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    let message = serde_json::from_slice(&body[..n]).map_err(io::Error::other)?;
    Ok((message, received))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// The keeper in a thread of this process (as its own process it is
    /// the same code), a fake controller, and a pipe as a server's stderr.
    #[test]
    fn a_dead_controllers_pipes_are_read_kept_and_handed_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.keeper");
        let keeper = {
            let path = path.clone();
            std::thread::spawn(move || run(&path))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = loop {
            match connect_to(&path) {
                Ok(fd) => break fd,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => panic!("{error}"),
            }
        };
        let link = Link {
            socket: Mutex::new(Some(first)),
            path: path.clone(),
        };
        let (read, write) = nix::unistd::pipe().unwrap();
        let mut server = std::fs::File::from(write);
        link.hold(7, &read);
        // The controller reads while it lives; then it dies.
        drop(read);
        drop(link);
        // With no other reader, these would fail with EPIPE.
        for i in 0..5000 {
            writeln!(server, "line {i} {}", "x".repeat(20)).expect("the pipe has a reader");
        }
        server.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let next = Link {
            socket: Mutex::new(Some(connect_to(&path).unwrap())),
            path: path.clone(),
        };
        let taken = next.take().unwrap();
        assert_eq!(taken.len(), 1);
        let t = &taken[0];
        assert_eq!(t.generation, 7);
        assert!(
            t.pipe.is_some(),
            "the pipe is handed back while a writer holds it"
        );
        let kept: usize = t.lines.iter().map(String::len).sum();
        assert!(kept <= KEEP_BYTES, "{kept}");
        assert_eq!(
            t.lines.last().map(String::as_str),
            Some(&*format!("line 4999 {}", "x".repeat(20)))
        );
        assert_eq!(
            t.dropped + t.lines.len() as u64,
            5000,
            "every line kept or counted"
        );
        // Writers gone and the controller says goodbye: the keeper exits.
        drop(server);
        next.exit();
        keeper.join().unwrap().unwrap();
        assert!(!path.exists());
    }
}
