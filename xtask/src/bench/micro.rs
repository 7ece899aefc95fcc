//! The micro-measurements: steering overhead and cutover latency (the
//! `steerbench` binary, which uses the steering module directly in a
//! namespace of its own), and an idle controller's wake-ups and memory.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::{
    scenario::{Bins, start_reloader},
    server::{self, Server, Setup},
};

fn steerbench(bins: &Bins, args: &[&str]) -> Result<Value> {
    let out = Command::new(&bins.steerbench)
        .args(args)
        .output()
        .with_context(|| format!("failed to run {}", bins.steerbench.display()))?;
    if !out.status.success() {
        bail!(
            "steerbench {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("steerbench printed no JSON")
}

/// New-connection rate with the program attached / without.
pub fn overhead(bins: &Bins, pairs: usize, round_ms: u64) -> Result<Value> {
    steerbench(
        bins,
        &[
            "overhead",
            "--pairs",
            &pairs.to_string(),
            "--round-ms",
            &round_ms.to_string(),
        ],
    )
}

/// Map update to the first connection accepted by the new slot.
pub fn cutover(bins: &Bins, rounds: usize) -> Result<Value> {
    steerbench(bins, &["cutover", "--rounds", &rounds.to_string()])
}

/// An idle `reloader run` controller (one test-server generation, no
/// traffic).
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub seconds: f64,
    /// Context switches of all the controller's threads per second: each
    /// is a wake-up (or a preemption).
    pub wakeups_per_s: f64,
    pub voluntary: u64,
    pub nonvoluntary: u64,
    pub threads: usize,
    pub rss_kib: u64,
}

pub fn idle(bins: &Bins, seconds: f64) -> Result<Idle> {
    let bins = bins.clone();
    server::in_netns(move || {
        let setup = Setup::new(Server::TestServer, &bins.testserver, 1)?;
        let mut controller = start_reloader(&setup, &[]);
        // Let start-up settle before counting.
        std::thread::sleep(Duration::from_millis(500));
        let pid = controller.pid();
        // Matched by thread id (`idle::switches_between`): a sum over
        // threads shrinks when one exits meanwhile, which killed the
        // 1,000-reload run of 2026-12-07 after its scenarios.
        let before = crate::idle::per_thread(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let after = crate::idle::per_thread(pid)?;
        let (voluntary, nonvoluntary, threads) = crate::idle::switches_between(&before, &after);
        let elapsed = t0.elapsed().as_secs_f64();
        let rss_kib = procfs::process::Process::new(pid as i32)?
            .status()?
            .vmrss
            .unwrap_or(0);
        controller.stop();
        Ok(Idle {
            seconds: elapsed,
            wakeups_per_s: (voluntary + nonvoluntary) as f64 / elapsed,
            voluntary,
            nonvoluntary,
            threads,
            rss_kib,
        })
    })
}
