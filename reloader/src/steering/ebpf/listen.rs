//! The listen notifier: a `sock_ops` program on the controller's cgroup
//! that reports, on a ring buffer, each socket that starts listening on a
//! managed address, so the controller learns of a generation's listeners
//! without polling.
//!
//! Kernel behaviour this relies on: a `sock_ops` program attached to a
//! cgroup runs `BPF_SOCK_OPS_TCP_LISTEN_CB` for every `listen(2)` of a
//! process in it or below; the link is released with the controller's last
//! descriptor of it, so a killed controller leaves none behind.

#![allow(clippy::disallowed_methods)] // attaching at start-up, on its blocking thread only (`startup::prepare`)

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, SockOps},
};
use reloader_ebpf::{ListenEvent, map, program};

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
        let program: &mut SockOps = self
            .ebpf
            .program_mut(program::NOTIFY_LISTEN)
            .ok_or(SteeringError::MapNotFound {
                name: program::NOTIFY_LISTEN,
            })?
            .try_into()
            .map_err(|source| SteeringError::ProgramLoadError {
                program: program::NOTIFY_LISTEN,
                source,
            })?;
        program
            .load()
            .map_err(|source| SteeringError::ProgramLoadError {
                program: program::NOTIFY_LISTEN,
                source,
            })?;
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

/// The listen notifier's ring buffer: readable when a socket started
/// listening on a managed address.
pub struct ListenEvents(RingBuf<MapData>);

impl ListenEvents {
    /// Consumes every pending event; returns the listeners named.
    pub fn drain(&mut self) -> Vec<u32> {
        let mut listeners = Vec::new();
        while let Some(item) = self.0.next() {
            if item.len() >= size_of::<ListenEvent>() {
                // SAFETY: the program writes whole ListenEvents; read_unaligned
                // copes with the ring buffer's 8-byte alignment.
                let event: ListenEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                listeners.push(event.listener);
            }
        }
        listeners
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
