//! [`ConfigError`]: what can be wrong in a `reloader run` command line.

use std::net::SocketAddr;

use thiserror::Error;

use reloader_ebpf::limits::MAX_LISTENERS;

use super::MAX_DRAINING;

/// Errors in a `reloader run` command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--listen` is not `IP:PORT`.
    #[error(
        "--listen {value:?} is not an address: use IP:PORT (TCP), udp://IP:PORT?mode=flows \
         (UDP, flows kept with their generation) or udp://IP:PORT?mode=stateless, e.g. \
         127.0.0.1:8080, [::]:443 or udp://0.0.0.0:53?mode=stateless"
    )]
    BadAddress { value: String },
    /// A UDP address without `?mode=`: both modes lose traffic when used
    /// for the other kind of server, so neither is assumed.
    #[error(
        "--listen udp://{addr} needs a mode: udp://{addr}?mode=flows for QUIC and other \
         sessions (a flow's datagrams stay with the generation that has it until it exits), or \
         udp://{addr}?mode=stateless for DNS and other single-datagram exchanges (every \
         datagram goes to the newest generation)"
    )]
    UdpModeMissing { addr: SocketAddr },
    /// Port 0 cannot be shared by generations.
    #[error(
        "--listen {addr}: port 0 picks a different port for every socket; name the port the server listens on"
    )]
    PortZero { addr: SocketAddr },
    /// The same address twice.
    #[error("--listen {listen} is given twice")]
    DuplicateListen { listen: String },
    /// No `--listen` at all.
    #[error("at least one --listen ADDR is needed: the addresses the server listens on")]
    NoListen,
    /// Too many addresses for the steering maps.
    #[error("{count} --listen addresses; at most {MAX_LISTENERS} are supported")]
    TooManyListen { count: usize },
    /// Empty command.
    #[error(
        "no server command: put it after `--`, e.g. `reloader run --listen 0.0.0.0:80 -- nginx -g 'daemon off;'`"
    )]
    EmptyCommand,
    /// A duration that is zero or unreasonable.
    #[error("{flag} {value}: {why}")]
    BadDuration {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// A signal name we do not know.
    #[error("{flag} {value:?} is not a signal name: use e.g. TERM, QUIT, USR1, INT, HUP")]
    BadSignal { flag: &'static str, value: String },
    /// A size that is not one.
    #[error("{flag} {value:?}: {why} (a size: bytes, or with a unit, e.g. 512M, 2G, 1.5GiB)")]
    BadSize {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// `--max-draining` out of range.
    #[error("--max-draining {value}: must be between 1 and {MAX_DRAINING}")]
    BadMaxDraining { value: u32 },
    /// A probe URL we cannot use.
    #[error("{flag} {value:?}: {why}")]
    BadProbe {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// A canary share we cannot use.
    #[error(
        "--canary {value:?}: {why}; give the share of new connections as a percentage, or \
         ascending steps, e.g. 10% or 1%,10%,50%"
    )]
    BadCanary { value: String, why: String },
    /// `--health-interval` or `--health-failures` without `--health-probe`.
    #[error("{flag} needs --health-probe URL (what to send to each generation)")]
    HealthWithoutProbe { flag: &'static str },
    /// `--metrics` is not `IP:PORT`.
    #[error("--metrics {value:?} is not an address: use IP:PORT, e.g. 127.0.0.1:9090")]
    BadMetricsAddress { value: String },
    /// `--check` cannot be split into words.
    #[error(
        "{flag} {value:?}: {why}; give the command as one string, quoted like in a shell, \
         e.g. --check 'nginx -t -c /etc/nginx/nginx.conf' (no pipes or variables: use \
         {flag} 'sh -c \"...\"' for those)"
    )]
    BadCheck {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    /// `--watch` or `--config` with an empty path.
    #[error("{flag}: the path is empty")]
    EmptyPath { flag: &'static str },
    /// A bad instance name.
    #[error(
        "--name {value:?}: use letters, digits, '-', '_' and '.' (at most 64), not starting with '.'"
    )]
    BadName { value: String },
}
