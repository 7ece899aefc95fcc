//! Drives `h3client.py` (aioquic, from target/venv): a long-lived QUIC
//! connection with a request every 100 ms, or a stream of new QUIC
//! connections with one request each. The script's docstring says what is
//! a failure and what is a reconnect; its JSON report is decoded here (a
//! key the script no longer prints fails the decoding).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Deserialize;

use super::{Completed, newest_completed_by, require, source_dir};
use crate::servers::venv;

/// Which client.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// One connection, a request every `interval`.
    LongLived { interval: Duration },
    /// `per_second` new connections, one request each.
    NewConnections { per_second: u32 },
}

/// One request's outcome, as the script reports it.
#[derive(Clone, Debug, Deserialize)]
pub struct Outcome {
    /// When it started (CLOCK_MONOTONIC seconds).
    pub t: f64,
    pub generation: Option<u64>,
    pub error: Option<String>,
    /// Answered on a new connection after the server closed the previous
    /// one gracefully.
    pub reconnected: bool,
}

/// A finished client run, as the script reports it.
#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    pub mode: String,
    pub requests: u64,
    pub failed: u64,
    pub reconnects: u64,
    pub connections: u64,
    pub by_generation: BTreeMap<u64, u64>,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// Failures by kind ("no answer within 3.0s": 12), the kind without
    /// numbers that differ per request.
    pub fn failure_kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for error in self.outcomes.iter().filter_map(|o| o.error.as_deref()) {
            *kinds.entry(error.to_owned()).or_default() += 1;
        }
        kinds
    }

    pub fn summary(&self) -> String {
        let what = if self.mode == "long" {
            format!(
                "long-lived connection: {} requests, {} failed, {} reconnects ({} connections)",
                self.requests, self.failed, self.reconnects, self.connections
            )
        } else {
            format!(
                "new connections: {} connections, {} failed, {} reconnects",
                self.requests, self.failed, self.reconnects
            )
        };
        format!(
            "{what}; answered per generation {:?}; failures {:?}",
            self.by_generation,
            self.failure_kinds()
        )
    }

    /// Requests answered by an older generation than the newest one whose
    /// reload had completed `margin` seconds before they started.
    pub fn answered_by_older(&self, completed: &[Completed], margin: f64) -> Vec<String> {
        self.outcomes
            .iter()
            .filter_map(|o| {
                let served = o.generation?;
                let newest = newest_completed_by(completed, o.t - margin);
                (served < newest).then(|| {
                    format!(
                        "a request started at {:.3}, after generation {newest} was active and \
                         its predecessor had exited, was answered by generation {served}",
                        o.t
                    )
                })
            })
            .collect()
    }
}

/// A running client.
pub struct H3Client {
    child: Child,
    stderr: Option<JoinHandle<String>>,
    pub command: String,
}

impl H3Client {
    /// Starts the client against `addr` (it runs until [`H3Client::finish`],
    /// at most 10 minutes) and waits until it runs.
    pub fn start(addr: SocketAddr, mode: Mode) -> Self {
        let python = venv().join("bin/python");
        require(&python, "the venv with aioquic (target/venv)");
        let script = source_dir().join("h3client.py");
        let mut args: Vec<String> = vec![
            script.display().to_string(),
            match mode {
                Mode::LongLived { .. } => "long".into(),
                Mode::NewConnections { .. } => "new".into(),
            },
            "--host".into(),
            addr.ip().to_string(),
            "--port".into(),
            addr.port().to_string(),
            "--duration".into(),
            "600".into(),
        ];
        match mode {
            Mode::LongLived { interval } => {
                args.extend(["--interval".into(), interval.as_secs_f64().to_string()])
            }
            Mode::NewConnections { per_second } => {
                args.extend(["--rate".into(), per_second.to_string()])
            }
        }
        let mut child = Command::new(&python)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", python.display()));
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        let _ = stderr.read_line(&mut first);
        if first.trim() != "started" {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not start (is aioquic in the venv? run `cargo xtask test`):\n{first}{rest}",
                script.display()
            );
        }
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        Self {
            child,
            stderr: Some(stderr),
            command: format!("{} {}", python.display(), args.join(" ")),
        }
    }

    /// Stops it (`SIGTERM`: no new request; those in flight finish) and
    /// parses its report.
    pub fn finish(mut self) -> Report {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read the client's report");
        let status = self.child.wait().expect("wait for the client");
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "the HTTP/3 client ({}) reported no report ({e}; exit {status}):\n{stdout}\n{stderr}",
                self.command
            )
        })
    }
}

impl Drop for H3Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
