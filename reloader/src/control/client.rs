//! The client side of the control socket (`reloader reload|status|stop`,
//! the demo): one request, one answer. A controller that is busy (all its
//! connection places taken) is asked again with backoff until the
//! client's own timeout.

#![allow(clippy::disallowed_methods)] // the blocking client: the CLI has no runtime; async callers use spawn_blocking

use std::{
    io::{BufRead, Write},
    path::Path,
    time::{Duration, Instant},
};

use thiserror::Error;

use super::protocol::{Request, Response, encode};

/// Errors of the client side.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error(
        "cannot reach the controller at {path}: is `reloader run` running with this --name (or \
         --control-socket)?"
    )]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No answer within the client's timeout.
    #[error(
        "no answer from the controller at {path} within {}: it is still working on it (a first \
         start or a reload whose new generation is slow to become ready, or a drain); see \
         `reloader status`, or give more --timeout",
        crate::generation::human_duration(*timeout)
    )]
    TimedOut { path: String, timeout: Duration },
    /// The exchange failed.
    #[error("no answer from the controller at {path}")]
    NoAnswer {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The answer is not a response we know.
    #[error("could not read the controller's answer: {reason}")]
    BadAnswer { reason: String },
}

/// First wait before asking a busy controller again.
const BUSY_BACKOFF: Duration = Duration::from_millis(20);

/// Sends `request` to the controller at `socket` and returns its answer,
/// waiting at most `timeout` in all (a "busy" answer is retried within it).
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = BUSY_BACKOFF;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let response = ask_once(socket, request, left.max(Duration::from_millis(1)))?;
        let busy = matches!(&response, Response::Busy { .. });
        if !busy || Instant::now() + backoff >= deadline {
            return Ok(response);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

fn ask_once(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        ClientError::Unreachable {
            path: path.clone(),
            source,
        }
    })?;
    let no_answer = |source| ClientError::NoAnswer {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    // A controller that refuses us answers and closes without reading, so
    // our write may fail (EPIPE) while its answer is waiting to be read.
    let written = stream.write_all(&encode(request));
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut {
                    path: path.clone(),
                    timeout,
                }
            }
            _ => no_answer(source),
        })?;
    if line.is_empty() {
        if let Err(source) = written {
            return Err(no_answer(source));
        }
        return Err(ClientError::BadAnswer {
            reason: "the controller closed the connection without answering".into(),
        });
    }
    serde_json::from_str(&line).map_err(|e| ClientError::BadAnswer {
        reason: e.to_string(),
    })
}
