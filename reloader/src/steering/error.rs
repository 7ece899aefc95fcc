//! Errors of the steering module.

use std::{io, net::SocketAddr};

use aya::{EbpfError, maps::MapError, programs::ProgramError};
use reloader_ebpf::Limits;
use thiserror::Error;

/// Errors of the steering module. Each says what the user can do about it.
#[derive(Debug, Error)]
pub enum SteeringError {
    /// The kernel refused to create maps or load programs for lack of
    /// privilege.
    #[error(
        "the kernel refused to load the eBPF steering program (permission denied): run reloader \
         as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE (CAP_SYS_ADMIN on kernels \
         before 5.8)"
    )]
    PermissionDenied {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kernel has no `bpf(2)`.
    #[error(
        "this kernel has no BPF syscall (ENOSYS): reloader needs a kernel built with \
         CONFIG_BPF_SYSCALL, and is not supported inside gVisor-like sandboxes"
    )]
    NoBpfSyscall {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Creating the object's maps or parsing it failed.
    #[error("failed to load the eBPF steering object")]
    LoadError {
        #[source]
        source: EbpfError,
    },
    /// The kernel rejected a program.
    #[error("the kernel rejected the {program} program")]
    ProgramLoadError {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// The object lacks a map this module needs (object and source disagree).
    #[error("the eBPF object has no map {name}: rebuild it with `cargo xtask build-ebpf`")]
    MapNotFound { name: &'static str },
    /// A map operation failed.
    #[error("eBPF map {map}: {operation} failed")]
    MapError {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: MapError,
    },
    /// Attaching to or detaching from a reuseport group failed. `fd` is
    /// reloader's copy of the socket; callers name the server's own.
    #[error("failed to {operation} the steering program (SO_ATTACH_REUSEPORT_EBPF)")]
    AttachError {
        operation: &'static str,
        fd: i32,
        #[source]
        source: ProgramError,
    },
    /// A socket offered for registration lacks `SO_REUSEPORT`.
    #[error(
        "the listening socket for {addr} does not have SO_REUSEPORT set: the server \
         must set it before bind (nginx: `listen ... reuseport`; Envoy: `enable_reuse_port: true`; \
         HAProxy sets it by default), or run reloader with --inject-reuseport to set it for \
         the server"
    )]
    NotReuseport { fd: i32, addr: String },
    /// A socket offered for registration is an MPTCP socket: the kernel
    /// lets no `SK_REUSEPORT` program attach to it or select it.
    #[error(
        "the listening socket for {addr} is an MPTCP socket (IPPROTO_MPTCP, what Go >= 1.24 \
         listens with by default), and the kernel cannot steer connections to MPTCP listeners: \
         let the server listen with plain TCP (reloader sets GODEBUG=multipathtcp=0 for its \
         servers unless GODEBUG already sets multipathtcp; a Go program that calls \
         SetMultipathTCP(true) must stop doing so; or `sysctl net.mptcp.enabled=0` in the \
         server's network namespace)"
    )]
    MptcpListener { fd: i32, addr: String },
    /// A socket's bound address is not the listener's address.
    #[error("the socket is bound to {found}, not to listener {listener}'s address {expected}")]
    WrongAddress {
        fd: i32,
        listener: u32,
        expected: SocketAddr,
        found: String,
    },
    /// Querying a socket failed.
    #[error("failed to query the socket (getsockname/getsockopt)")]
    SocketError {
        fd: i32,
        #[source]
        source: nix::Error,
    },
    /// Listener index outside the configured listeners, or not added.
    #[error("listener {listener} is not registered")]
    UnknownListener { listener: u32 },
    /// Slot index outside the configured slots.
    #[error("slot {slot} is out of range ({slots} slots per listener)")]
    SlotOutOfRange { slot: u32, slots: u32 },
    /// More sockets than a slot holds.
    #[error(
        "{count} sockets for one address in one generation; at most {max} are configured \
         (--max-sockets-per-listener)"
    )]
    TooManySockets { count: usize, max: u32 },
    /// Map sizes of zero.
    #[error("steering maps cannot be sized {limits:?}")]
    BadLimits { limits: Limits },
    /// The socket is not of the listener's transport.
    #[error("the socket is not {}", match expected {
        super::Transport::Tcp => "a listening TCP socket",
        super::Transport::Udp => "a UDP socket",
    })]
    WrongKind { fd: i32, expected: super::Transport },
    /// The controller's cgroup could not be opened.
    #[error("cannot open the cgroup {path}")]
    CgroupError {
        path: String,
        #[source]
        source: io::Error,
    },
    /// `--inject-reuseport` cannot work on this kernel.
    #[error(
        "--inject-reuseport is not supported on this kernel ({kernel}): {why}; it needs cgroup \
         bind programs that may set SO_REUSEPORT with bpf_setsockopt (verified on Linux 6.1, \
         6.12 and 6.18). Run without it, and make the server set SO_REUSEPORT \
         itself"
    )]
    InjectUnsupported { kernel: String, why: String },
    /// Attaching the bind programs to a cgroup (or the start-up probe in
    /// its scratch cgroup) failed.
    #[error("--inject-reuseport: cannot attach the bind programs to the cgroup {cgroup}")]
    InjectAttachError {
        cgroup: String,
        #[source]
        source: io::Error,
    },
    /// Two listeners the program could not tell apart.
    #[error("{addr} cannot be managed together with {other}: {why}")]
    ListenerConflict {
        addr: SocketAddr,
        other: SocketAddr,
        why: &'static str,
    },
    /// bpffs is not mounted and could not be.
    #[error(
        "bpffs is not mounted at /sys/fs/bpf and mounting it failed: mount it (`mount -t bpf bpf \
         /sys/fs/bpf`) so a restarted controller can adopt running generations"
    )]
    BpffsUnavailable {
        #[source]
        source: nix::Error,
    },
    /// Creating the pin directory failed.
    #[error("failed to create the pin directory {path}")]
    PinDirError {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Reading `/sys/devices/system/cpu/possible` failed.
    #[error("failed to count CPUs ({what})")]
    CpuCountError {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

pub(super) fn classify_load_error(source: EbpfError) -> SteeringError {
    classify(SteeringError::LoadError { source })
}

/// Turns errors caused by missing privilege or a missing syscall into the
/// variants that tell the user what to do.
pub(super) fn classify(error: SteeringError) -> SteeringError {
    match crate::root_errno(&error) {
        // EACCES is the verifier's answer, not a missing privilege.
        Some(libc::EPERM) => SteeringError::PermissionDenied {
            source: Box::new(error),
        },
        Some(libc::ENOSYS) => SteeringError::NoBpfSyscall {
            source: Box::new(error),
        },
        _ => error,
    }
}
