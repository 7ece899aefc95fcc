//! The systemd notify protocol (`sd_notify(3)`), for `Type=notify` and
//! `Type=notify-reload` units: `READY=1` once the first generation is
//! active, `RELOADING=1` with `MONOTONIC_USEC` when a reload starts and
//! `READY=1` when it has completed (or failed: the old generation still
//! serves), `STATUS=` naming the active generation, `STOPPING=1`.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, so `reloader
//! run` behaves the same outside systemd.

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        debug!(%error, "sd_notify failed");
    }
}

/// The instance serves: the first generation is active, or a reload ended.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload started.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The instance is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
