//! `--ready notify`: a generation's own `NOTIFY_SOCKET`, on which it says
//! `READY=1` (sd_notify). reloader's own `NOTIFY_SOCKET` (systemd's) is never
//! passed to servers.

use std::{path::PathBuf, time::Instant};

use crate::{error::ReloadError, state::Handle};

/// A generation's notify socket; the file is removed on drop.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind(path: PathBuf) -> Result<Self, ReloadError> {
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path).map_err(|source| {
            ReloadError::NotifySocketError {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(Self { path, socket })
    }

    /// Waits for a datagram with a `READY=1` line, while generation `number`
    /// runs, until `deadline`.
    pub async fn wait_ready(
        &self,
        handle: &Handle,
        number: u64,
        deadline: Instant,
    ) -> Result<(), ReloadError> {
        let mut changed = handle.subscribe();
        let mut buf = vec![0u8; 4096];
        loop {
            handle.read(|s| s.check_alive(number))?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReloadError::NoReadyNotify {
                    timeout: handle.read(|s| s.config().ready_timeout),
                });
            }
            tokio::select! {
                received = self.socket.recv(&mut buf) => {
                    let n = received.map_err(|source| ReloadError::NotifySocketError {
                        path: self.path.display().to_string(),
                        source,
                    })?;
                    if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                        return Ok(());
                    }
                }
                _ = changed.changed() => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
