//! `cargo xtask bench`: the numbers users choose a reload method by,
//! measured in one run on one machine so their ratios mean something even
//! though absolute figures vary between runs.
//!
//! For the test server and nginx, R reloads at interval I under the same
//! load of new connections, three ways (see [`scenario`]), each in its own
//! network namespace; then the micro-measurements ([`micro`]). Prints the
//! tables, writes a JSON file and an SVG plot.
//!
//! `--keepalive` runs the keep-alive section instead ([`keepalive`]): nginx
//! and HAProxy under persistent HTTP/1.1 connections, with each server's
//! own remedies. `--scale` runs the scale section ([`scale`]): reload cost,
//! discovery, steering overhead and memory for 1 to 256 listeners.
//!
//! It is a benchmark, not a test: it fails only when it cannot run, or when
//! reloader itself failed a connection or a reload (a bug, not a number;
//! not in the keep-alive section, where servers close connections
//! themselves).

mod holdings;
mod inject;
mod keepalive;
mod micro;
mod plot;
mod report;
mod rollout;
mod scale;
mod scenario;
mod server;
mod table;
mod udp;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use procfs::Current;
use reloader_tests::loadgen::Event;
use serde::Serialize;
use serde_json::{Value, json};

use self::{
    report::{Reload, Summary},
    scenario::{Bins, Client, Events, Method, Params, Variant},
    server::Server,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A short run for routine use (5 reloads per scenario; under a minute
    /// after the build). Without it: 1,000 reloads per scenario (about 45
    /// minutes). With --keepalive: 3 reloads per scenario; with --scale: 3
    /// reloads per size.
    #[arg(long)]
    quick: bool,
    /// Run the rollback and canary section only: rollback latency (map,
    /// CLI, first connection) over 20 cycles and the connection rate with a
    /// 50 % canary split vs one generation (about 2 minutes).
    #[arg(long, conflicts_with_all = ["udp", "keepalive", "scale"])]
    rollout: bool,
    /// Run the --inject-reuseport section only: a server's bind time with
    /// 1 and 1,000 sockets, setting SO_REUSEPORT itself vs injected vs
    /// binds the program does not match (--reloads starts each, default
    /// 20; --quick 5; about a minute).
    #[arg(long, conflicts_with_all = ["udp", "keepalive", "scale", "rollout", "holdings"])]
    inject: bool,
    /// Run the UDP section only: DNS (unbound, Knot) and HTTP/3 (Caddy)
    /// reloaded naive vs reloader, and the program's cost per datagram
    /// (--reloads per scenario, default 20; about 5 minutes).
    #[arg(long, conflicts_with_all = ["keepalive", "scale"])]
    udp: bool,
    /// Run the keep-alive section only: nginx and HAProxy under persistent
    /// HTTP/1.1 connections, naive / sysctl / reloader, with each server's
    /// remedies (20 reloads per scenario; about 10 minutes).
    #[arg(long, conflicts_with = "scale")]
    keepalive: bool,
    /// Run the holdings section only: the controller's CPU per `status` and
    /// per `/metrics` scrape with 0 and with --held connections held by two
    /// generations (about a minute).
    #[arg(long, conflicts_with_all = ["udp", "keepalive", "scale", "rollout"])]
    holdings: bool,
    /// --holdings: established connections the generations hold.
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// Run the scale section only: reload phases, controller CPU, discovery,
    /// status and metrics, steering overhead and memory for 1, 16, 64 and
    /// 256 listeners (about 5 minutes).
    #[arg(long)]
    scale: bool,
    /// Reloads per scenario [default: 1000; --quick: 5; --keepalive: 20;
    /// --scale: 20 per size].
    #[arg(long)]
    reloads: Option<usize>,
    /// Milliseconds from one reload's start to the next (a reload that takes
    /// longer is followed at once) [default: 400; --keepalive: 500].
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Connections the load client keeps open at once, each followed at
    /// once by the next.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// --keepalive: persistent connections of the keep-alive client.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// --scale: listener counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    listeners: Vec<usize>,
    /// Servers to reload [default: testserver,nginx; --keepalive:
    /// nginx,haproxy].
    #[arg(long, value_delimiter = ',')]
    servers: Option<Vec<String>>,
    /// Where to write the JSON results [default: target/bench/bench.json;
    /// --keepalive: target/bench/keepalive.json; --scale:
    /// target/bench/scale.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the SVG plot [default: target/bench/bench.svg;
    /// --scale: target/bench/scale.svg].
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// One scenario's results.
#[derive(Serialize)]
pub struct ScenarioResult {
    pub server: &'static str,
    pub method: &'static str,
    pub description: &'static str,
    /// `net.ipv4.tcp_migrate_req` in the scenario's namespace.
    pub migrate_req: String,
    pub seconds: f64,
    pub summary: Summary,
    /// The reloads that failed, with the reason.
    pub failed_reloads: Vec<Reload>,
}

#[derive(Serialize)]
pub struct Micro {
    pub steering_overhead: Value,
    pub cutover: Value,
    pub idle: micro::Idle,
}

pub fn run(args: BenchArgs, root: &Path) -> Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the bench needs root: it loads BPF programs and creates network namespaces \
             (`sudo -E cargo xtask bench`)"
        );
    }
    let default_servers = if args.keepalive {
        "nginx,haproxy"
    } else {
        "testserver,nginx"
    };
    let servers: Vec<Server> = match &args.servers {
        Some(names) => names
            .iter()
            .map(|s| Server::parse(s))
            .collect::<Result<_>>()?,
        None => default_servers
            .split(',')
            .map(Server::parse)
            .collect::<Result<_>>()?,
    };
    if !args.scale && !args.holdings {
        for server in &servers {
            server.check_installed()?;
        }
    }
    let section = if args.keepalive {
        "keepalive"
    } else if args.holdings {
        "holdings"
    } else if args.scale {
        "scale"
    } else {
        "bench"
    };
    let params = Params {
        reloads: args
            .reloads
            .unwrap_or(match (args.quick, args.keepalive || args.scale) {
                (true, false) => 5,
                (true, true) => 3,
                (false, false) => 1000,
                (false, true) => 20,
            }),
        interval_ms: args
            .interval_ms
            .unwrap_or(if args.keepalive { 500 } else { 400 }),
        client: if args.keepalive {
            Client::KeepAlive {
                connections: args.connections,
                pause_ms: 0,
            }
        } else {
            Client::Connections {
                concurrency: args.concurrency,
            }
        },
        warmup_ms: 300,
        cooldown_ms: 300,
        timeout_ms: 3000,
    };
    let bins = build(root)?;
    // `reloader run` through the tests' helper, on the release build.
    // SAFETY: set before the bench starts any thread.
    unsafe { std::env::set_var("RELOADER_BIN", &bins.reloader) };
    if args.rollout {
        let (cycles, rounds) = if args.quick { (5, 2) } else { (20, 6) };
        let result = rollout::run(&bins, cycles, std::time::Duration::from_secs(2), rounds)?;
        let path = args
            .json
            .unwrap_or_else(|| root.join("target/bench/rollout.json"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        eprintln!("bench: results in {}", path.display());
        return Ok(());
    }
    if args.inject {
        let starts = args.reloads.unwrap_or(if args.quick { 5 } else { 20 });
        let result = inject::run(&bins, starts)?;
        let path = args
            .json
            .unwrap_or_else(|| root.join("target/bench/inject.json"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        eprintln!("bench: results in {}", path.display());
        return Ok(());
    }
    if args.udp {
        return udp::run(&bins, root, args.quick, args.reloads, args.json);
    }
    let host_migrate_req = server::migrate_req()?;
    let json_path = args
        .json
        .unwrap_or_else(|| root.join(format!("target/bench/{section}.json")));
    let svg_path = args
        .svg
        .unwrap_or_else(|| root.join(format!("target/bench/{section}.svg")));
    for p in [&json_path, &svg_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
    }
    let machine = machine();
    if args.keepalive {
        keepalive::section(&servers, &bins, &params, &json_path, &machine, started)?;
        return check_sysctl(&host_migrate_req);
    }
    if args.holdings {
        return holdings::section(&bins, args.held, args.quick, &json_path, &machine, started);
    }
    if args.scale {
        let options = scale::Options {
            listeners: args.listeners.clone(),
            reloads: params.reloads,
            quick: args.quick,
        };
        scale::section(&options, &bins, &json_path, &svg_path, &machine, started)?;
        return check_sysctl(&host_migrate_req);
    }
    eprintln!(
        "bench: {} reloads per scenario every {} ms, {} connections at a time; {}",
        params.reloads, params.interval_ms, args.concurrency, machine["summary"]
    );

    let mut results = Vec::new();
    let mut rows = Vec::new();
    for &server in &servers {
        for method in Method::ALL {
            let t = Instant::now();
            eprint!("bench: {} / {} ... ", server.name(), method.name());
            let outcome = scenario::run(server, method, &bins, &params, &Variant::default())?;
            let Events::Connections(events) = outcome.events else {
                bail!("the scenario ran the keep-alive client");
            };
            let summary = report::summarize(&events, &outcome.reloads);
            eprintln!(
                "{:.0}s: {} connections, {} failed, {} reloads ({} failed)",
                t.elapsed().as_secs_f64(),
                summary.connections,
                summary.failed,
                summary.reloads,
                summary.reloads_failed
            );
            let title = format!("{} / {}", server.name(), method.name());
            rows.push(plot_row(title, &events, &outcome.reloads, &summary));
            results.push(ScenarioResult {
                server: server.name(),
                method: method.name(),
                description: method.description(),
                migrate_req: outcome.migrate_req,
                seconds: t.elapsed().as_secs_f64(),
                failed_reloads: outcome
                    .reloads
                    .into_iter()
                    .filter(|r| !r.succeeded)
                    .take(20)
                    .collect(),
                summary,
            });
        }
    }

    eprintln!("bench: micro-measurements ...");
    let (pairs, round_ms, rounds, idle_s) = if args.quick {
        (3, 500, 30, 3.0)
    } else {
        (10, 1000, 200, 10.0)
    };
    let micro = Micro {
        steering_overhead: micro::overhead(&bins, pairs, round_ms)?,
        cutover: micro::cutover(&bins, rounds)?,
        idle: micro::idle(&bins, idle_s)?,
    };
    check_sysctl(&host_migrate_req)?;

    let tables = table::render(&results, &micro);
    println!("{tables}");
    let command = command_line();
    let heading = format!(
        "reloader bench: {} reloads per scenario every {} ms under {} concurrent new connections ({}, Linux {})",
        params.reloads,
        params.interval_ms,
        args.concurrency,
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
    );
    plot::draw(&svg_path, &heading, &rows)?;
    let seconds = started.elapsed().as_secs_f64();
    let document = json!({
        "command": command,
        "mode": if args.quick { "quick" } else { "full" },
        "seconds": seconds,
        "machine": machine,
        "params": params,
        "scenarios": results,
        "micro": micro,
        "tables": tables,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    eprintln!(
        "bench: done in {seconds:.0}s; wrote {} and {}",
        json_path.display(),
        svg_path.display()
    );

    // reloader failing a connection or a reload is a bug, not a number.
    let mut bugs = Vec::new();
    for r in results
        .iter()
        .filter(|r| r.method == Method::Reloader.name())
    {
        let s = &r.summary;
        if s.failed > 0 || s.reloads_failed > 0 {
            bugs.push(format!(
                "{}: {} connections failed ({:?}), {} reloads failed; first failures: {}; failed reloads: {}",
                r.server,
                s.failed,
                s.failed_by_kind,
                s.reloads_failed,
                serde_json::to_string(&s.failures.iter().take(10).collect::<Vec<_>>())?,
                serde_json::to_string(&r.failed_reloads)?,
            ));
        }
    }
    if !bugs.is_empty() {
        bail!("reloader failed under load (a bug):\n{}", bugs.join("\n"));
    }
    Ok(())
}

/// Warns when the host's `net.ipv4.tcp_migrate_req` changed during the run
/// (the scenarios set it in their own namespaces only).
fn check_sysctl(before: &str) -> Result<()> {
    if server::migrate_req()? != before {
        eprintln!(
            "bench: WARNING: the host's {} changed during the run (was {before})",
            server::MIGRATE_SYSCTL
        );
    }
    Ok(())
}

/// How the bench was started, for the record.
pub fn command_line() -> String {
    format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    )
}

/// Builds the release binaries the bench runs.
fn build(root: &Path) -> Result<Bins> {
    eprintln!("bench: cargo build --release -p reloader -p reloader-tests --bins");
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "reloader",
            "-p",
            "reloader-tests",
            "--bins",
        ])
        .status()
        .context("failed to run cargo build")?;
    anyhow::ensure!(status.success(), "the release build failed: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = |name: &str| target.join("release").join(name);
    Ok(Bins {
        reloader: bin("reloader"),
        testserver: bin("testserver"),
        loadgen: bin("loadgen"),
        kaload: bin("kaload"),
        steerbench: bin("steerbench"),
    })
}

/// What the plot shows of one scenario.
fn plot_row(title: String, events: &[Event], reloads: &[Reload], summary: &Summary) -> plot::Row {
    let t0 = events.first().map_or(0, |e| e.start_ns);
    let t_end = events.last().map_or(t0, |e| e.start_ns + 1);
    // Up close: up to the end of the sixth reload, and a little after.
    let zoom_end = reloads
        .get(5)
        .or(reloads.last())
        .map_or(t_end, |r| (r.end_ns + 300_000_000).min(t_end));
    let whole_width = ((t_end - t0) / 400).max(50_000_000);
    plot::Row {
        title,
        t0_ns: t0,
        zoom: report::buckets(events, t0, zoom_end, 25_000_000, true),
        whole: report::buckets(events, t0, t_end, whole_width, false),
        reloads_s: reloads
            .iter()
            .map(|r| {
                (
                    r.start_ns.saturating_sub(t0) as f64 / 1e9,
                    r.end_ns.saturating_sub(t0) as f64 / 1e9,
                )
            })
            .collect(),
        failed: summary.failed,
        connections: summary.connections,
    }
}

/// The machine, for the record: CPUs, memory, CPU model, kernel, load.
fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = procfs::Meminfo::current().map_or(0, |m| m.mem_total / 1024);
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let nginx = std::process::Command::new(server::NGINX)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    let load = read("/proc/loadavg").trim().to_owned();
    json!({
        "cpus": cpus,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "cpu": cpu,
        "kernel": kernel,
        "nginx": nginx,
        "loadavg_at_start": load,
        "summary": format!(
            "{cpus} CPUs ({cpu}), {:.1} GiB, Linux {kernel}, load average {load}",
            mem_kib as f64 / 1024.0 / 1024.0
        ),
    })
}
