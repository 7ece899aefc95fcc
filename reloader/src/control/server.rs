//! The controller's side of the control socket: binds it (mode 0600),
//! serves each connection in its own task with a bounded request read, and
//! never queues a connection: beyond [`MAX_CLIENTS`] at once a client is
//! told "busy" at once (idle connections, each holding its place up to the
//! request timeout, must never delay a reload). Accept errors (EMFILE)
//! back off instead of spinning.

use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};
use tracing::warn;

use super::{
    Controller,
    protocol::{self, DecodeError, MAX_REQUEST, Request, Response},
};

/// Control connections served at once.
pub const MAX_CLIENTS: usize = 256;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until the task is dropped.
pub async fn serve<C: Controller>(controller: C, listener: UnixListener) {
    let places = Arc::new(Semaphore::new(MAX_CLIENTS));
    let owner = nix::unistd::geteuid().as_raw();
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(error) => {
                backoff.wait(&error, "control socket").await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = Response::Busy {
                    message: format!("busy: {MAX_CLIENTS} control connections are open; try again"),
                };
                let mut stream = stream;
                let _ = stream.write_all(&protocol::encode(&busy)).await;
            });
            continue;
        };
        let controller = controller.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_client(&controller, stream, owner).await {
                warn!(%error, "control connection");
            }
            drop(place);
        });
    }
}

async fn serve_client<C: Controller>(
    controller: &C,
    stream: UnixStream,
    owner: u32,
) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if !protocol::peer_allowed(peer.uid(), owner) {
        warn!(uid = peer.uid(), "control connection refused: wrong uid");
        let message = format!(
            "permission denied: uid {} may not control this instance (owned by uid {owner})",
            peer.uid()
        );
        write
            .write_all(&protocol::encode(&Response::Error { message }))
            .await?;
        return Ok(());
    }
    let response = match read_request(read).await {
        Ok(Request::Status {}) => Response::Status {
            status: Box::new(controller.status().await),
        },
        Ok(Request::Stop {}) => controller.stop(),
        Ok(Request::Reload { wait }) => controller.reload(wait).await,
        Err(message) => Response::Error { message },
    };
    write.write_all(&protocol::encode(&response)).await?;
    write.shutdown().await
}

/// Reads one request line within [`MAX_REQUEST`] bytes and
/// [`REQUEST_TIMEOUT`].
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut line = Vec::new();
    let limited = tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64);
    let mut reader = BufReader::new(limited);
    let n = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| "timed out waiting for a request line".to_string())?
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        let error = if n >= MAX_REQUEST {
            DecodeError::TooLarge
        } else {
            DecodeError::Truncated
        };
        return Err(error.to_string());
    }
    line.pop();
    protocol::decode_request(&line).map_err(|e| e.to_string())
}
