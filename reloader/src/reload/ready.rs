//! `--ready notify`: a generation's own `NOTIFY_SOCKET`, on which it says
//! `READY=1` (sd_notify). reloader's own `NOTIFY_SOCKET` (systemd's) is never
//! passed to servers.

use std::{path::PathBuf, time::Instant};

use crate::{error::ReloadError, state::Client};

/// A generation's notify socket; the file is removed on drop.
pub struct NotifySocket {
    /// Its path as the server is told it (`NOTIFY_SOCKET`).
    pub path: PathBuf,
    /// The path it was bound at (through the runtime directory's
    /// descriptor).
    bound: PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    /// Binds at `bound`, announced to the server as `path`.
    pub async fn bind(bound: PathBuf, path: PathBuf) -> Result<Self, ReloadError> {
        let stale = bound.clone();
        #[allow(clippy::disallowed_methods)] // on a blocking thread
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(stale)).await;
        let socket = tokio::net::UnixDatagram::bind(&bound).map_err(|source| {
            ReloadError::NotifySocketError {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(Self {
            path,
            bound,
            socket,
        })
    }

    /// Waits for a datagram with a `READY=1` line, while generation `number`
    /// runs, until `deadline`.
    pub async fn wait_ready(
        &self,
        client: &Client,
        number: u64,
        deadline: Instant,
    ) -> Result<(), ReloadError> {
        let mut snapshots = client.subscribe();
        let mut buf = vec![0u8; 4096];
        loop {
            snapshots.borrow_and_update().check_alive(number)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReloadError::NoReadyNotify {
                    timeout: client.config().ready.timeout,
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
                changed = snapshots.changed() => if changed.is_err() {
                    return Err(ReloadError::Stopping);
                },
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.bound);
        // On a blocking thread while a runtime runs (always, but in tests
        // that drop one outside it).
        #[allow(clippy::disallowed_methods)] // on a blocking thread, or without a runtime
        let remove = move || {
            let _ = std::fs::remove_file(path);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}
