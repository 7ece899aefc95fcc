//! `cargo xtask bench --holdings`: what `status` and a `/metrics` scrape
//! cost the controller when its generations hold many connections (issue
//! 25's target: under 10 ms of controller CPU each at 10,000).
//!
//! In a network namespace of its own, `reloader run` wraps the test server
//! with `--hold-connections` (a connection that sends nothing is held until
//! its client closes it, also while the server drains). The bench opens
//! half the connections to generation 1, reloads, and opens the other half
//! to generation 2 (generation 1 drains and keeps its half). At 0 and at N
//! connections it measures S `reloader status --json` and S scrapes: each
//! one's wall time, and the controller's CPU time over them (the sum of
//! `/proc/PID/task/*/schedstat`, nanoseconds, every thread), divided by S.
//! Both counts are checked against what status reports.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use reloader_tests::instance::Instance;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    report::{self, Stat},
    scenario::Bins,
    server,
};

const ADDR: &str = "127.0.0.1:21000";
const METRICS_ADDR: &str = "127.0.0.1:9478";

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Established connections the generations hold.
    pub connections: usize,
    /// Per generation, as `status --json` counted them.
    pub counted: Vec<(u64, u64)>,
    /// `reloader status --json`, the command's wall time, ms.
    pub status_ms: Stat,
    /// Controller CPU per `status`, ms.
    pub status_cpu_ms: f64,
    /// `GET /metrics`, wall time, ms.
    pub scrape_ms: Stat,
    /// Controller CPU per scrape, ms.
    pub scrape_cpu_ms: f64,
    pub scrape_bytes: usize,
}

/// The controller's CPU time so far (every live thread; exited threads'
/// time is in the process's own `schedstat` line too), ms.
fn controller_cpu_ms(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e6)
}

fn scrape() -> Result<usize> {
    let mut stream = TcpStream::connect(METRICS_ADDR).context("connect to /metrics")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    ensure!(
        body.starts_with(b"HTTP/1.1 200"),
        "/metrics did not answer 200"
    );
    Ok(body.len())
}

/// Opens `n` connections that send nothing, in batches the listener's
/// backlog takes.
fn open(n: usize) -> Result<Vec<TcpStream>> {
    let addr: SocketAddr = ADDR.parse()?;
    let mut streams = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(256) {
        for _ in 0..256.min(n - chunk * 256) {
            streams.push(TcpStream::connect(addr).context("connect")?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(streams)
}

/// Per live generation, the connections status counts.
fn counted(instance: &Instance) -> Vec<(u64, u64)> {
    instance
        .status()
        .generations
        .iter()
        .filter(|g| g.state.is_live())
        .map(|g| (g.generation, g.connections.unwrap_or(0)))
        .collect()
}

/// Waits until status counts `total` connections.
fn wait_counted(instance: &Instance, total: u64) -> Result<Vec<(u64, u64)>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = counted(instance);
        if seen.iter().map(|(_, n)| n).sum::<u64>() == total {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!("status counts {seen:?}, not {total} connections");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn measure(instance: &Instance, connections: usize, samples: usize) -> Result<Point> {
    let pid = instance.pid();
    let counted = wait_counted(instance, connections as u64)?;
    let cpu = controller_cpu_ms(pid)?;
    let mut status_ms = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let out = instance.client(&["status", "--json"]);
        ensure!(out.status.success(), "status failed");
        status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let status_cpu_ms = (controller_cpu_ms(pid)? - cpu) / samples as f64;
    let cpu = controller_cpu_ms(pid)?;
    let mut scrape_ms = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..samples {
        let t = Instant::now();
        scrape_bytes = scrape()?;
        scrape_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let scrape_cpu_ms = (controller_cpu_ms(pid)? - cpu) / samples as f64;
    Ok(Point {
        connections,
        counted,
        status_ms: report::stat(status_ms.into_iter()),
        status_cpu_ms,
        scrape_ms: report::stat(scrape_ms.into_iter()),
        scrape_cpu_ms,
        scrape_bytes,
    })
}

fn run_points(bins: &Bins, connections: usize, samples: usize) -> Result<Vec<Point>> {
    let testserver = bins.testserver.display().to_string();
    server::in_netns(move || {
        // Room for the clients' ends (the server's are in its own process).
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            (connections as u64 + 1024).max(4096),
            (connections as u64 + 1024).max(4096),
        );
        let dir = tempfile::tempdir()?;
        let mut instance = Instance::spawn_with_env(
            dir,
            &[
                "--listen",
                ADDR,
                "--metrics",
                METRICS_ADDR,
                "--drain-timeout",
                "1h",
            ],
            &[testserver.as_str(), "--listen", ADDR, "--hold-connections"],
            &[("RELOADER_LOG", "warn")],
        );
        instance.wait_active(Duration::from_secs(60));
        let mut points = vec![measure(&instance, 0, samples)?];
        let mut held = open(connections / 2)?;
        let out = instance.client(&["reload"]);
        ensure!(out.status.success(), "reload failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while instance.active_generation() != Some(2) {
            ensure!(
                Instant::now() < deadline,
                "generation 2 did not become active"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        held.extend(open(connections - connections / 2)?);
        points.push(measure(&instance, connections, samples)?);
        drop(held);
        let _ = instance.stop();
        Ok(points)
    })
}

fn ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn render(points: &[Point]) -> String {
    let mut out = String::from(
        "| connections | per generation | `status --json` ms (median / p99) | controller CPU ms per status | `/metrics` ms (median / p99) | controller CPU ms per scrape | scrape bytes |\n|--:|---|--:|--:|--:|--:|--:|\n",
    );
    for p in points {
        let per: Vec<String> = p
            .counted
            .iter()
            .map(|(g, n)| format!("gen {g}: {n}"))
            .collect();
        out += &format!(
            "| {} | {} | {} / {} | {} | {} / {} | {} | {} |\n",
            p.connections,
            per.join(", "),
            ms(p.status_ms.median_ms),
            ms(p.status_ms.p99_ms),
            ms(p.status_cpu_ms),
            ms(p.scrape_ms.median_ms),
            ms(p.scrape_ms.p99_ms),
            ms(p.scrape_cpu_ms),
            p.scrape_bytes,
        );
    }
    out
}

pub fn section(
    bins: &Bins,
    connections: usize,
    quick: bool,
    json_path: &Path,
    machine: &Value,
    started: Instant,
) -> Result<()> {
    let samples = if quick { 10 } else { 50 };
    eprintln!(
        "bench holdings: {connections} connections across 2 generations, {samples} status and \
         scrapes each; {}",
        machine["summary"]
    );
    let points = run_points(bins, connections, samples)?;
    let table = render(&points);
    println!("{table}");
    let document = json!({
        "command": super::command_line(),
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "points": points,
        "table": table,
    });
    std::fs::write(json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    eprintln!(
        "bench holdings: done in {:.0}s; wrote {}",
        started.elapsed().as_secs_f64(),
        json_path.display()
    );
    Ok(())
}
