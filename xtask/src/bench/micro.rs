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

/// Summed over every thread of `pid`: (voluntary, nonvoluntary, threads).
fn context_switches(pid: u32) -> Result<(u64, u64, usize)> {
    let (mut voluntary, mut nonvoluntary, mut threads) = (0, 0, 0);
    for task in procfs::process::Process::new(pid as i32)?.tasks()? {
        let status = task?.status()?;
        voluntary += status.voluntary_ctxt_switches.unwrap_or(0);
        nonvoluntary += status.nonvoluntary_ctxt_switches.unwrap_or(0);
        threads += 1;
    }
    Ok((voluntary, nonvoluntary, threads))
}

pub fn idle(bins: &Bins, seconds: f64) -> Result<Idle> {
    let bins = bins.clone();
    server::in_netns(move || {
        let setup = Setup::new(Server::TestServer, &bins.testserver, 1)?;
        let mut controller = start_reloader(&setup, &[]);
        // Let start-up settle before counting.
        std::thread::sleep(Duration::from_millis(500));
        let pid = controller.pid();
        let (v0, n0, _) = context_switches(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (v1, n1, threads) = context_switches(pid)?;
        let elapsed = t0.elapsed().as_secs_f64();
        let rss_kib = procfs::process::Process::new(pid as i32)?
            .status()?
            .vmrss
            .unwrap_or(0);
        controller.stop();
        Ok(Idle {
            seconds: elapsed,
            wakeups_per_s: ((v1 - v0) + (n1 - n0)) as f64 / elapsed,
            voluntary: v1 - v0,
            nonvoluntary: n1 - n0,
            threads,
            rss_kib,
        })
    })
}
