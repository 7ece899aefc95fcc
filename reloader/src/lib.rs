//! reloader: zero-drop reloads for servers that listen with `SO_REUSEPORT`.
//!
//! Module map (README "How it works" has the picture); dependencies point
//! down this list, never up (`cargo xtask modcycles` checks):
//! - [`instance`]: one `reloader run` — boot, the run loop, recovery,
//!   reaping, shutdown.
//! - [`reload`]: one reload, step by step (the machine), its scheduler,
//!   probes and drains.
//! - [`state`]: the one owner of an instance's state, behind a handle.
//! - [`control`], [`metrics`]: the control socket and Prometheus, each
//!   seeing the instance through a narrow trait and snapshots.
//! - [`steering`]: the eBPF program and its maps (the only module that
//!   talks to aya); [`discovery`]: which listening sockets a process tree
//!   holds; [`supervisor`]: spawning, reaping, pidfds.
//! - [`generation`]: the generation state machine (pure); [`status`]: what
//!   is reported; [`error`]: why a reload failed.
//! - [`config`], [`cli`]: validated command line; [`listen`]: the managed
//!   address type; [`logging`], [`notify`],
//!   [`net`]: output, systemd, listening sockets; [`demo`].
//! - [`digest`]: the config identity (`--config`); [`watch`]: reload on
//!   change (`--watch`).

// Unit tests set up files and processes with blocking calls; the rule
// (`clippy.toml`) is about the controller's runtime thread.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod digest;
pub mod discovery;
pub mod error;
pub mod generation;
pub mod instance;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod reload;
pub mod state;
pub mod status;
pub mod steering;
pub mod supervisor;
pub mod watch;

/// Threads the controller's blocking pool may run at once (discovery
/// scans, netlink dumps, the state file's fsync): bounded, so a stuck
/// kernel call cannot make the controller grow threads without end.
pub const MAX_BLOCKING_THREADS: usize = 8;

/// `error: cause: cause`, for messages and one-line log fields.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

/// The errno at the bottom of an error chain, if any.
pub fn root_errno(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        current = e.source();
    }
    None
}
