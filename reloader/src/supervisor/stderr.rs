//! A generation's stderr: read line by line as it arrives (a server never
//! blocks on a full pipe to us), forwarded to the controller's log sink
//! (non-blocking: see [`crate::logging`]), and its last lines kept for
//! failure reports.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, BufReader};

/// How many stderr lines of a generation are kept for failure reports.
const TAIL_LINES: usize = 20;
/// Longest line kept or forwarded; the rest is cut.
const MAX_LINE: usize = 4096;

/// The last stderr lines of a generation.
#[derive(Clone, Debug)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for StderrTail {
    fn default() -> Self {
        Self {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES))),
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl StderrTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().expect("stderr tail lock");
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, once the process closed its stderr (or `wait`
    /// passed: a crashed server's children may keep it open).
    pub async fn lines(&self, wait: Duration) -> Vec<String> {
        let mut closed = self.closed.subscribe();
        let _ = tokio::time::timeout(wait, closed.wait_for(|c| *c)).await;
        self.lines
            .lock()
            .expect("stderr tail lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Reads `stderr` (the read end of generation `generation`'s stderr pipe)
/// until it closes.
pub fn forward(
    stderr: std::os::fd::OwnedFd,
    instance: String,
    generation: u64,
) -> std::io::Result<StderrTail> {
    let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)?;
    let tail = StderrTail::default();
    let kept = tail.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            buf.truncate(MAX_LINE);
            let line = String::from_utf8_lossy(&buf).into_owned();
            crate::logging::server_line(&instance, generation, &line);
            kept.push(line);
        }
        kept.closed.send_replace(true);
    });
    Ok(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_tail_keeps_the_last_lines_and_ends_with_the_pipe() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 30 ]; do echo line $i >&2; i=$((i+1)); done",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let tail = forward(child.stderr.take().unwrap().into(), "t".into(), 1).unwrap();
        let lines = tail.lines(Duration::from_secs(5)).await;
        child.wait().unwrap();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.first().map(String::as_str), Some("line 10"));
        assert_eq!(lines.last().map(String::as_str), Some("line 29"));
    }
}
