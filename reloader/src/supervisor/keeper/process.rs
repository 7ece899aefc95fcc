//! The keeper process itself (`reloader __keeper`): blocking code around
//! `poll(2)`, which never wakes while nothing happens.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, getsockopt, listen,
        socket, sockopt,
    },
};
use tracing::debug;

use super::{FromKeeper, KEEP_BYTES, MAX_LINE, ToKeeper, receive, remove, send};

/// A pipe the keeper holds.
struct Held {
    fd: OwnedFd,
    /// Lines read while no controller ran, and their size.
    lines: VecDeque<String>,
    bytes: usize,
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    dropped: u64,
    /// Every writer has gone.
    hung_up: bool,
}

impl Held {
    fn keep(&mut self, line: &[u8]) {
        let mut line = line.to_vec();
        line.truncate(MAX_LINE);
        let line = String::from_utf8_lossy(&line).into_owned();
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > KEEP_BYTES {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.len();
            self.dropped += 1;
        }
    }

    /// Reads what the pipe has now (it is non-blocking).
    fn read(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => {
                    self.hung_up = true;
                    break;
                }
                Ok(n) => {
                    self.partial.extend_from_slice(&buf[..n]);
                    while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.partial.drain(..=at).collect();
                        self.keep(&line[..line.len() - 1]);
                    }
                    if self.partial.len() > MAX_LINE {
                        let line = std::mem::take(&mut self.partial);
                        self.keep(&line);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    self.hung_up = true;
                    break;
                }
            }
        }
        if self.hung_up && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.keep(&line);
        }
    }
}

/// `reloader __keeper --socket PATH`: serves until told to exit, or until
/// no controller is connected and no pipe is left open. Returns only on an
/// error it cannot go on after.
pub fn run(path: &Path) -> io::Result<()> {
    // The controller's terminal and its stop signals are not ours.
    for signal in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        // SAFETY: setting a signal to be ignored.
        unsafe {
            let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = bind(listener.as_raw_fd(), &UnixAddr::new(path)?);
    nix::sys::stat::umask(old);
    bound?;
    listen(&listener, Backlog::new(8)?)?;
    let me = nix::unistd::geteuid().as_raw();
    let mut held: BTreeMap<u64, Held> = BTreeMap::new();
    let mut controller: Option<OwnedFd> = None;
    // Until the first controller connects, nothing is held: no reason to
    // exit for that.
    let mut ever_connected = false;
    loop {
        if ever_connected && controller.is_none() && held.values().all(|h| h.hung_up) {
            debug!("no controller and no open pipe: the log keeper exits");
            remove(path);
            return Ok(());
        }
        let reading = controller.is_none();
        let order: Vec<u64> = held
            .iter()
            .filter(|(_, h)| !h.hung_up)
            .map(|(n, _)| *n)
            .collect();
        let (listener_ready, controller_ready, pipes_ready) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            if let Some(c) = &controller {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            // While a controller reads the pipes, only their hang-up matters.
            let interest = if reading {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            for n in &order {
                fds.push(PollFd::new(held[n].fd.as_fd(), interest));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => return Err(error.into()),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let listener_ready = ready(&fds[0]);
            let offset = usize::from(controller.is_some());
            let controller_ready = controller.is_some() && ready(&fds[1]);
            let pipes_ready: Vec<u64> = order
                .iter()
                .enumerate()
                .filter(|(i, _)| ready(&fds[1 + offset + i]))
                .map(|(_, n)| *n)
                .collect();
            (listener_ready, controller_ready, pipes_ready)
        };
        for n in pipes_ready {
            let h = held.get_mut(&n).expect("polled");
            if reading {
                h.read();
            } else {
                // Hung up while the controller reads: nothing to keep.
                h.hung_up = true;
            }
        }
        if !reading {
            held.retain(|_, h| !h.hung_up);
        }
        if listener_ready && let Ok(fd) = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let trusted = getsockopt(&fd, sockopt::PeerCredentials).is_ok_and(|p| p.uid() == me);
            if trusted {
                // One controller at a time (the instance lock sees to
                // that); a newcomer replaces a connection left behind.
                controller = Some(fd);
                ever_connected = true;
            }
        }
        if controller_ready {
            let Some(fd) = controller.as_ref() else {
                continue;
            };
            match receive::<ToKeeper>(fd) {
                Ok((ToKeeper::Hold { generation }, Some(pipe))) => {
                    let _ = nix::fcntl::fcntl(
                        &pipe,
                        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                    );
                    held.insert(
                        generation,
                        Held {
                            fd: pipe,
                            lines: VecDeque::new(),
                            bytes: 0,
                            partial: Vec::new(),
                            dropped: 0,
                            hung_up: false,
                        },
                    );
                }
                Ok((ToKeeper::Hold { .. }, None)) => {}
                Ok((ToKeeper::Take {}, _)) => {
                    if hand_back(fd, &mut held).is_err() {
                        controller = None;
                    }
                }
                Ok((ToKeeper::Exit {}, _)) => {
                    remove(path);
                    return Ok(());
                }
                // The controller is gone (or spoke nonsense): from now on
                // the keeper reads.
                Err(_) => controller = None,
            }
        }
    }
}

/// Sends every pipe and its kept lines to the controller; pipes that hung
/// up are forgotten, the others held on, their lines cleared.
fn hand_back(fd: &OwnedFd, held: &mut BTreeMap<u64, Held>) -> io::Result<()> {
    for (generation, h) in held.iter_mut() {
        let message = FromKeeper::Pipe {
            generation: *generation,
            lines: h.lines.drain(..).collect(),
            dropped: std::mem::take(&mut h.dropped),
            open: !h.hung_up,
        };
        h.bytes = 0;
        let attached = (!h.hung_up).then(|| h.fd.as_raw_fd());
        send(fd, &message, attached)?;
    }
    held.retain(|_, h| !h.hung_up);
    send(fd, &FromKeeper::Done {}, None)
}
