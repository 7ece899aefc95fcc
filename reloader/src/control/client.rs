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
         --control-socket)?{hint}"
    )]
    Unreachable {
        path: String,
        /// Where root's instance of that name would be, when the caller is
        /// not root and that may be the one meant (else empty).
        hint: String,
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

/// Where root puts instance sockets by default (`reloader run` as root).
const ROOT_DIR: &str = "/run/reloader";

/// For a caller who is not root and found no socket at `socket`: if root's
/// socket of the same name may exist (`root_socket_may_exist`: it does, or
/// its directory cannot be looked into), the hint to ask as root. A
/// non-root `reloader status` looks in `$XDG_RUNTIME_DIR/reloader` or
/// `/tmp/reloader-UID`, never where root's instances are.
fn root_instance_hint(
    socket: &Path,
    root_socket_may_exist: impl FnOnce(&Path) -> bool,
) -> Option<String> {
    let root_dir = Path::new(ROOT_DIR);
    if socket.parent() == Some(root_dir) {
        return None;
    }
    let root_socket = root_dir.join(socket.file_name()?);
    if !root_socket_may_exist(&root_socket) {
        return None;
    }
    Some(format!(
        " An instance started by root has its socket at {}, which only root can reach: run \
         this command with sudo",
        root_socket.display()
    ))
}

fn ask_once(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        let hint =
            if source.kind() == std::io::ErrorKind::NotFound && !nix::unistd::geteuid().is_root() {
                root_instance_hint(socket, |root| match std::fs::symlink_metadata(root) {
                    Ok(_) => true,
                    // /run/reloader is root's, mode 0700: we cannot tell.
                    Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
                })
            } else {
                None
            };
        ClientError::Unreachable {
            path: path.clone(),
            hint: hint.unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::root_instance_hint;

    /// A non-root `status` of root's instance (issue 29: it said only that
    /// /tmp/reloader-UID/NAME.sock did not exist).
    #[test]
    fn a_missing_socket_of_a_user_hints_at_roots_instance() {
        let mine = Path::new("/tmp/reloader-1000/web.sock");
        let hint = root_instance_hint(mine, |root| {
            assert_eq!(root, Path::new("/run/reloader/web.sock"));
            true
        })
        .expect("a hint");
        assert!(hint.contains("/run/reloader/web.sock"), "{hint}");
        assert!(hint.contains("sudo"), "{hint}");
        assert_eq!(root_instance_hint(mine, |_| false), None);
        assert_eq!(
            root_instance_hint(Path::new("/run/reloader/web.sock"), |_| true),
            None,
            "already root's path"
        );
    }
}
