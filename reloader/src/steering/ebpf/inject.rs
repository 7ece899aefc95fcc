//! `--inject-reuseport`: the `cgroup/bind4` and `cgroup/bind6` programs
//! (`reloader-ebpf/src/inject.rs`) that give a generation's binds to a
//! managed address `SO_REUSEPORT`, loaded once per controller with the
//! managed addresses in their map, checked on this kernel at start
//! ([`Injector::probe`]) and attached to each generation's cgroup before
//! its first process runs any of the server's code ([`Injector::attach`]).
//!
//! Kernel behaviour this relies on, checked on Linux 6.1, 6.12 and 6.18
//! (docs/how-it-works.md, "Design notes"):
//! - The attachment is a plain `BPF_PROG_ATTACH` (not a `bpf_link`): the
//!   cgroup holds the program, and the program its maps, with no
//!   descriptor of ours open. So the programs stay attached when the
//!   controller exits or is killed, and a server process that binds later
//!   (a worker replacing another) still gets `SO_REUSEPORT`; they go when
//!   the cgroup is removed. A `bpf_link` (what aya's `attach` makes from
//!   Linux 5.7) would be detached with the controller's last descriptor of
//!   it.
//! - `BPF_F_ALLOW_MULTI`: programs a server attaches in cgroups below its
//!   generation's still run, and ours runs for them too.
//! - Cgroup programs run for processes in the cgroup and below only: they
//!   are attached to generation cgroups and nowhere else, so no other
//!   process gets the option.
//! - `bpf_setsockopt` from bind hooks: by our reading Linux 5.10's verifier rejects
//!   the call (the load fails); where the call loads but does not take
//!   `SO_REUSEPORT`, it returns an error and the bind goes on without it.
//!   The probe binds a socket in a scratch cgroup and reads the option
//!   back, so both are refused at start by name.

#![allow(clippy::disallowed_methods)] // loading and the probe at start-up, attaching in the spawn: blocking threads only

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::CgroupSockAddr,
};
use reloader_ebpf::{INJECT_FAILED, INJECTED, ListenerKey, map, program};

use super::{Steering, take_map};
use crate::steering::{ListenerSpec, Mode, Result, SteeringError, listener_key};

/// `bpf(2)` command and attach types (include/uapi/linux/bpf.h).
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_CGROUP_INET6_BIND: u32 = 9;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The probe's key: a TCP bind of `0.0.0.0:0`, in the map only while the
/// probe runs (before any generation has the programs).
const PROBE_KEY: ListenerKey = ListenerKey {
    family: libc::AF_INET as u32,
    protocol: libc::IPPROTO_TCP as u32,
    port: 0,
    addr: [0; 4],
};

/// The loaded bind programs and their maps.
pub struct Injector {
    bind4: OwnedFd,
    bind6: OwnedFd,
    keys: HashMap<MapData, ListenerKey, u32>,
    counts: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the bind programs with `listen` in their map. A kernel whose
    /// verifier rejects them (`bpf_setsockopt` in a bind hook) is refused
    /// by name.
    pub fn injector(&mut self, listen: &[ListenerSpec]) -> Result<Injector> {
        let mut fds = Vec::new();
        for name in [program::INJECT_BIND4, program::INJECT_BIND6] {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(SteeringError::MapNotFound { name })?
                .try_into()
                .map_err(|source| SteeringError::ProgramLoadError {
                    program: name,
                    source,
                })?;
            program
                .load()
                .map_err(|source| SteeringError::InjectUnsupported {
                    kernel: kernel_release(),
                    why: format!(
                        "its verifier rejects the {name} program (cgroup bind programs may call \
                         bpf_setsockopt from Linux 5.11 on): {}",
                        crate::error_chain(&source)
                    ),
                })?;
            let fd = program
                .fd()
                .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
                .map_err(|source| SteeringError::ProgramLoadError {
                    program: name,
                    source,
                })?;
            fds.push(fd);
        }
        let mut keys: HashMap<MapData, ListenerKey, u32> =
            take_map(&mut self.ebpf, map::INJECT_KEYS)?;
        for spec in listen {
            keys.insert(listener_key(Mode::SelectOrMigrate, spec), 1, 0)
                .map_err(|source| SteeringError::MapError {
                    map: map::INJECT_KEYS,
                    operation: "insert",
                    source,
                })?;
        }
        let bind6 = fds.pop().expect("two programs");
        let bind4 = fds.pop().expect("two programs");
        Ok(Injector {
            bind4,
            bind6,
            keys,
            counts: take_map(&mut self.ebpf, map::INJECTED)?,
        })
    }
}

impl Injector {
    /// Attaches both programs to the cgroup `dir` (a generation's, made
    /// just now and still empty).
    pub fn attach(&self, dir: &Path) -> Result<()> {
        let error = |source| SteeringError::InjectAttachError {
            cgroup: dir.display().to_string(),
            source,
        };
        let cgroup = std::fs::File::open(dir).map_err(error)?;
        prog_attach(cgroup.as_fd(), self.bind4.as_fd(), BPF_CGROUP_INET4_BIND).map_err(error)?;
        prog_attach(cgroup.as_fd(), self.bind6.as_fd(), BPF_CGROUP_INET6_BIND).map_err(error)?;
        Ok(())
    }

    /// Checks that this kernel lets the programs set `SO_REUSEPORT`: in
    /// the scratch cgroup `dir` (created and removed here), a child process
    /// binds a TCP socket to `0.0.0.0:0` — the probe's key, in the map only
    /// meanwhile — and reads the option back.
    pub fn probe(&mut self, dir: &Path) -> Result<()> {
        let error = |source| SteeringError::InjectAttachError {
            cgroup: dir.display().to_string(),
            source,
        };
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(error(e)),
            _ => {}
        }
        let probed = self.attach(dir).and_then(|()| {
            self.keys
                .insert(PROBE_KEY, 1, 0)
                .map_err(|source| SteeringError::MapError {
                    map: map::INJECT_KEYS,
                    operation: "insert",
                    source,
                })?;
            let outcome = bind_in(dir).map_err(error);
            let _ = self.keys.remove(&PROBE_KEY);
            outcome
        });
        let _ = std::fs::remove_dir(dir);
        let set = probed?;
        let (injected, failed) = self.counts();
        if set {
            return Ok(());
        }
        Err(SteeringError::InjectUnsupported {
            kernel: kernel_release(),
            why: if failed > 0 {
                format!(
                    "a cgroup bind program's bpf_setsockopt(SOL_SOCKET, SO_REUSEPORT) fails on \
                     it ({failed} failed, {injected} set)"
                )
            } else {
                "a socket bound in a cgroup with the bind programs did not get SO_REUSEPORT (the \
                 program did not run for it)"
                    .into()
            },
        })
    }

    /// Binds given `SO_REUSEPORT` so far, and binds where setting it
    /// failed (every CPU's counts summed).
    pub fn counts(&self) -> (u64, u64) {
        let sum = |index| {
            self.counts
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        (sum(INJECTED), sum(INJECT_FAILED))
    }
}

/// `BPF_PROG_ATTACH` of `program` to `cgroup` as `attach_type`, with
/// `BPF_F_ALLOW_MULTI`: an attachment that outlives our descriptors.
fn prog_attach(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    /// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
    #[repr(C)]
    struct Attr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let attr = Attr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: bpf(2) with a valid, fully initialised attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &raw const attr,
            size_of::<Attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a child process in cgroup `dir` that binds a TCP socket to
/// `0.0.0.0:0` and exits 0 if it then has `SO_REUSEPORT`, 1 if not.
fn bind_in(dir: &Path) -> io::Result<bool> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    let procs_fd = procs.as_raw_fd();
    // SAFETY: the child calls only async-signal-safe functions (write,
    // socket, bind, getsockopt, _exit) on memory it owns, then exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            // "0": the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(2);
            }
            let socket = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if socket < 0 {
                libc::_exit(3);
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            };
            libc::bind(
                socket,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let mut value: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(
                socket,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&raw mut value).cast(),
                &mut len,
            );
            libc::_exit(if value == 1 { 0 } else { 1 });
        },
        pid => {
            drop(procs);
            let mut status = 0;
            loop {
                // SAFETY: waits for the child forked just now.
                let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
                if rc == pid {
                    break;
                }
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                Some(0) => Ok(true),
                Some(1) => Ok(false),
                Some(2) => Err(io::Error::other(
                    "the probe could not enter its cgroup (cgroup.procs)",
                )),
                _ => Err(io::Error::other(format!(
                    "the probe process ended with wait status {status}"
                ))),
            }
        }
    }
}

/// `uname -r`.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}
