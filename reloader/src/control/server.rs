//! The controller's side of the control socket: serves each connection in
//! its own task with a bounded request read, and never queues one. At most
//! [`MAX_CLIENTS`] connections hold a place at once; when all are taken, the
//! longest-waiting connection that has not even sent its request yet gives
//! its place to the newcomer (so a flood of idle connections, even one
//! that reopens them as fast as it can, cannot lock `reload` or `stop`
//! out). Only when every place is busy with a real request is a client told
//! "busy" (the CLI asks again within its `--timeout`). Accept errors
//! (EMFILE) back off instead of spinning.
//!
//! An idle connection's place sits in the idle queue with it, so an
//! eviction hands it to the newcomer at once: the accept loop never waits
//! for the evicted connection's task to run. (It used to wait up to 100 ms
//! for the place to come back; in a slow guest that wait made the accept
//! loop fall behind a flood that filled the socket's backlog, and a `stop`
//! queued behind it was not even accepted within 10 s.) A connection whose
//! request has already arrived reads it before it looks at an eviction.

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
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

/// A connection that holds a place but has not sent a request yet.
struct IdleEntry {
    id: u64,
    /// Tells its task it was evicted.
    give_up: oneshot::Sender<()>,
    /// Its place, kept here while it is idle.
    place: OwnedSemaphorePermit,
}

/// The idle connections, oldest first.
#[derive(Clone, Default)]
struct Idle(Arc<Mutex<VecDeque<IdleEntry>>>);

impl Idle {
    fn push(&self, entry: IdleEntry) {
        self.0.lock().expect("idle lock").push_back(entry);
    }

    /// The oldest idle connection's place; its task is told to give up.
    fn evict_oldest(&self) -> Option<OwnedSemaphorePermit> {
        let entry = self.0.lock().expect("idle lock").pop_front()?;
        let _ = entry.give_up.send(());
        Some(entry.place)
    }

    /// Connection `id` is idle no more: its place, unless it was evicted.
    fn leave(&self, id: u64) -> Option<OwnedSemaphorePermit> {
        let mut idle = self.0.lock().expect("idle lock");
        let at = idle.iter().position(|e| e.id == id)?;
        idle.remove(at).map(|e| e.place)
    }
}

/// Serves `listener` until the task is dropped.
pub async fn serve<C: Controller>(controller: C, listener: UnixListener) {
    let places = Arc::new(Semaphore::new(MAX_CLIENTS));
    let idle = Idle::default();
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
        // Every place taken: the oldest idle connection yields its own.
        let place = places
            .clone()
            .try_acquire_owned()
            .ok()
            .or_else(|| idle.evict_oldest());
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
        idle.push(IdleEntry { id, give_up, place });
        let (controller, idle) = (controller.clone(), idle.clone());
        tokio::spawn(async move {
            if let Err(error) = serve_client(&controller, stream, owner, id, &idle, evicted).await {
                warn!(%error, "control connection");
            }
            // Ended while idle (refused, or an error before its request):
            // its place is free again.
            drop(idle.leave(id));
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
        // A request that has arrived is read even if an eviction came too.
        biased;
        request = read_request(read) => request,
        _ = evicted => Err("closed: this connection sent no request while another client \
                            needed its place".to_owned()),
    };
    // A request arrived: this connection is no longer idle, and holds its
    // place while it is served (none if it was evicted meanwhile).
    let _place = idle.leave(id);
    let response = match request {
        Ok(Request::Status {}) => match controller.status().await {
            Some(status) => Response::Status {
                status: Box::new(status),
            },
            None => Response::Error {
                message: "the instance is stopping".into(),
            },
        },
        Ok(Request::Stop { deadline_unix_ms }) if past(deadline_unix_ms) => Response::Error {
            message: "this stop reached the controller after its client had given up waiting \
                      (the controller was not reading its socket: stopped, or overloaded); it \
                      was not carried out"
                .into(),
        },
        Ok(Request::Stop { .. }) => controller.stop(),
        Ok(Request::Handover {}) => controller.handover().await,
        Ok(Request::Reload { wait, canary }) => controller.reload(wait, canary).await,
        Ok(Request::Rollback { wait }) => controller.rollback(wait).await,
        Ok(Request::Promote { wait }) => controller.promote(wait).await,
        Err(message) => Response::Error { message },
    };
    write.write_all(&protocol::encode(&response)).await?;
    write.shutdown().await
}

/// Whether a request's deadline has passed.
fn past(deadline_unix_ms: Option<u64>) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    deadline_unix_ms.is_some_and(|deadline| now > deadline)
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

#[cfg(test)]
mod tests {
    //! The control server against a fake controller, unprivileged: bad
    //! requests, the idle-connection eviction and the busy answer.

    use std::{
        path::PathBuf,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::UnixStream,
        sync::Notify,
    };

    use super::*;
    use crate::{config::CanaryPlan, status::StatusReport};

    /// Counts the requests it gets; a reload waits until `release`.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<AtomicUsize>,
        release: Arc<Notify>,
    }

    impl Controller for Fake {
        async fn reload(&self, _: bool, _: Option<CanaryPlan>) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            Response::ReloadAccepted
        }
        async fn rollback(&self, _: bool) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Response::Error {
                message: "nothing".into(),
            }
        }
        async fn promote(&self, _: bool) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Response::Error {
                message: "nothing".into(),
            }
        }
        fn stop(&self) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Response::Stopping
        }
        async fn handover(&self) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Response::HandingOver { controller_pid: 1 }
        }
        async fn status(&self) -> Option<StatusReport> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Some(StatusReport::default())
        }
    }

    /// A server for `fake` on a socket in a fresh directory.
    fn serving(fake: &Fake) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(serve(fake.clone(), listener));
        (dir, path, task)
    }

    /// Sends `line` (a newline is added) and reads the one answer.
    async fn ask(path: &PathBuf, line: &[u8]) -> Response {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(line).await.unwrap();
        stream.write_all(b"\n").await.unwrap();
        read_answer(stream).await
    }

    async fn read_answer(stream: UnixStream) -> Response {
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await.unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_bad_request_gets_an_error_and_reaches_no_controller() {
        let fake = Fake::default();
        let (_dir, path, task) = serving(&fake);
        for line in [
            &br#"{"request":"explode"}"#[..],
            br#"{"request":"reload"}"#,
            br#"{"request":"status","extra":1}"#,
            b"\xff\xfe",
            b"",
            br#"{"request":"reload","wait":true,"canary":{"steps":[]}}"#,
            br#"{"request":"reload","wait":true,"canary":{"steps":[4000000000]}}"#,
            br#"{"request":"reload","wait":true,"canary":{"steps":[5000,1000],"dwell_ms":9}}"#,
            br#"{"request":"reload","wait":true,"canary":{"steps":[1000],"dwell_ms":18446744073709551615}}"#,
        ] {
            match ask(&path, line).await {
                Response::Error { message } => assert!(
                    message.starts_with("malformed request"),
                    "{}: {message}",
                    String::from_utf8_lossy(line)
                ),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
        // Too large, then a connection that closes before its newline.
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(&[b' '; MAX_REQUEST + 10]).await.unwrap();
        match read_answer(stream).await {
            Response::Error { message } => assert!(message.contains("larger than"), "{message}"),
            other => panic!("{other:?}"),
        }
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(br#"{"request":"status"}"#).await.unwrap();
        stream.shutdown().await.unwrap();
        match read_answer(stream).await {
            Response::Error { message } => assert!(message.contains("truncated"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
        // And a good request still gets its answer.
        assert!(matches!(
            ask(&path, br#"{"request":"status"}"#).await,
            Response::Status { .. }
        ));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        task.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_give_their_place_to_a_request() {
        let fake = Fake::default();
        let (_dir, path, task) = serving(&fake);
        // Every place taken by a connection that sends nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CLIENTS {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        tokio::task::yield_now().await;
        match ask(&path, br#"{"request":"status"}"#).await {
            Response::Status { .. } => {}
            other => panic!("{other:?}"),
        }
        // The oldest idle one was told why it lost its place.
        match read_answer(idle.remove(0)).await {
            Response::Error { message } => {
                assert!(message.contains("sent no request"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        task.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn with_every_place_busy_a_newcomer_is_told_busy() {
        let fake = Fake::default();
        let (_dir, path, task) = serving(&fake);
        let mut waiting = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            stream
                .write_all(b"{\"request\":\"reload\",\"wait\":true}\n")
                .await
                .unwrap();
            waiting.push(stream);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while fake.calls.load(Ordering::SeqCst) < MAX_CLIENTS {
            assert!(tokio::time::Instant::now() < deadline, "requests not taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match ask(&path, br#"{"request":"status"}"#).await {
            Response::Busy { message } => assert!(message.contains("busy"), "{message}"),
            other => panic!("{other:?}"),
        }
        // Once they are answered, places are free again.
        fake.release.notify_waiters();
        for stream in waiting {
            assert!(matches!(
                read_answer(stream).await,
                Response::ReloadAccepted
            ));
        }
        assert!(matches!(
            ask(&path, br#"{"request":"status"}"#).await,
            Response::Status { .. }
        ));
        task.abort();
    }
}
