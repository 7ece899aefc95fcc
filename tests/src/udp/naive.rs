//! The naive reload the suite measures reloader against: start generation
//! N+1 beside N (both bind with `SO_REUSEPORT`), wait until N+1 holds its
//! UDP sockets and serves, then send N its graceful stop and wait for it to
//! exit. No steering: the kernel's reuseport hash spreads datagrams over
//! both generations' sockets while they overlap, and re-spreads them each
//! time a socket joins or leaves.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use super::{Spawned, udp_sockets_held};

/// What to run and how to know a generation serves.
pub struct Plan {
    /// The server command; `{generation}` is replaced.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The UDP port it serves on, and how many sockets a generation binds
    /// there.
    pub port: u16,
    pub udp_sockets: usize,
    /// Its graceful stop, and how long it may take.
    pub drain: Signal,
    pub drain_timeout: Duration,
    /// Where the generations' logs go.
    pub dir: PathBuf,
    /// Beyond holding its sockets: whether generation N serves (e.g. a DNS
    /// answer from it), asked until true or until the ready timeout.
    pub serves: Box<dyn Fn(u64) -> bool>,
}

/// Generations started and stopped by hand.
pub struct Naive {
    plan: Plan,
    current: Spawned,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Naive {
    /// Starts generation 1 and waits until it serves.
    pub fn start(plan: Plan) -> Self {
        let mut current = Spawned::start(&plan.command, &plan.env, 1, &plan.dir);
        if let Err(e) = wait_ready(&plan, &mut current) {
            panic!("naive: generation 1: {e}");
        }
        Self { plan, current }
    }

    /// The running generation.
    pub fn generation(&self) -> u64 {
        self.current.generation
    }

    /// One reload: generation N+1 beside N, then N stopped. Returns N+1.
    pub fn reload(&mut self) -> Result<u64, String> {
        let next = self.current.generation + 1;
        let mut new = Spawned::start(&self.plan.command, &self.plan.env, next, &self.plan.dir);
        wait_ready(&self.plan, &mut new).map_err(|e| format!("generation {next}: {e}"))?;
        let mut old = std::mem::replace(&mut self.current, new);
        if !old.stop(self.plan.drain, self.plan.drain_timeout) {
            return Err(format!(
                "generation {} did not exit within {:?} of {:?} (killed)",
                old.generation, self.plan.drain_timeout, self.plan.drain
            ));
        }
        Ok(next)
    }

    /// Stops the running generation.
    pub fn stop(mut self) {
        self.current.stop(self.plan.drain, self.plan.drain_timeout);
    }
}

fn wait_ready(plan: &Plan, spawned: &mut Spawned) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while udp_sockets_held(spawned.pid(), plan.port) < plan.udp_sockets {
        if !spawned.running() {
            return Err(format!("exited before it listened: {}", spawned.log_text()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "did not bind {} UDP sockets on port {} within {READY_TIMEOUT:?}: {}",
                plan.udp_sockets,
                plan.port,
                spawned.log_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    while !(plan.serves)(spawned.generation) {
        if !spawned.running() || Instant::now() > deadline {
            return Err(format!(
                "holds its sockets but did not serve within {READY_TIMEOUT:?}: {}",
                spawned.log_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
