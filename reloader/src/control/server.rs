//! The controller's side of the control socket: serves each connection in
//! its own task with a bounded request read, and never queues one. At most
//! [`MAX_CLIENTS`] connections hold a place at once; when all are taken, the
//! longest-waiting connection that has not even sent its request yet gives
//! its place to the newcomer (so a flood of idle connections, even one
//! that reopens them as fast as it can, cannot lock `reload` or `stop`
//! out). Only when every place is busy with a real request is a client told
//! "busy" (the CLI asks again within its `--timeout`). Accept errors
//! (EMFILE) back off instead of spinning.

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, oneshot},
};
use tracing::warn;

use super::{
    Controller,
    protocol::{self, DecodeError, MAX_REQUEST, Request, Response},
};

/// Control connections served at once.
pub const MAX_CLIENTS: usize = 256;
/// How long a newcomer waits for an evicted idle connection's place.
const EVICTION_WAIT: Duration = Duration::from_millis(100);
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections that hold a place but have not sent a request yet, oldest
/// first, each with what makes it give up its place.
type Idle = Arc<Mutex<VecDeque<(u64, oneshot::Sender<()>)>>>;

/// Serves `listener` until the task is dropped.
pub async fn serve<C: Controller>(controller: C, listener: UnixListener) {
    let places = Arc::new(Semaphore::new(MAX_CLIENTS));
    let idle: Idle = Arc::default();
    let mut next_id = 0u64;
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
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => Some(place),
            Err(_) => {
                // Every place is taken: the oldest idle connection yields.
                let evicted = idle.lock().expect("idle lock").pop_front();
                match evicted {
                    Some((_, give_up)) => {
                        let _ = give_up.send(());
                        tokio::time::timeout(EVICTION_WAIT, places.clone().acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                    None => None,
                }
            }
        };
        let Some(place) = place else {
            tokio::spawn(async move {
                let busy = Response::Busy {
                    message: format!(
                        "busy: {MAX_CLIENTS} control requests are being served; try again"
                    ),
                };
                let mut stream = stream;
                let _ = stream.write_all(&protocol::encode(&busy)).await;
            });
            continue;
        };
        let (give_up, evicted) = oneshot::channel();
        next_id += 1;
        let id = next_id;
        idle.lock().expect("idle lock").push_back((id, give_up));
        let (controller, idle) = (controller.clone(), idle.clone());
        tokio::spawn(async move {
            if let Err(error) = serve_client(&controller, stream, owner, id, &idle, evicted).await {
                warn!(%error, "control connection");
            }
            idle.lock().expect("idle lock").retain(|(i, _)| *i != id);
            drop(place);
        });
    }
}

async fn serve_client<C: Controller>(
    controller: &C,
    stream: UnixStream,
    owner: u32,
    id: u64,
    idle: &Idle,
    evicted: oneshot::Receiver<()>,
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
    let request = tokio::select! {
        request = read_request(read) => request,
        _ = evicted => Err("closed: this connection sent no request while another client \
                            needed its place".to_owned()),
    };
    // A request arrived: this connection is no longer idle.
    idle.lock().expect("idle lock").retain(|(i, _)| *i != id);
    let response = match request {
        Ok(Request::Status {}) => Response::Status {
            status: Box::new(controller.status().await),
        },
        Ok(Request::Stop {}) => controller.stop(),
        Ok(Request::Reload { wait, canary }) => controller.reload(wait, canary).await,
        Ok(Request::Rollback { wait }) => controller.rollback(wait).await,
        Ok(Request::Promote {}) => controller.promote().await,
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
