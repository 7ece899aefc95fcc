//! `cargo xtask bench --scale`: how reloader's costs grow with the number
//! of listeners. For each size (by default 1, 16, 64 and 256 `--listen`
//! addresses, 127.0.0.1:20000 and up), in a network namespace of its own,
//! the test server listens on every address with two worker processes, so
//! a generation holds two sockets per address:
//!
//! - the server alone: spawn → both workers listening (started by the
//!   master after it opened every socket), the floor under spawn → ready;
//! - `reloader run` around it (`--metrics` on): after two warm-up reloads,
//!   R back-to-back `reload --wait`, each phase as the controller reports
//!   it, and the controller's CPU time (utime + stime of `/proc/PID/stat`,
//!   every thread, including the ones that exited) over them;
//! - discovery the way the controller runs it (`reloader::discovery`, in
//!   this process and namespace): the sock_diag dump of listening sockets,
//!   the process tree, the fd walk, and the whole `find`;
//! - `reloader status --json` (wall time of the command) and a `/metrics`
//!   scrape;
//! - memory: the controller's RSS, and the `memlock` of every BPF map and
//!   program it holds (`/proc/PID/fdinfo`; names from `bpftool`), with the
//!   default `--max-sockets-per-listener` and with 2;
//!
//! then the steering program's per-connection cost with many groups
//! (`steerbench overhead-many`: 1 and 256 groups attached vs none).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use reloader_tests::instance::Instance;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    plot,
    report::{self, PhaseStats, Stat},
    scenario::Bins,
    server,
};

/// What `--scale` measures.
pub struct Options {
    pub listeners: Vec<usize>,
    /// Measured reloads per size (after two warm-up reloads).
    pub reloads: usize,
    pub quick: bool,
}

const BASE_PORT: u16 = 20000;
const WORKERS: usize = 2;
const METRICS_ADDR: &str = "127.0.0.1:9477";
const WARMUP_RELOADS: usize = 2;

/// One size's results.
#[derive(Clone, Debug, Serialize)]
pub struct Size {
    pub listeners: usize,
    /// Listening sockets of one generation (listeners × workers).
    pub sockets_per_generation: usize,
    /// The test server alone: spawn → every worker listening, ms.
    pub server_start_ms: Stat,
    pub reloads: usize,
    pub reloads_failed: usize,
    pub phases: PhaseStats,
    /// Controller CPU time (user + system) over the measured reloads,
    /// divided by their number.
    pub controller_cpu_ms_per_reload: f64,
    /// Wall time of the measured reloads, back to back.
    pub reloads_wall_s: f64,
    pub discovery: Discovery,
    /// `reloader status --json`, the command's wall time.
    pub status: Timed,
    /// `GET /metrics`.
    pub metrics: Timed,
    /// With the default `--max-sockets-per-listener` (256).
    pub memory: Memory,
    /// With `--max-sockets-per-listener 2`.
    pub memory_2_sockets: Memory,
}

/// Discovery of the active generation's listeners, as the controller runs
/// it once per scan (every 20 ms while a candidate starts).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Discovery {
    /// Listening TCP sockets in the namespace (one generation running).
    pub listening_sockets: usize,
    /// Processes in the generation's tree.
    pub tree_processes: usize,
    /// Distinct sockets those processes hold.
    pub tree_socket_fds: usize,
    /// Processes on the machine (`process_tree` reads each one's stat).
    pub host_processes: usize,
    /// `discovery::listeners()`: the sock_diag dumps (IPv4 and IPv6).
    pub sock_diag: MinMedian,
    /// `discovery::process_tree()`: every process's stat in /proc.
    pub process_tree: MinMedian,
    /// `discovery::socket_holders()`: the tree's /proc/PID/fd.
    pub socket_holders: MinMedian,
    /// `discovery::find()`: all of it, and the matching.
    pub find: MinMedian,
}

/// A request's wall time and answer size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timed {
    pub ms: Stat,
    pub bytes: usize,
}

/// A BPF map or program the controller holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BpfObject {
    pub id: u64,
    pub name: String,
    /// `map` or `prog`, and its type as bpftool names it (or the number).
    pub kind: String,
    pub max_entries: u64,
    pub memlock: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: usize,
    pub map_memlock_kib: f64,
    pub prog_memlock_kib: f64,
    pub objects: Vec<BpfObject>,
}

/// The key/value lines of a `/proc/PID/fdinfo/FD` file.
pub fn parse_fdinfo(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// The BPF maps and programs `pid` holds (each once, by id).
fn bpf_objects(pid: u32, names: &BTreeMap<(String, u64), (String, String)>) -> Vec<BpfObject> {
    let mut objects: BTreeMap<(String, u64), BpfObject> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let kind = match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-map" => "map",
            "anon_inode:bpf-prog" => "prog",
            _ => continue,
        };
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let info = parse_fdinfo(&text);
        let number = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let id = number(if kind == "map" { "map_id" } else { "prog_id" });
        let (name, type_name) = names
            .get(&(kind.to_owned(), id))
            .cloned()
            .unwrap_or_else(|| {
                let t = info
                    .get(if kind == "map" {
                        "map_type"
                    } else {
                        "prog_type"
                    })
                    .cloned()
                    .unwrap_or_default();
                (String::from("?"), t)
            });
        objects.insert(
            (kind.to_owned(), id),
            BpfObject {
                id,
                name,
                kind: format!("{kind} {type_name}"),
                max_entries: number("max_entries"),
                memlock: number("memlock"),
            },
        );
    }
    objects.into_values().collect()
}

/// (map|prog, id) → (name, type) from `bpftool -j`, if bpftool is there.
fn bpftool_names() -> BTreeMap<(String, u64), (String, String)> {
    let mut names = BTreeMap::new();
    for kind in ["map", "prog"] {
        let Ok(out) = Command::new("bpftool").args(["-j", kind, "show"]).output() else {
            continue;
        };
        let Ok(list) = serde_json::from_slice::<Vec<Value>>(&out.stdout) else {
            continue;
        };
        for item in list {
            if let Some(id) = item["id"].as_u64() {
                names.insert(
                    (kind.to_owned(), id),
                    (
                        item["name"].as_str().unwrap_or("?").to_owned(),
                        item["type"].as_str().unwrap_or("?").to_owned(),
                    ),
                );
            }
        }
    }
    names
}

fn memory_of(pid: u32) -> Result<Memory> {
    let process = procfs::process::Process::new(pid as i32)?;
    let status = process.status()?;
    let objects = bpf_objects(pid, &bpftool_names());
    let sum = |kind: &str| {
        objects
            .iter()
            .filter(|o| o.kind.starts_with(kind))
            .map(|o| o.memlock)
            .sum::<u64>() as f64
            / 1024.0
    };
    Ok(Memory {
        rss_kib: status.vmrss.unwrap_or(0),
        threads: status.threads,
        fds: process.fd_count()?,
        map_memlock_kib: sum("map"),
        prog_memlock_kib: sum("prog"),
        objects,
    })
}

/// utime + stime of `pid` (all its threads, live or exited), ms.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = procfs::process::Process::new(pid as i32)?.stat()?;
    let ticks = procfs::ticks_per_second() as f64;
    Ok((stat.utime + stat.stime) as f64 * 1000.0 / ticks)
}

fn addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], BASE_PORT + i as u16)))
        .collect()
}

fn testserver_command(bins: &Bins, addrs: &[SocketAddr]) -> Vec<String> {
    let mut command = vec![bins.testserver.display().to_string()];
    for a in addrs {
        command.extend(["--listen".into(), a.to_string()]);
    }
    command.extend(["--workers".into(), WORKERS.to_string()]);
    command
}

/// The test server alone: spawn → every worker said it started (each
/// worker is forked after the master opened all the sockets), ms. Its
/// stderr is read as it comes: the wall time includes that.
fn server_start_ms(command: &[String]) -> Result<f64> {
    let t0 = Instant::now();
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .env("RELOADER_GENERATION", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("failed to start the test server")?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut started = Ok(0.0);
    let mut workers = 0;
    let mut said = Vec::new();
    while workers < WORKERS {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                // Two workers writing at once may interleave within a line.
                let n = line.matches("worker").count();
                if n > 0 {
                    workers += n;
                    started = Ok(t0.elapsed().as_secs_f64() * 1000.0);
                }
                said.push(line);
            }
            Err(_) => {
                started = Err(anyhow::anyhow!(
                    "the test server's workers did not start; it said: {}",
                    said.join(" | ")
                ));
                break;
            }
        }
    }
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
    // The workers die on their own time: wait until their sockets are gone,
    // or the next start (reloader's) finds the addresses taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloader::discovery::listeners()?
        .iter()
        .any(|l| l.addr.port() >= BASE_PORT && l.addr.port() < BASE_PORT + 1024)
    {
        if Instant::now() > deadline {
            bail!("the test server's sockets are still listening 10 s after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    started
}

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed().as_secs_f64() * 1000.0, v)
}

fn repeat_ms(n: usize, mut f: impl FnMut()) -> Stat {
    report::stat((0..n).map(|_| timed(&mut f).0))
}

/// Minimum and median over `n` runs: on a shared machine the minimum is
/// the cost of the work itself, the median includes waiting for the CPU.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MinMedian {
    pub min_ms: f64,
    pub median_ms: f64,
}

fn repeat_min_ms(n: usize, mut f: impl FnMut()) -> MinMedian {
    let mut v: Vec<f64> = (0..n).map(|_| timed(&mut f).0).collect();
    v.sort_by(f64::total_cmp);
    MinMedian {
        min_ms: v.first().copied().unwrap_or(0.0),
        median_ms: report::stat(v.into_iter()).median_ms,
    }
}

fn scrape_metrics() -> Result<usize> {
    let mut stream = TcpStream::connect(METRICS_ADDR).context("connect to /metrics")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    anyhow::ensure!(
        body.starts_with(b"HTTP/1.1 200") || body.starts_with(b"HTTP/1.0 200"),
        "/metrics answered {:?}",
        String::from_utf8_lossy(&body[..body.len().min(80)])
    );
    Ok(body.len())
}

fn active_pid(status: &Value) -> Option<u32> {
    status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["state"] == "active")?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

fn discovery(pid: u32, addrs: &[SocketAddr], n: usize) -> Result<Discovery> {
    use reloader::discovery as d;
    let listening = d::listeners()?.len();
    let tree = d::process_tree(pid)?;
    let wanted: Vec<_> = addrs
        .iter()
        .map(|&a| (reloader::net::Transport::Tcp, a))
        .collect();
    let fds = d::socket_holders(&tree).len();
    Ok(Discovery {
        listening_sockets: listening,
        tree_processes: tree.len(),
        tree_socket_fds: fds,
        host_processes: procfs::process::all_processes()?.count(),
        sock_diag: repeat_min_ms(n, || {
            let _ = d::listeners();
        }),
        process_tree: repeat_min_ms(n, || {
            let _ = d::process_tree(pid);
        }),
        socket_holders: repeat_min_ms(n, || {
            let _ = d::socket_holders(&tree);
        }),
        find: repeat_min_ms(n, || {
            let _ = d::find(pid, &wanted);
        }),
    })
}

fn start_instance(addrs: &[SocketAddr], command: &[String], extra: &[&str]) -> Instance {
    let listen: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let mut args: Vec<&str> = Vec::new();
    for a in &listen {
        args.extend(["--listen", a.as_str()]);
    }
    args.extend([
        "--drain-signal",
        "TERM",
        "--drain-timeout",
        "30s",
        "--metrics",
        METRICS_ADDR,
    ]);
    args.extend(extra);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().expect("scratch directory");
    let instance = Instance::spawn_with_env(dir, &args, &command, &[("RELOADER_LOG", "warn")]);
    instance.wait_active(Duration::from_secs(60));
    instance
}

/// Measures one size in a namespace of its own.
fn measure(bins: &Bins, listeners: usize, reloads: usize, samples: usize) -> Result<Size> {
    let bins = bins.clone();
    server::in_netns(move || {
        let addrs = addrs(listeners);
        let command = testserver_command(&bins, &addrs);
        let server_start_ms = report::stat(
            (0..3)
                .map(|_| server_start_ms(&command))
                .collect::<Result<Vec<_>>>()?
                .into_iter(),
        );

        let mut instance = start_instance(&addrs, &command, &[]);
        let pid = instance.pid();
        for _ in 0..WARMUP_RELOADS {
            let reload = instance.reload_wait();
            if !reload.ok() {
                bail!("a warm-up reload failed: {reload}");
            }
        }
        let cpu0 = cpu_ms(pid)?;
        let t0 = Instant::now();
        let mut measured = Vec::new();
        for _ in 0..reloads {
            let start_ns = reloader_tests::loadgen::monotonic_ns();
            let reload = instance.reload_wait();
            let succeeded = reload.ok();
            measured.push(report::Reload {
                start_ns,
                end_ns: reloader_tests::loadgen::monotonic_ns(),
                succeeded,
                error: (!succeeded).then(|| reload.to_string()),
                phases: report::Phases::of(reload.report()),
            });
        }
        let reloads_wall_s = t0.elapsed().as_secs_f64();
        let cpu = cpu_ms(pid)? - cpu0;

        let mut status_bytes = 0;
        let status_ms = repeat_ms(samples, || {
            status_bytes = instance.client(&["status", "--json"]).stdout.len();
        });
        let status: Value = serde_json::from_slice(&instance.client(&["status", "--json"]).stdout)
            .context("status JSON")?;
        let mut metrics_bytes = Ok(0);
        let metrics_ms = repeat_ms(samples, || metrics_bytes = scrape_metrics());
        let generation_pid = active_pid(&status).context("no active generation in status")?;
        let discovery = discovery(generation_pid, &addrs, samples)?;
        let memory = memory_of(pid)?;
        if !instance.stop().success() {
            eprintln!("bench scale: reloader did not stop cleanly");
        }

        let mut small = start_instance(&addrs, &command, &["--max-sockets-per-listener", "2"]);
        let memory_2_sockets = memory_of(small.pid())?;
        let _ = small.stop();

        Ok(Size {
            listeners,
            sockets_per_generation: listeners * WORKERS,
            server_start_ms,
            reloads: measured.len(),
            reloads_failed: measured.iter().filter(|r| !r.succeeded).count(),
            phases: report::phase_stats(&measured),
            controller_cpu_ms_per_reload: cpu / reloads.max(1) as f64,
            reloads_wall_s,
            discovery,
            status: Timed {
                ms: status_ms,
                bytes: status_bytes,
            },
            metrics: Timed {
                ms: metrics_ms,
                bytes: metrics_bytes?,
            },
            memory,
            memory_2_sockets,
        })
    })
}

/// The local growth exponent between consecutive sizes: `log(y2/y1) /
/// log(x2/x1)`. 1 is linear growth, 2 quadratic; `None` where a value is
/// not positive.
pub fn exponents(points: &[(f64, f64)]) -> Vec<Option<f64>> {
    points
        .windows(2)
        .map(|w| {
            let ((x1, y1), (x2, y2)) = (w[0], w[1]);
            (x1 > 0.0 && x2 > x1 && y1 > 0.0 && y2 > 0.0).then(|| (y2 / y1).ln() / (x2 / x1).ln())
        })
        .collect()
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn exponent_cells(values: &[Option<f64>]) -> String {
    values
        .iter()
        .map(|e| e.map_or("-".into(), |e| format!("{e:.2}")))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// One number of a [`Size`].
type Metric = dyn Fn(&Size) -> f64;

/// The scale tables, as plain text (also valid Markdown).
pub fn render(sizes: &[Size], overhead: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Reloads by listener count (test server, {WORKERS} workers: {WORKERS} sockets per \
         listener per generation; ms, median / p99 over the measured reloads)\n"
    );
    let _ = writeln!(
        out,
        "| listeners | sockets/gen | reloads | server alone: spawn → listening | spawn → ready | ready → cutover | cutover → old exited | total | controller CPU ms/reload | CPU µs/reload per socket |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let cell = |s: &Stat| format!("{} / {}", ms(s.median_ms), ms(s.p99_ms));
    for s in sizes {
        let failed = if s.reloads_failed > 0 {
            format!(" ({} failed)", s.reloads_failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}{failed} | {} | {} | {} | {} | {} | {} | {:.1} |",
            s.listeners,
            s.sockets_per_generation,
            s.reloads,
            ms(s.server_start_ms.median_ms),
            cell(&s.phases.spawn_to_ready),
            cell(&s.phases.ready_to_cutover),
            cell(&s.phases.cutover_to_old_exited),
            cell(&s.phases.total),
            ms(s.controller_cpu_ms_per_reload),
            s.controller_cpu_ms_per_reload * 1000.0 / s.sockets_per_generation.max(1) as f64,
        );
    }
    let _ = writeln!(
        out,
        "\nDiscovery (one scan of the active generation, as the controller runs it; ms, min / median), status and metrics (ms, median)\n"
    );
    let _ = writeln!(
        out,
        "| listeners | listening sockets | tree processes / sockets | host processes | sock_diag dump | process tree | fd walk | find (all) | `status --json` ms | bytes | `/metrics` ms | bytes |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mm = |m: &MinMedian| format!("{} / {}", ms(m.min_ms), ms(m.median_ms));
    for s in sizes {
        let d = &s.discovery;
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.listeners,
            d.listening_sockets,
            d.tree_processes,
            d.tree_socket_fds,
            d.host_processes,
            mm(&d.sock_diag),
            mm(&d.process_tree),
            mm(&d.socket_holders),
            mm(&d.find),
            ms(s.status.ms.median_ms),
            s.status.bytes,
            ms(s.metrics.ms.median_ms),
            s.metrics.bytes,
        );
    }
    let _ = writeln!(
        out,
        "\nMemory (controller RSS; memlock of the BPF maps and programs it holds)\n"
    );
    let _ = writeln!(
        out,
        "| listeners | RSS MiB | threads | fds | maps KiB (256 sockets/listener) | programs KiB | RSS MiB (2 sockets/listener) | maps KiB (2 sockets/listener) | largest map (256) |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for s in sizes {
        let (m, m2) = (&s.memory, &s.memory_2_sockets);
        let largest = m
            .objects
            .iter()
            .filter(|o| o.kind.starts_with("map"))
            .max_by_key(|o| o.memlock)
            .map_or("-".into(), |o| {
                format!(
                    "{} ({} entries, {:.0} KiB)",
                    o.name,
                    o.max_entries,
                    o.memlock as f64 / 1024.0
                )
            });
        let _ = writeln!(
            out,
            "| {} | {:.1} | {} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {largest} |",
            s.listeners,
            m.rss_kib as f64 / 1024.0,
            m.threads,
            m.fds,
            m.map_memlock_kib,
            m.prog_memlock_kib,
            m2.rss_kib as f64 / 1024.0,
            m2.map_memlock_kib,
        );
    }
    let point = |f: &Metric| -> Vec<(f64, f64)> {
        sizes
            .iter()
            .map(|s| (s.sockets_per_generation as f64, f(s)))
            .collect()
    };
    let _ = writeln!(
        out,
        "\nGrowth exponents between consecutive sizes (log Δcost / log Δsockets; 1 = linear, 2 = quadratic)\n"
    );
    let _ = writeln!(out, "| cost | exponents |");
    let _ = writeln!(out, "|---|---|");
    let rows: [(&str, &Metric); 8] = [
        ("spawn → ready", &|s| s.phases.spawn_to_ready.median_ms),
        ("server alone: spawn → listening", &|s| {
            s.server_start_ms.median_ms
        }),
        ("controller CPU per reload", &|s| {
            s.controller_cpu_ms_per_reload
        }),
        ("discovery find (min)", &|s| s.discovery.find.min_ms),
        ("discovery fd walk (min)", &|s| {
            s.discovery.socket_holders.min_ms
        }),
        ("status --json", &|s| s.status.ms.median_ms),
        ("/metrics", &|s| s.metrics.ms.median_ms),
        ("map memlock", &|s| s.memory.map_memlock_kib),
    ];
    for (name, f) in rows {
        let _ = writeln!(
            out,
            "| {name} | {} |",
            exponent_cells(&exponents(&point(f)))
        );
    }
    if !overhead.is_empty() {
        let _ = writeln!(
            out,
            "\nSteering overhead with many groups (new connections/s with the program attached to every group ÷ none, mean of alternating rounds, and the median of each pair's ratio; the program's own run time per run from the kernel's BPF statistics)\n"
        );
        let _ = writeln!(
            out,
            "| groups | clients connect to | ratio | with / without conn/s | median pair ratio | program ns/run (runs) | attach to all groups µs |"
        );
        let _ = writeln!(out, "|--:|---|--:|--:|--:|--:|--:|");
        for o in overhead {
            let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.0} / {:.0} | {:.3} | {:.0} ({}) | {:.0} |",
                o["listeners"],
                if o["target"] == "one" {
                    "one address"
                } else {
                    "every address in turn"
                },
                f("ratio"),
                f("rate_with_program_per_s"),
                f("rate_without_program_per_s"),
                f("median_pair_ratio"),
                f("program_ns_per_run"),
                o["program_runs"],
                o["attach_all_groups_us"]["median"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
        }
    }
    out
}

/// The plot: reload phases against listeners (left), and the controller's
/// per-reload CPU time and the one-shot costs (right).
fn draw(path: &Path, heading: &str, sizes: &[Size]) -> Result<()> {
    let series = |name: &str, f: &Metric| plot::Series {
        name: name.to_owned(),
        points: sizes.iter().map(|s| (s.listeners as f64, f(s))).collect(),
    };
    let panels = [
        plot::Panel {
            title: "reload phases (median)".into(),
            y_desc: "ms".into(),
            series: vec![
                series("total", &|s| s.phases.total.median_ms),
                series("cutover → old exited (incl. 250 ms settle)", &|s| {
                    s.phases.cutover_to_old_exited.median_ms
                }),
                series("spawn → ready", &|s| s.phases.spawn_to_ready.median_ms),
                series("test server alone: spawn → listening", &|s| {
                    s.server_start_ms.median_ms
                }),
            ],
        },
        plot::Panel {
            title: "controller and discovery".into(),
            y_desc: "ms".into(),
            series: vec![
                series("controller CPU per reload", &|s| {
                    s.controller_cpu_ms_per_reload
                }),
                series("one discovery scan (find, min)", &|s| {
                    s.discovery.find.min_ms
                }),
                series("reloader status --json", &|s| s.status.ms.median_ms),
                series("GET /metrics", &|s| s.metrics.ms.median_ms),
            ],
        },
    ];
    plot::lines(
        path,
        heading,
        "listeners (--listen addresses, 2 sockets each per generation)",
        &panels,
    )
}

pub fn section(
    options: &Options,
    bins: &Bins,
    json_path: &Path,
    svg_path: &Path,
    machine: &Value,
    started: Instant,
) -> Result<()> {
    let samples = if options.quick { 5 } else { 30 };
    eprintln!(
        "bench scale: {:?} listeners, {} reloads each (after {WARMUP_RELOADS} warm-up); {}",
        options.listeners, options.reloads, machine["summary"]
    );
    let mut sizes = Vec::new();
    for &n in &options.listeners {
        let t = Instant::now();
        eprint!("bench scale: {n} listeners ... ");
        let size = measure(bins, n, options.reloads, samples)?;
        eprintln!(
            "{:.0}s: total {} ms, spawn→ready {} ms, CPU {} ms/reload",
            t.elapsed().as_secs_f64(),
            ms(size.phases.total.median_ms),
            ms(size.phases.spawn_to_ready.median_ms),
            ms(size.controller_cpu_ms_per_reload),
        );
        sizes.push(size);
    }
    let (pairs, round_ms) = if options.quick { (2, 300) } else { (20, 500) };
    let mut overhead = Vec::new();
    let max = options.listeners.iter().copied().max().unwrap_or(1);
    for (groups, target) in [(1, "one"), (max, "one"), (max, "all")] {
        eprintln!("bench scale: steering overhead, {groups} groups, target {target} ...");
        let out = Command::new(&bins.steerbench)
            .args([
                "overhead-many",
                "--listeners",
                &groups.to_string(),
                "--target",
                target,
                "--pairs",
                &pairs.to_string(),
                "--round-ms",
                &round_ms.to_string(),
            ])
            .output()
            .context("failed to run steerbench")?;
        if !out.status.success() {
            bail!(
                "steerbench overhead-many failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        overhead.push(serde_json::from_slice::<Value>(&out.stdout).context("steerbench JSON")?);
    }
    let tables = render(&sizes, &overhead);
    println!("{tables}");
    let heading = format!(
        "reloader scale: reload time and controller cost vs listeners ({}, Linux {})",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
    );
    draw(svg_path, &heading, &sizes)?;
    let document = json!({
        "command": super::command_line(),
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "sizes": sizes,
        "steering_overhead": overhead,
        "tables": tables,
    });
    std::fs::write(json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    eprintln!(
        "bench scale: done in {:.0}s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        json_path.display(),
        svg_path.display()
    );
    if sizes.iter().any(|s| s.reloads_failed > 0) {
        bail!(
            "reloads failed in the scale section (a bug): see {}",
            json_path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lines_become_fields() {
        let info = parse_fdinfo(
            "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t20\n\
             key_size:\t4\nvalue_size:\t8\nmax_entries:\t1536\nmemlock:\t12608\nmap_id:\t41\n",
        );
        assert_eq!(info["map_type"], "20");
        assert_eq!(info["max_entries"], "1536");
        assert_eq!(info["memlock"], "12608");
        assert_eq!(info["map_id"], "41");
        assert!(!info.contains_key(""));
    }

    #[test]
    fn exponents_say_linear_quadratic_or_constant() {
        let linear = exponents(&[(2.0, 10.0), (32.0, 160.0), (128.0, 640.0)]);
        assert!(linear.iter().all(|e| (e.unwrap() - 1.0).abs() < 1e-9));
        let quadratic = exponents(&[(16.0, 1.0), (64.0, 16.0)]);
        assert!((quadratic[0].unwrap() - 2.0).abs() < 1e-9);
        let constant = exponents(&[(1.0, 5.0), (256.0, 5.0)]);
        assert_eq!(constant[0], Some(0.0));
        assert_eq!(exponents(&[(1.0, 0.0), (2.0, 1.0)]), vec![None]);
        assert!(exponents(&[(1.0, 1.0)]).is_empty());
    }

    #[test]
    fn the_listeners_count_up_from_the_base_port() {
        let a = addrs(3);
        assert_eq!(
            a.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["127.0.0.1:20000", "127.0.0.1:20001", "127.0.0.1:20002"]
        );
    }
}
