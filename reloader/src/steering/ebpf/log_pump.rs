//! The aya-log pump: forwards the steering program's debug statements
//! (kept at load when the `reloader::ebpf` tracing target is at debug level)
//! from aya-log's ring buffer to the `log` crate, which the binary bridges
//! to tracing.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use tracing::warn;

use super::Steering;

impl Steering {
    /// Starts the aya-log pump for the program's debug statements (a no-op
    /// unless [`Options::ebpf_debug_logs`] was set): records go to the `log`
    /// crate, which the binary bridges to tracing. Poll the returned fd for
    /// readability and call [`LogPump::flush`].
    ///
    /// [`Options::ebpf_debug_logs`]: crate::steering::Options::ebpf_debug_logs
    pub fn log_pump(&mut self) -> Option<LogPump> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(LogPump(logger)),
            Err(error) => {
                // As in aya-template: logging is best effort.
                warn!(%error, "eBPF logs unavailable");
                None
            }
        }
    }
}

/// Drives aya-log: records from the program's debug statements.
pub struct LogPump(aya_log::EbpfLogger<&'static dyn log::Log>);

impl LogPump {
    /// Forwards every pending record to the `log` crate.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl AsFd for LogPump {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for LogPump {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
