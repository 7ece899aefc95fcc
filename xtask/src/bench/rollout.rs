//! `cargo xtask bench --rollout`: what a rollback costs and what a canary
//! split costs, with the test server under reloader (release build, its
//! own network namespace).
//!
//! - Rollback latency, per cycle (reload, then `reloader rollback` within
//!   the hold): the map updates as the controller timed them (the switch
//!   itself), the CLI's round trip (`reloader rollback` started → it
//!   returned), and how long after the request the first new connection was
//!   served by the previous generation (load of back-to-back connections;
//!   its resolution is the gap between two connection starts).
//! - Connection rate with a 50 % canary split vs one active generation, in
//!   alternating rounds of the same load in one run.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use reloader::{
    generation::State,
    status::{RollbackReport, RolloutKind},
};
use reloader_tests::{
    instance::{Instance, decode},
    load::Load,
    privileged,
};
use serde_json::{Value, json};

use super::scenario::Bins;

const ADDR: &str = "127.0.0.1:8080";

fn addr() -> SocketAddr {
    ADDR.parse().expect("address")
}

/// Runs the section; returns its JSON and prints its table.
pub fn run(bins: &Bins, cycles: usize, round: Duration, rounds: usize) -> Result<Value> {
    let bins_testserver = bins.testserver.clone();
    // A thread of its own: the network namespace is per thread.
    std::thread::spawn(move || measure(&bins_testserver, cycles, round, rounds))
        .join()
        .map_err(|_| anyhow::anyhow!("the rollout bench panicked"))?
}

fn measure(testserver: &Path, cycles: usize, round: Duration, rounds: usize) -> Result<Value> {
    privileged();
    let server = testserver.display().to_string();
    let mut instance = Instance::start(
        &[
            "--listen",
            ADDR,
            "--keep-previous",
            "10m",
            "--settle",
            "100ms",
        ],
        &[&server, "--listen", ADDR, "--workers", "2"],
    );
    let rollback = rollback_latency(&mut instance, cycles)?;
    let split = split_rate(&mut instance, round, rounds)?;
    ensure!(
        instance.stop().success(),
        "the instance did not stop cleanly"
    );
    let result = json!({"rollback": rollback, "split": split});
    println!("{}", render(&result));
    Ok(result)
}

/// Runs a client subcommand that must succeed; its stdout.
fn client(instance: &Instance, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(reloader_tests::instance::reloader_bin())
        .arg(args[0])
        .arg("--control-socket")
        .arg(&instance.socket)
        .args(&args[1..])
        .output()
        .context("run reloader")?;
    ensure!(
        out.status.success(),
        "reloader {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn rollback_latency(instance: &mut Instance, cycles: usize) -> Result<Value> {
    let load = Load::start(addr(), 4);
    std::thread::sleep(Duration::from_millis(300));
    let mut samples = Vec::new();
    for _ in 0..cycles {
        let reload = instance.reload_wait();
        ensure!(reload.ok(), "reload failed: {reload}");
        let previous = reload.done().previous.context("no previous")?;
        std::thread::sleep(Duration::from_millis(200));
        let requested = load.start.elapsed();
        let t0 = Instant::now();
        let stdout = client(instance, &["rollback", "--json"])?;
        let cli = t0.elapsed();
        let report: RollbackReport = decode("`rollback --json`", &stdout);
        ensure!(report.to == previous, "rolled back to {report:?}");
        samples.push((requested, cli, Some(report.map_update_us), previous));
        // Let the rolled-back generation go before the next cycle.
        let from = report.from;
        let deadline = Instant::now() + Duration::from_secs(30);
        while instance
            .status()
            .generations
            .iter()
            .any(|g| g.generation == from && g.state != State::Exited)
        {
            ensure!(Instant::now() < deadline, "generation {from} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    let failed = report.failures().len();
    ensure!(
        failed == 0,
        "{failed} connections failed during the rollbacks"
    );
    let mut map_us = Vec::new();
    let mut cli_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut gap_us = Vec::new();
    for (requested, cli, map, previous) in samples {
        map_us.extend(map);
        cli_ms.push(cli.as_secs_f64() * 1000.0);
        // Connections started after the request, in start order.
        let mut after: Vec<_> = report
            .outcomes
            .iter()
            .filter(|o| o.started >= requested)
            .collect();
        after.sort_by_key(|o| o.started);
        if let Some(first) = after
            .iter()
            .find(|o| o.result.as_ref().ok() == Some(&previous))
        {
            first_ms.push((first.started - requested).as_secs_f64() * 1000.0);
        }
        if let [a, b, ..] = after.as_slice() {
            gap_us.push((b.started - a.started).as_secs_f64() * 1e6);
        }
    }
    Ok(json!({
        "cycles": cycles,
        "connections": report.total(),
        "failed": failed,
        "map_update_us": stats(&map_us),
        "cli_round_trip_ms": stats(&cli_ms),
        "first_connection_on_previous_ms": stats(&first_ms),
        "connection_start_gap_us": stats(&gap_us),
    }))
}

/// Connections per second in alternating rounds: one active generation,
/// then a 50 % canary split, `rounds` times each.
fn split_rate(instance: &mut Instance, round: Duration, rounds: usize) -> Result<Value> {
    let mut plain = Vec::new();
    let mut split = Vec::new();
    for _ in 0..rounds {
        plain.push(rate(round)?);
        client(instance, &["reload", "--canary", "50%"])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while instance.status().rollout.map(|r| r.kind) != Some(RolloutKind::Canary) {
            ensure!(Instant::now() < deadline, "the canary did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        split.push(rate(round)?);
        // The previous generation is held (--keep-previous); the next
        // round's reload ends that hold.
        client(instance, &["promote"])?;
    }
    let plain_median = median(&plain);
    let split_median = median(&split);
    Ok(json!({
        "rounds": rounds,
        "round_ms": round.as_millis() as u64,
        "one_generation_per_s": stats(&plain),
        "canary_50_percent_per_s": stats(&split),
        "ratio": split_median / plain_median,
    }))
}

fn rate(round: Duration) -> Result<f64> {
    let load = Load::start(addr(), 8);
    std::thread::sleep(round);
    let report = load.finish();
    let failed = report.failures().len();
    ensure!(failed == 0, "{failed} connections failed");
    Ok(report.total() as f64 / round.as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| {
        s.get(((s.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    json!({"n": s.len(), "min": at(0.0), "p50": at(0.5), "p90": at(0.9), "max": at(1.0)})
}

fn render(result: &Value) -> String {
    let r = &result["rollback"];
    let s = &result["split"];
    let row = |name: &str, v: &Value, unit: &str| {
        format!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {unit} |\n",
            v["n"],
            v["p50"].as_f64().unwrap_or(f64::NAN),
            v["p90"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN),
        )
    };
    let mut out = String::from(
        "\nRollback (reload, then `reloader rollback` within the hold; test server, 2 workers)\n\n\
         | measure | n | p50 | p90 | max | unit |\n|---|---|---|---|---|---|\n",
    );
    out += &row("map updates (controller)", &r["map_update_us"], "µs");
    out += &row(
        "`reloader rollback` round trip (CLI)",
        &r["cli_round_trip_ms"],
        "ms",
    );
    out += &row(
        "request → first new connection served by the previous generation",
        &r["first_connection_on_previous_ms"],
        "ms",
    );
    out += &row(
        "gap between connection starts (the resolution above)",
        &r["connection_start_gap_us"],
        "µs",
    );
    out += &format!(
        "\n{} connections during the rollbacks, {} failed\n\nCanary split: connections/s, {} \
         alternating rounds of {} ms, 8 at a time\n\n| | p50 | min | max |\n|---|---|---|---|\n\
         | one active generation | {:.0} | {:.0} | {:.0} |\n| 50 % canary split | {:.0} | {:.0} \
         | {:.0} |\n\nratio split / one generation: {:.3}\n",
        r["connections"],
        r["failed"],
        s["rounds"],
        s["round_ms"],
        s["one_generation_per_s"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["one_generation_per_s"]["min"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["one_generation_per_s"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["canary_50_percent_per_s"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["canary_50_percent_per_s"]["min"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["canary_50_percent_per_s"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN),
        s["ratio"].as_f64().unwrap_or(f64::NAN),
    );
    out
}
