//! The listen notifier: a `sock_ops` program on the controller's cgroup
//! that reports, on a ring buffer, each socket that starts listening on a
//! managed address, so the controller learns of a generation's listeners
//! without polling.
//!
//! Kernel behaviour this relies on: a `sock_ops` program attached to a
//! cgroup runs `BPF_SOCK_OPS_TCP_LISTEN_CB` for every `listen(2)` of a
//! process in it or below, whatever its network namespace; the link is
//! released with the controller's last descriptor of it, so a killed
//! controller leaves none behind. `bpf_get_netns_cookie` is callable from
//! `sock_ops` from Linux 5.15 and returns the cookie `SO_NETNS_COOKIE`
//! (5.14) gives userspace for the same namespace: with both, the notifier
//! reports listens in the controller's own namespace only; before, it
//! reports a listen on a managed address in any namespace of the cgroup
//! (the look that follows finds nothing new there: one wasted sock_diag
//! dump, nothing registered).

#![allow(clippy::disallowed_methods)] // attaching at start-up, on its blocking thread only (`startup::prepare`)

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, SockOps},
};
use reloader_ebpf::{ListenEvent, map, program};
use tracing::{debug, info};

use super::{Steering, take_map};
use crate::steering::{Result, SteeringError};

impl Steering {
    /// Attaches the listen notifier to the cgroup at `cgroup` (the
    /// controller's: servers it spawns are in it or below) and returns the
    /// ring buffer its events arrive on.
    pub fn listen_events(&mut self, cgroup: &Path) -> Result<ListenEvents> {
        let attach_error = |source| SteeringError::AttachError {
            operation: "attach the listen notifier to",
            fd: -1,
            source,
        };
        let dir = std::fs::File::open(cgroup).map_err(|source| SteeringError::CgroupError {
            path: cgroup.display().to_string(),
            source,
        })?;
        let scoped = self.netns_cookie.is_some()
            && match load_notifier(&mut self.ebpf, program::NOTIFY_LISTEN) {
                Ok(()) => true,
                Err(error) => {
                    debug!(
                        error = %crate::error_chain(&error),
                        "namespace-scoped listen notifier rejected"
                    );
                    false
                }
            };
        let name = if scoped {
            program::NOTIFY_LISTEN
        } else {
            info!(
                "listen events come from every network namespace of the cgroup: this kernel does \
                 not give sock_ops programs the network namespace (bpf_get_netns_cookie, Linux \
                 >= 5.15), so a listen on a managed address in another namespace also wakes the \
                 tracker (one look, nothing registered)"
            );
            load_notifier(&mut self.ebpf, program::NOTIFY_LISTEN_ANY_NETNS)?;
            program::NOTIFY_LISTEN_ANY_NETNS
        };
        let program: &mut SockOps = self
            .ebpf
            .program_mut(name)
            .expect("loaded just now")
            .try_into()
            .expect("a sock_ops program");
        // A bpf_link (Linux >= 5.7) always coexists with other programs on
        // the cgroup; its attach flags must be 0, which is what `Single`
        // passes (the kernel rejects BPF_F_ALLOW_MULTI on links: EINVAL).
        program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(attach_error)?;
        let ring = take_map(&mut self.ebpf, map::LISTEN_EVENTS)?;
        Ok(ListenEvents(ring))
    }
}

/// Loads the `sock_ops` program `name`.
fn load_notifier(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    let program: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(SteeringError::MapNotFound { name })?
        .try_into()
        .map_err(|source| SteeringError::ProgramLoadError {
            program: name,
            source,
        })?;
    program
        .load()
        .map_err(|source| SteeringError::ProgramLoadError {
            program: name,
            source,
        })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`,
/// Linux >= 5.14), or `None` where the kernel does not say.
pub(super) fn own_netns_cookie() -> Option<u64> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None).ok()?;
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, a u64 buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == size_of::<u64>() && value != 0).then_some(value)
}

/// The listen notifier's ring buffer: readable when a socket started
/// listening on a managed address, or a connection waits on a bridge.
pub struct ListenEvents(RingBuf<MapData>);

impl ListenEvents {
    /// Consumes every pending event.
    pub fn drain(&mut self) -> Vec<ListenEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.0.next() {
            if item.len() >= size_of::<ListenEvent>() {
                // SAFETY: the programs write whole ListenEvents; read_unaligned
                // copes with the ring buffer's 8-byte alignment.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        events
    }
}

impl AsFd for ListenEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for ListenEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
