//! Support for the `udp` suite: real UDP servers wrapped unmodified (DNS:
//! unbound and Knot; HTTP/3: Caddy), the clients that load them (dnsperf,
//! an aioquic script), and the naive reload the suite compares reloader
//! with (start generation N+1 beside N with `SO_REUSEPORT`, then stop N).
//!
//! Kernel behaviour this depends on (see the design notes, "UDP flows"): the
//! reuseport group of a UDP address spreads datagrams over its sockets by a
//! hash of the 4-tuple, so every socket that joins or leaves the group moves
//! some flows to another socket (another process); and the datagrams queued
//! in a UDP socket when it closes are dropped, not handed to another member.

pub mod caddy;
pub mod dns;
pub mod dnsperf;
pub mod h3;
pub mod naive;

use std::{
    collections::BTreeSet,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

/// `CLOCK_MONOTONIC` in seconds: the clock the Python clients stamp their
/// requests with (`time.monotonic()`), so a test can place them next to its
/// own reloads.
pub fn monotonic() -> f64 {
    reloader::demo::load::monotonic_ns() as f64 / 1e9
}

/// Panics, saying how to install it, unless `program` exists.
pub fn require(program: &Path, what: &str) {
    assert!(
        program.exists(),
        "{what} is not installed ({} is missing): run `cargo xtask test`, which installs what \
         the udp suite needs",
        program.display()
    );
}

/// This directory (the Python client lives here).
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/udp")
}

/// Inodes of the UDP sockets bound to `port` (IPv4 or IPv6, unconnected or
/// not) in the calling thread's network namespace.
///
/// Read from `/proc/thread-self/net/udp{,6}`: `/proc/self/net` (and the
/// procfs crate's `net::udp`) shows the network namespace of the process's
/// main thread, not of a test thread that unshared its own.
pub fn udp_inodes(port: u16) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for file in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Ok(inode) = inode.parse()
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// How many of the UDP sockets bound to `port` the process tree of `pid`
/// holds.
pub fn udp_sockets_held(pid: u32, port: u16) -> usize {
    let bound = udp_inodes(port);
    let tree: Vec<u32> = crate::process::tree(pid).into_iter().collect();
    reloader::discovery::socket_holders(&tree)
        .keys()
        .filter(|inode| bound.contains(inode))
        .count()
}

/// A server process started by a test without reloader (the naive reload),
/// in a process group of its own, its output in a log file.
pub struct Spawned {
    child: Child,
    pub generation: u64,
    pub log: PathBuf,
}

impl Spawned {
    /// Starts `command` (`{generation}` replaced) with `env` and
    /// `RELOADER_GENERATION` set as reloader would set them.
    pub fn start(
        command: &[String],
        env: &[(String, String)],
        generation: u64,
        dir: &Path,
    ) -> Self {
        let command: Vec<String> = command
            .iter()
            .map(|a| a.replace("{generation}", &generation.to_string()))
            .collect();
        let log = dir.join(format!("naive-gen-{generation}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&command[0])
            .args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RELOADER_GENERATION", generation.to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        Self {
            child,
            generation,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits up to `timeout` for the exit; then kills the
    /// process group. Returns whether it exited by itself in time.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> bool {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() > deadline {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Whatever it left behind in its group.
        let _ = killpg(pid, Signal::SIGKILL);
        true
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One completed reload: when it completed (CLOCK_MONOTONIC seconds) and
/// the generation it made active.
#[derive(Clone, Copy, Debug)]
pub struct Completed {
    pub at: f64,
    pub generation: u64,
}

/// The newest generation whose reload had completed (old generation gone)
/// by `t`: requests started after that must be answered by it or a later
/// one.
pub fn newest_completed_by(completed: &[Completed], t: f64) -> u64 {
    completed
        .iter()
        .filter(|c| c.at < t)
        .map(|c| c.generation)
        .max()
        .unwrap_or(1)
}

/// Runs `reload` `reloads` times, starting one every `period` (or as soon
/// as the previous one finished, when it took longer). `reload(i)` returns
/// the generation it made active, or why it failed.
pub fn schedule(
    reloads: u64,
    period: Duration,
    mut reload: impl FnMut(u64) -> Result<u64, String>,
) -> (Vec<Completed>, Vec<String>) {
    let mut completed = Vec::new();
    let mut failures = Vec::new();
    for i in 1..=reloads {
        let started = Instant::now();
        match reload(i) {
            Ok(generation) => completed.push(Completed {
                at: monotonic(),
                generation,
            }),
            Err(e) => failures.push(format!("reload {i}: {e}")),
        }
        if let Some(rest) = period.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    (completed, failures)
}
