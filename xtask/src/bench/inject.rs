//! `cargo xtask bench --inject`: what `--inject-reuseport` costs a server's
//! start. `bindserver` (release build) opens 1 or 1,000 TCP listeners on
//! the managed address and times its own socket, bind and listen calls;
//! it runs as a generation of `reloader run` (its own network namespace),
//! three ways:
//!
//! - **self**: it sets `SO_REUSEPORT` itself, no bind programs;
//! - **injected**: it does not, `--inject-reuseport` sets it (the program
//!   runs for every bind, matches, and calls `bpf_setsockopt`);
//! - **unmatched**: it binds its timed sockets to another port (setting
//!   `SO_REUSEPORT` itself) and one to the managed address, under
//!   `--inject-reuseport` (the program runs for every bind and matches
//!   none of the timed ones: what every other bind of a generation pays).
//!
//! Each is started R times (reloads), and the bind loop's time is read
//! from the file each generation writes; the controller's spawn→ready is
//! reported beside it (its discovery scans every 20 ms, so it shows
//! little of the binds).

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use reloader_tests::{instance::Instance, privileged};
use serde_json::{Value, json};

use super::scenario::Bins;

const ADDR: &str = "127.0.0.1:8090";

/// Runs the section; returns its JSON and prints its table.
pub fn run(bins: &Bins, starts: usize) -> Result<Value> {
    let bindserver = bins.testserver.with_file_name("bindserver");
    // A thread of its own: the network namespace is per thread.
    std::thread::spawn(move || measure(&bindserver, starts))
        .join()
        .map_err(|_| anyhow::anyhow!("the inject bench panicked"))?
}

fn measure(bindserver: &Path, starts: usize) -> Result<Value> {
    privileged();
    let mut rows = Vec::new();
    for count in [1usize, 1000] {
        for mode in ["self", "injected", "unmatched"] {
            rows.push(one(bindserver, count, mode, starts)?);
        }
    }
    let result = json!({ "starts": starts, "rows": rows });
    println!("{}", render(&result));
    Ok(result)
}

fn one(bindserver: &Path, count: usize, mode: &str, starts: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("binds-{generation}");
    let count_text = count.to_string();
    let mut args = vec![
        "--max-sockets-per-listener",
        "1024",
        "--drain-timeout",
        "5s",
        "--settle",
        "0s",
    ];
    args.extend(["--listen", ADDR]);
    if mode != "self" {
        args.push("--inject-reuseport");
    }
    let server = bindserver.display().to_string();
    let out_text = out.display().to_string();
    let mut command = vec![
        server.as_str(),
        "--listen",
        ADDR,
        "--count",
        &count_text,
        "--out",
        &out_text,
    ];
    if mode != "injected" {
        command.push("--reuseport");
    }
    if mode == "unmatched" {
        command.extend(["--bind", "127.0.0.1:8092"]);
    }
    let mut instance = Instance::start(&args, &command);
    let mut binds = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..starts {
        let reload = instance.reload_wait();
        ensure!(reload.ok(), "{mode} {count}: reload failed: {reload}");
        let report = reload.done();
        ready.push(report.spawn_to_ready_ms.unwrap_or(0.0));
        let file = dir.path().join(format!("binds-{}", report.generation));
        let ns: f64 = std::fs::read_to_string(&file)
            .with_context(|| format!("read {}", file.display()))?
            .trim()
            .parse()?;
        binds.push(ns / 1000.0);
    }
    ensure!(
        instance.stop().success(),
        "the instance did not stop cleanly"
    );
    std::thread::sleep(Duration::from_millis(100));
    Ok(json!({
        "sockets": count,
        "mode": mode,
        "binds_us_median": median(&mut binds.clone()),
        "binds_us_max": binds.iter().copied().fold(0.0, f64::max),
        "spawn_to_ready_ms_median": median(&mut ready),
    }))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn render(result: &Value) -> String {
    let mut text = format!(
        "{:>8}  {:<10}  {:>14}  {:>11}  {:>15}\n",
        "sockets", "mode", "binds median", "binds max", "spawn→ready med"
    );
    for row in result["rows"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "{:>8}  {:<10}  {:>11.1} µs  {:>8.1} µs  {:>12.1} ms\n",
            row["sockets"],
            row["mode"].as_str().unwrap_or(""),
            row["binds_us_median"].as_f64().unwrap_or(0.0),
            row["binds_us_max"].as_f64().unwrap_or(0.0),
            row["spawn_to_ready_ms_median"].as_f64().unwrap_or(0.0),
        ));
    }
    text
}
