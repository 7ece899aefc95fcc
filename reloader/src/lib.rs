//! reloader: zero-drop reloads for servers that listen with `SO_REUSEPORT`.
//!
//! Module map (docs/how-it-works.md has the picture); dependencies point
//! down this list, never up (`cargo xtask modcycles` checks):
//! - [`instance`]: one `reloader run` — start-up and recovery, and the
//!   **owner** (`instance::Owner`): the one task that holds the instance's
//!   state by value. Everything else reaches the state through it: control
//!   requests, signals and exits are its events; the reload, drains, the
//!   listener tracker, health checks and status readers send it
//!   `state::Command`s and read the `state::Snapshot` it publishes after
//!   each step.
//! - `reload`: one reload, step by step (the machine), its scheduler,
//!   probes, drains and listener tracking, as tasks of the owner; what
//!   they do to processes and the kernel goes through its `Host` trait
//!   (blocking work on blocking threads; a fake in unit tests).
//! - [`state`]: the instance's state (pure: no locks, no async, no
//!   blocking calls), the commands its owner takes, the snapshot it
//!   publishes, the state file's layout.
//! - [`control`] and `metrics`: the control socket and Prometheus, each
//!   seeing the instance through a narrow trait.
//! - [`steering`]: the eBPF program and its maps (the only module that
//!   talks to aya); [`discovery`]: which listening sockets a process tree
//!   holds; [`supervisor`]: spawning, reaping, pidfds.
//! - [`generation`]: the generation state machine (pure); [`status`]: what
//!   is reported (the JSON wire types); `error`: why a reload failed.
//! - [`config`], [`cli`]: the validated command line, grouped by the part
//!   that uses it; `listen`: the managed address type; [`logging`],
//!   `notify`, [`net`]: output, systemd, listening sockets; [`demo`].
//! - `digest`: the config identity (`--config`); `watch`: reload on
//!   change (`--watch`); [`dns`]: the DNS messages the probe and the demo
//!   write.
//! - [`fleet`]: `reloader fleet`, the CLI's questions to Prometheus about
//!   every replica (blocking; no part of the controller).
//!
//! The public modules are the crate's surface for the binary (`cli`,
//! `instance::run`, `control`'s client, `supervisor::exec_shim`), the
//! privileged tests and xtask (`status` and `control` to read answers,
//! `steering` to drive the maps directly, `discovery`, `net`, `demo`'s
//! server and load, `state::saved` for the state file); the rest is
//! `pub(crate)`. Blocking calls are listed in `clippy.toml`
//! (`disallowed-methods`): only modules whose code runs on blocking
//! threads allow them, each saying why.

// Unit tests set up files and processes with blocking calls; the rule
// (`clippy.toml`) is about the controller's runtime thread.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub(crate) mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub(crate) mod digest;
pub mod discovery;
pub mod dns;
pub(crate) mod error;
pub mod fleet;
pub mod generation;
pub(crate) mod holdings;
pub mod instance;
pub(crate) mod listen;
pub mod logging;
pub(crate) mod metrics;
pub mod net;
pub(crate) mod notify;
pub(crate) mod reload;
pub(crate) mod rundir;
pub mod state;
pub mod status;
pub mod steering;
pub mod supervisor;
pub(crate) mod watch;

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
