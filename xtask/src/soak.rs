//! `cargo xtask soak`: many reloads under a continuous load, with the test
//! server and with nginx, watching the controller for leaks.
//!
//! It reports failed connections (must be 0) and, at the start and the end,
//! the controller's open fds, RSS and threads and the steering maps' entry
//! counts (must be flat; threads may vary within the controller's
//! blocking pool). It fails when a connection failed, a reload failed, or
//! fds or map entries grew, or threads beyond the pool's bound. RSS is reported, not judged:
//! allocators keep freed memory, so a small drift is not a leak.
//!
//! Every run happens in its own network namespace (as the privileged tests
//! do), on release builds.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use reloader_tests::{instance::Instance, load::Load, nginx::Nginx, privileged};
use serde_json::{Value, json};

use crate::{run, workspace_root};

const ADDR: &str = "127.0.0.1:8080";

/// The controller's resources at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sample {
    fds: usize,
    rss_kib: u64,
    threads: u64,
    map_entries: reloader::steering::EntryCounts,
}

fn sample(instance: &Instance) -> Result<Sample> {
    let pid = instance.pid();
    // The fewest of a few looks: a netlink dump or a control connection in
    // progress holds an fd for a moment; a leak holds it for good.
    let mut fds = usize::MAX;
    for _ in 0..10 {
        fds = fds.min(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = procfs::process::Process::new(pid as i32)?.status()?;
    Ok(Sample {
        fds,
        rss_kib: status.vmrss.context("VmRSS in /proc/PID/status")?,
        threads: status.threads,
        map_entries: instance.status().map_entries,
    })
}

pub fn soak(reloads: usize, servers: &[String]) -> Result<()> {
    let root = workspace_root();
    run(std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "--workspace", "--bins"]))?;
    let release = root.join("target/release");
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("RELOADER_BIN", release.join("reloader")) };
    let mut results = Vec::new();
    for server in servers {
        let release = release.clone();
        let server = server.clone();
        // A thread of its own: the network namespace is per thread.
        let result = std::thread::spawn(move || soak_one(&server, reloads, &release))
            .join()
            .map_err(|_| anyhow::anyhow!("soak thread panicked"))??;
        results.push(result);
    }
    let path = root.join("target/soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nresults: {}", path.display());
    let mut problems = Vec::new();
    for r in &results {
        let name = r["server"].as_str().unwrap_or("?");
        if r["failed_connections"] != 0 || r["failed_reloads"] != 0 {
            problems.push(format!("{name}: failed connections or reloads"));
        }
        for key in ["fds", "map_entries"] {
            if r["start"][key] != r["end"][key] {
                problems.push(format!(
                    "{name}: {key} changed from {} to {}",
                    r["start"][key], r["end"][key]
                ));
            }
        }
        // Blocking-pool threads come and go (tokio starts them on demand
        // and ends them after 10 s idle), up to the pool's bound: only
        // growth beyond it is a leak.
        let (start, end) = (
            r["start"]["threads"].as_u64().unwrap_or(0),
            r["end"]["threads"].as_u64().unwrap_or(0),
        );
        if end > start + reloader::MAX_BLOCKING_THREADS as u64 {
            problems.push(format!(
                "{name}: threads grew from {start} to {end}, beyond the blocking pool's {}",
                reloader::MAX_BLOCKING_THREADS
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "soak found problems: {}",
        problems.join("; ")
    );
    Ok(())
}

fn soak_one(server: &str, reloads: usize, release: &Path) -> Result<Value> {
    privileged();
    let nginx;
    let (instance_dir, command, args): (tempfile::TempDir, Vec<String>, Vec<&str>) = match server {
        "testserver" => (
            tempfile::tempdir()?,
            reloader_tests::testserver_command(&release.join("testserver"), ADDR),
            vec!["--listen", ADDR, "--drain-timeout", "10s"],
        ),
        "nginx" => {
            nginx = Nginx::new(ADDR, reloads as u64 + 10);
            let command = nginx.command();
            (
                tempfile::tempdir()?,
                command,
                vec![
                    "--listen",
                    ADDR,
                    "--drain-signal",
                    "QUIT",
                    "--drain-timeout",
                    "10s",
                ],
            )
        }
        other => bail!("unknown server {other:?}: use testserver or nginx"),
    };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance = Instance::start_in(instance_dir, &args, &command);
    // Warm up: allocations that happen once (first reload, first scrape).
    for _ in 0..3 {
        let reload = instance.reload_wait();
        ensure!(reload.ok(), "warm-up reload failed: {reload}");
    }
    let start = sample(&instance)?;
    println!("{server}: start {start:?}");
    let load = Load::start_bounded(ADDR.parse()?, 8, Duration::from_secs(7200));
    let began = Instant::now();
    let mut failed_reloads = 0;
    for i in 1..=reloads {
        let reload = instance.reload_wait();
        if !reload.ok() {
            failed_reloads += 1;
            eprintln!("{server}: reload {i} failed: {reload}");
        }
        if i % 100 == 0 {
            println!(
                "{server}: {i} reloads in {:.0}s",
                began.elapsed().as_secs_f64()
            );
        }
    }
    let report = load.finish();
    let elapsed = began.elapsed();
    let end = sample(&instance)?;
    println!("{server}: end   {end:?}");
    let failures = report.failures();
    for f in failures.iter().take(10) {
        eprintln!(
            "{server}: failed connection at {:?}: {:?}",
            f.started, f.result
        );
    }
    let last = instance.status().last_reload;
    let stopped = instance.stop();
    let result = json!({
        "server": server,
        "reloads": reloads,
        "failed_reloads": failed_reloads,
        "connections": report.total(),
        "failed_connections": failures.len(),
        "seconds": elapsed.as_secs_f64(),
        "clean_stop": stopped.success(),
        "last_reload": last,
        "start": {"fds": start.fds, "rss_kib": start.rss_kib, "threads": start.threads, "map_entries": start.map_entries},
        "end": {"fds": end.fds, "rss_kib": end.rss_kib, "threads": end.threads, "map_entries": end.map_entries},
    });
    println!(
        "{server}: {reloads} reloads in {:.0}s, {} connections, {} failed; fds {} -> {}, \
         RSS {} -> {} KiB, threads {} -> {}, map entries {:?} -> {:?}",
        elapsed.as_secs_f64(),
        report.total(),
        failures.len(),
        start.fds,
        end.fds,
        start.rss_kib,
        end.rss_kib,
        start.threads,
        end.threads,
        start.map_entries,
        end.map_entries
    );
    Ok(result)
}
