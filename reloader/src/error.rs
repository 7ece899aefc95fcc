//! Why a reload (or the first start) failed: one error type for every step
//! of the reload machine and of the state it changes. Each variant names
//! what the server or the kernel did — the server's own pid and fd number,
//! the address, the errno (kept as `#[source]`) — and what to do about it.
//! A failed reload leaves the previous generation active: nothing was
//! routed to the candidate, so nothing is lost.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    discovery::DiscoveryError,
    generation::human_duration,
    steering::{ListenerSpec, SteeringError},
};

/// Why a reload failed.
#[derive(Debug, Error)]
pub enum ReloadError {
    /// The instance is stopping; no new generation starts.
    #[error("the instance is stopping")]
    Stopping,
    /// The server command could not be started.
    #[error("{command}: cannot start it")]
    SpawnError {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `--pass-fds`: reloader could not open a listener to pass.
    #[error("--pass-fds: cannot listen on {addr} (is it held by a socket without SO_REUSEPORT?)")]
    PassFdsError {
        addr: ListenerSpec,
        #[source]
        source: std::io::Error,
    },
    /// `--ready notify`: the generation's notify socket could not be made.
    #[error("cannot create the notify socket {path}")]
    NotifySocketError {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The generation's process ended before it was ready.
    #[error("{how} before it was ready{hint}")]
    ExitedBeforeReady { how: String, hint: &'static str },
    /// The generation ended (killed or failed) while the reload ran.
    #[error("generation {generation} ended: {outcome}")]
    Ended { generation: u64, outcome: String },
    /// Not every address had a listening socket in the generation's tree in
    /// time.
    #[error(
        "not ready within {} (--ready-timeout): no listening socket for {} in its process tree{}",
        human_duration(*timeout),
        list(missing),
        listening_elsewhere(missing, listening)
    )]
    NotListening {
        timeout: Duration,
        missing: Vec<ListenerSpec>,
        /// What the tree does listen on.
        listening: Vec<String>,
    },
    /// `--ready notify`: no `READY=1` in time.
    #[error(
        "not ready within {} (--ready-timeout): it never sent READY=1 to its NOTIFY_SOCKET \
         (--ready notify)",
        human_duration(*timeout)
    )]
    NoReadyNotify { timeout: Duration },
    /// The readiness probe never passed.
    #[error(
        "readiness probe did not pass within {} (--ready-timeout): {last}",
        human_duration(*timeout)
    )]
    ProbeFailed { timeout: Duration, last: String },
    /// Finding or copying the generation's sockets failed.
    #[error("cannot inspect the generation's sockets")]
    DiscoveryError {
        #[source]
        source: Box<DiscoveryError>,
    },
    /// A socket of the server could not be registered with the steering
    /// program.
    #[error("{addr}: cannot steer to the socket held by pid {pid} ({process}) as fd {fd}")]
    RegisterError {
        addr: ListenerSpec,
        pid: u32,
        process: String,
        /// The server's own descriptor number.
        fd: i32,
        #[source]
        source: Box<SteeringError>,
    },
    /// A steering map update of the reload failed.
    #[error("{addr}: {what}")]
    SteeringError {
        addr: ListenerSpec,
        what: &'static str,
        #[source]
        source: Box<SteeringError>,
    },
    /// `--check` failed: nothing was spawned, no slot was taken, the active
    /// generation is untouched.
    #[error("--check `{command}` {how}: nothing was started{}", printed(output))]
    CheckFailed {
        command: String,
        /// `exited with status 1`, `killed by SIGSEGV`, `did not finish
        /// within 30s (killed)`.
        how: String,
        /// Its last lines of output (stdout and stderr, in order).
        output: Vec<String>,
    },
    /// `--check` could not be started.
    #[error("--check `{command}`: cannot start it: nothing was started")]
    CheckSpawnError {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A canary runs: the next reload waits for its verdict.
    #[error(
        "generation {generation} is a canary: `reloader promote` or `reloader rollback` it \
         before the next reload"
    )]
    CanaryRunning { generation: u64 },
    /// Waiting for the result went wrong inside the controller.
    #[error("internal error: {what}")]
    Internal { what: String },
}

impl ReloadError {
    /// Whether copying found sockets failed because their holder exited or
    /// closed them after the scan (see [`DiscoveryError::vanished`]).
    pub fn holder_vanished(&self) -> bool {
        matches!(self, Self::DiscoveryError { source } if source.vanished())
    }

    /// Whether `--check` refused the reload (counted apart in the metrics).
    pub fn is_check_failure(&self) -> bool {
        matches!(
            self,
            Self::CheckFailed { .. } | Self::CheckSpawnError { .. }
        )
    }

    /// What kind of failure it is, for scripts.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Stopping => FailureKind::Stopping,
            Self::SpawnError { .. }
            | Self::PassFdsError { .. }
            | Self::NotifySocketError { .. } => FailureKind::SpawnFailed,
            Self::ExitedBeforeReady { .. } | Self::Ended { .. } => FailureKind::ExitedBeforeReady,
            Self::NotListening { .. } | Self::NoReadyNotify { .. } => FailureKind::NotReady,
            Self::ProbeFailed { .. } => FailureKind::ProbeFailed,
            Self::RegisterError { source, .. }
                if matches!(**source, SteeringError::NotReuseport { .. }) =>
            {
                FailureKind::NoReuseport
            }
            Self::DiscoveryError { .. }
            | Self::RegisterError { .. }
            | Self::SteeringError { .. } => FailureKind::SteeringFailed,
            Self::CheckFailed { .. } | Self::CheckSpawnError { .. } => FailureKind::CheckFailed,
            Self::CanaryRunning { .. } => FailureKind::CanaryRunning,
            Self::Internal { .. } => FailureKind::Internal,
        }
    }
}

/// Why a reload did not succeed, for scripts: `failure.kind` of a reload
/// report (`reload --wait --json`, `last_reload` in `status --json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// `--check` refused it: nothing was started.
    CheckFailed,
    /// The server command (or what it is given) could not be started.
    SpawnFailed,
    /// The new generation exited before it was ready.
    ExitedBeforeReady,
    /// It did not listen everywhere (or say `READY=1`) in time.
    NotReady,
    /// It listens without `SO_REUSEPORT`.
    NoReuseport,
    /// Its readiness probe did not pass in time.
    ProbeFailed,
    /// Finding, registering or steering to its sockets failed.
    SteeringFailed,
    /// A canary runs: promote or roll it back first.
    CanaryRunning,
    /// The instance is stopping.
    Stopping,
    /// It exited (or stopped listening) after the cutover, and the
    /// previous generation was made active again if it could be.
    CrashedAfterCutover,
    /// `reloader rollback` during its hold or canary.
    RolledBack,
    /// It failed its health checks and was rolled back.
    RolledBackByHealth,
    /// Something inside the controller went wrong.
    Internal,
}

/// A reload that did not succeed: its kind, what happened, and which
/// generation serves now — read from the owner of the instance's state at
/// the moment it decided, so overlapping reloads name the right one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadFailure {
    pub kind: FailureKind,
    /// What happened, for people (the same text as the report's `error`).
    pub detail: String,
    /// The generation active when the outcome was decided.
    pub active: Option<u64>,
}

fn printed(output: &[String]) -> String {
    if output.is_empty() {
        "; it printed nothing".into()
    } else {
        let mut text = "; it printed:".to_owned();
        for line in output {
            text.push_str("\n  ");
            text.push_str(line);
        }
        text
    }
}

/// Why `reloader rollback` or `reloader promote` cannot be done now.
#[derive(Debug, Error)]
pub enum RolloutError {
    /// No generation is held and no canary runs.
    #[error(
        "nothing to roll back to: {}",
        match active {
            Some(g) => format!(
                "generation {g} is active and no previous generation is kept (the previous one \
                 was told to drain or has exited; run with --keep-previous DURATION to keep it \
                 for a while after each reload)"
            ),
            None => "no generation is active".into(),
        }
    )]
    NothingToRollBack { active: Option<u64> },
    /// The held generation no longer holds a listener for every address.
    #[error(
        "generation {held} cannot be made active again: it no longer listens on {}",
        list(missing)
    )]
    HeldLostListeners {
        held: u64,
        missing: Vec<ListenerSpec>,
    },
    /// `promote` without a canary.
    #[error("no canary runs: start one with `reloader reload --canary 10%`")]
    NoCanary,
    /// The map update failed; nothing was changed.
    #[error("{addr}: {what}")]
    SteeringError {
        addr: ListenerSpec,
        what: &'static str,
        #[source]
        source: Box<SteeringError>,
    },
}

fn list(items: &[impl ToString]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn listening_elsewhere(missing: &[ListenerSpec], addrs: &[String]) -> String {
    if addrs.is_empty() {
        return " (it listens on nothing)".into();
    }
    let mut text = format!(" (it listens on {})", list(addrs));
    for spec in missing {
        for addr in addrs {
            if let Some(hint) = other_form(spec, addr) {
                text.push_str("; ");
                text.push_str(&hint);
            }
        }
    }
    text
}

/// When the server listens on `listening` (as discovery prints it) in
/// another form of `spec`'s port — the IPv6 wildcard (dual-stack), or an
/// IPv6 socket bound to an IPv4-mapped address — which the kernel keeps
/// apart from `spec` (another socket, another reuseport group): which
/// `--listen` covers it.
fn other_form(spec: &ListenerSpec, listening: &str) -> Option<String> {
    use std::net::{IpAddr, SocketAddr};

    use crate::listen::Transport;
    let (transport, text) = match listening.strip_prefix("udp://") {
        Some(rest) => (Transport::Udp, rest),
        None => (Transport::Tcp, listening),
    };
    let addr: SocketAddr = text.parse().ok()?;
    if transport != spec.transport || addr.port() != spec.addr.port() || addr == spec.addr {
        return None;
    }
    let flag = match transport {
        Transport::Tcp => format!("--listen {addr}"),
        Transport::Udp => format!("--listen udp://{addr}"),
    };
    match (addr.ip(), spec.addr.ip()) {
        (IpAddr::V6(v6), IpAddr::V4(_)) if v6.is_unspecified() => Some(format!(
            "{addr} is the IPv6 wildcard (dual-stack: it takes IPv4 too), a different socket \
             from {} to the kernel: {flag} covers it",
            spec.addr
        )),
        (IpAddr::V6(v6), _) if v6.to_ipv4_mapped().is_some() => Some(format!(
            "{addr} is an IPv6 socket bound to an IPv4-mapped address, a different socket from \
             {} to the kernel: {flag} covers it",
            spec.addr
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_the_server_did() {
        let e = ReloadError::NotListening {
            timeout: Duration::from_secs(2),
            missing: vec![
                "127.0.0.1:8081"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            ],
            listening: vec!["0.0.0.0:8081".into()],
        };
        assert_eq!(
            e.to_string(),
            "not ready within 2s (--ready-timeout): no listening socket for 127.0.0.1:8081 in \
             its process tree (it listens on 0.0.0.0:8081)"
        );
        // Every way of not becoming ready in time names the flag that sets
        // the time (issue 29: a slow server's error did not).
        for slow in [
            ReloadError::NoReadyNotify {
                timeout: Duration::from_secs(30),
            },
            ReloadError::ProbeFailed {
                timeout: Duration::from_secs(30),
                last: "connection refused".into(),
            },
        ] {
            assert!(
                slow.to_string().contains("within 30s (--ready-timeout)"),
                "{slow}"
            );
        }
        let dual_stack = ReloadError::NotListening {
            timeout: Duration::from_secs(2),
            missing: vec![
                "0.0.0.0:8081"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            ],
            listening: vec!["[::]:8081".into(), "udp://[::]:8081".into()],
        };
        assert_eq!(
            dual_stack.to_string(),
            "not ready within 2s (--ready-timeout): no listening socket for 0.0.0.0:8081 in its \
             process tree (it listens on [::]:8081, udp://[::]:8081); [::]:8081 is the IPv6 \
             wildcard (dual-stack: it takes IPv4 too), a different socket from 0.0.0.0:8081 to \
             the kernel: --listen [::]:8081 covers it"
        );
        let io = std::io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        let chained = ReloadError::SpawnError {
            command: "x".into(),
            source: io,
        };
        assert_eq!(crate::root_errno(&chained), Some(libc::EOPNOTSUPP));
        assert!(crate::error_chain(&chained).starts_with("x: cannot start it: "));
        let check = ReloadError::CheckFailed {
            command: "nginx -t".into(),
            how: "exited with status 1".into(),
            output: vec!["nginx: [emerg] unexpected \"}\" in /etc/nginx/nginx.conf:9".into()],
        };
        assert_eq!(
            check.to_string(),
            "--check `nginx -t` exited with status 1: nothing was started; it printed:\n  \
             nginx: [emerg] unexpected \"}\" in /etc/nginx/nginx.conf:9"
        );
        assert!(check.is_check_failure());
    }
}
