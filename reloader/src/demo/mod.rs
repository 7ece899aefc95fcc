//! `reloader demo`: shows what reloader does, with nothing to install.
//!
//! It runs `reloader run` (this binary) around the built-in server
//! ([`server`]), drives a load of new connections at it ([`load`]), reloads
//! every `--reload-every`, and shows generations, connections per second
//! per generation, reloads and failures as they happen. `--compare` first
//! runs the same load and reload cadence with a plain `SO_REUSEPORT`
//! reload (start the new server, then stop the old one), which is what
//! people do without reloader. Every number comes from the connections
//! the demo really made.

#![allow(clippy::disallowed_methods)] // the demo is a client of `reloader run`, not the controller: it spawns its processes and waits for them itself (the waits on blocking threads)

pub mod load;
pub mod server;
mod stats;

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use stats::Stats;
use tokio::sync::watch;

use crate::{
    control::{self, Request, Response},
    discovery,
    generation::human_duration,
    steering::{Options, Steering, SteeringError},
};

/// `reloader demo` options.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub duration: Duration,
    pub reload_every: Duration,
    pub port: u16,
    pub compare: bool,
    pub concurrency: usize,
}

/// How one phase went.
struct Outcome {
    title: &'static str,
    stats: Stats,
    reloads: u64,
    reloads_failed: u64,
    elapsed: Duration,
    /// spawn→ready and cutover→old exited, per reload (reloader only).
    timings: Vec<(f64, f64)>,
}

/// Runs the demo; `Ok(false)` when reloader itself failed a connection.
pub fn run(options: &DemoOptions) -> Result<bool> {
    check_privileges()?;
    let addr: SocketAddr = ([127, 0, 0, 1], options.port).into();
    check_port_free(addr)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut outcomes = Vec::new();
    if options.compare {
        outcomes.push(runtime.block_on(naive_phase(options, addr))?);
    }
    let outcome = runtime.block_on(reloader_phase(options, addr))?;
    let clean = outcome.stats.failed() == 0;
    outcomes.push(outcome);
    print_summary(options, &mut outcomes);
    Ok(clean)
}

fn check_privileges() -> Result<()> {
    match Steering::load(&Options::default()) {
        Ok(_) => Ok(()),
        Err(error @ SteeringError::PermissionDenied { .. }) => bail!(
            "{error}\n\nreloader demo loads an eBPF program and copies sockets between \
             processes: run it as root (sudo), or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE"
        ),
        Err(error) => Err(error).context("the steering program cannot be loaded here"),
    }
}

fn check_port_free(addr: SocketAddr) -> Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{addr} is in use: choose another port with --port"))
}

/// The plain reload: start generation N+1 with `SO_REUSEPORT`, wait until
/// it listens, then send generation N its graceful stop signal.
async fn naive_phase(options: &DemoOptions, addr: SocketAddr) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let spawn = |generation: u64| -> Result<Child> {
        Command::new(&exe)
            .args(["__serve", "--listen", &addr.to_string()])
            .env("RELOADER_GENERATION", generation.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start the demo server")
    };
    // Off the runtime's threads, so the load keeps running meanwhile.
    let wait_listening = |child: &Child| {
        let pid = child.id();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while discovery::find(pid, &[(discovery::Transport::Tcp, addr)])?.per_address[0]
                .is_empty()
            {
                if Instant::now() > deadline {
                    bail!("the demo server did not listen within 10s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    let mut current = spawn(1)?;
    wait_listening(&current).await??;
    let mut generation = 1;
    let mut exiting: Vec<Child> = Vec::new();

    let (stats, stop, start, load) = start_load(options, addr);
    let view = View::new("naive SO_REUSEPORT reload", options);
    let mut reloads = 0;
    let end = start + options.duration;
    let mut next = start + options.reload_every;
    let newest = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let states: Box<States> = {
        let newest = newest.clone();
        Box::new(move || {
            let newest = newest.load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                (newest.saturating_sub(3).max(1)..=newest)
                    .map(|g| {
                        (
                            g,
                            if g == newest { "active" } else { "stopped" }.to_string(),
                        )
                    })
                    .collect()
            })
        })
    };
    while next < end {
        tick(&view, &stats, start, reloads, 0, &*states, next).await;
        next += options.reload_every;
        generation += 1;
        let next = spawn(generation)?;
        wait_listening(&next).await??;
        terminate(&current);
        exiting.push(std::mem::replace(&mut current, next));
        exiting.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        newest.store(generation, std::sync::atomic::Ordering::Relaxed);
        reloads += 1;
    }
    tick(&view, &stats, start, reloads, 0, &*states, end).await;
    stop.send_replace(true);
    let _ = load.await;
    let elapsed = start.elapsed();
    terminate(&current);
    for mut child in exiting.into_iter().chain(Some(current)) {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
    let stats = take(stats);
    view.done(&stats, reloads, 0);
    Ok(Outcome {
        title: "naive reuseport",
        stats,
        reloads,
        reloads_failed: 0,
        elapsed,
        timings: Vec::new(),
    })
}

/// The same load under `reloader run`, reloading with `reload --wait`.
async fn reloader_phase(options: &DemoOptions, addr: SocketAddr) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::Builder::new()
        .prefix("reloader-demo-")
        .tempdir()?;
    let socket = dir.path().join("control.sock");
    let log_path = dir.path().join("reloader.log");
    let log = std::fs::File::create(&log_path)?;
    let mut controller = Command::new(&exe)
        .args(["run", "--name", "demo", "--control-socket"])
        .arg(&socket)
        .args([
            "--listen",
            &addr.to_string(),
            "--drain-timeout",
            "10s",
            "--",
        ])
        .arg(&exe)
        .args(["__serve", "--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("failed to start `reloader run`")?;
    wait_active(&socket, &log_path, &mut controller).await?;

    let (stats, stop, start, load) = start_load(options, addr);
    let view = View::new("reloader", options);
    let (mut reloads, mut failed, mut timings) = (0, 0, Vec::new());
    let end = start + options.duration;
    let mut next = start + options.reload_every;
    let states: Box<States> = {
        let socket = socket.clone();
        Box::new(move || {
            let socket = socket.clone();
            Box::pin(async move {
                let answer = tokio::task::spawn_blocking(move || {
                    control::ask(&socket, &Request::Status {}, Duration::from_secs(2))
                })
                .await;
                match answer {
                    Ok(Ok(Response::Status { status })) => status
                        .generations
                        .iter()
                        .map(|g| (g.generation, g.state.to_string()))
                        .collect(),
                    _ => BTreeMap::new(),
                }
            })
        })
    };
    while next < end {
        tick(&view, &stats, start, reloads, failed, &*states, next).await;
        next += options.reload_every;
        let socket = socket.clone();
        let answer = tokio::task::spawn_blocking(move || {
            control::ask(
                &socket,
                &Request::Reload {
                    wait: true,
                    canary: None,
                },
                Duration::from_secs(60),
            )
        })
        .await??;
        match answer {
            Response::ReloadDone { report } => {
                reloads += 1;
                timings.push((
                    report.spawn_to_ready_ms.unwrap_or_default(),
                    report.cutover_to_old_exited_ms.unwrap_or_default(),
                ));
            }
            Response::ReloadFailed { report } => {
                failed += 1;
                eprintln!("{}", report.human());
            }
            other => bail!("unexpected answer: {other:?}"),
        }
    }
    tick(&view, &stats, start, reloads, failed, &*states, end).await;
    stop.send_replace(true);
    let _ = load.await;
    let elapsed = start.elapsed();
    let socket_for_stop = socket.clone();
    let _ = tokio::task::spawn_blocking(move || {
        control::ask(
            &socket_for_stop,
            &Request::Stop {
                deadline_unix_ms: None,
            },
            Duration::from_secs(10),
        )
    })
    .await?;
    let _ = tokio::task::spawn_blocking(move || controller.wait()).await?;
    let stats = take(stats);
    view.done(&stats, reloads, failed);
    Ok(Outcome {
        title: "reloader",
        stats,
        reloads,
        reloads_failed: failed,
        elapsed,
        timings,
    })
}

async fn wait_active(socket: &Path, log: &Path, controller: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let asked = socket.to_owned();
        let answer = tokio::task::spawn_blocking(move || {
            control::ask(&asked, &Request::Status {}, Duration::from_secs(2))
        })
        .await?;
        if let Ok(Response::Status { status }) = answer
            && status
                .listeners
                .iter()
                .all(|l| l.active_generation.is_some())
        {
            return Ok(());
        }
        if controller.try_wait()?.is_some() || Instant::now() > deadline {
            let log = log.to_owned();
            let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(log))
                .await?
                .unwrap_or_default();
            bail!("`reloader run` did not start its first generation:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Shared = Arc<Mutex<Stats>>;

/// Generation → state, for the view.
type States =
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = BTreeMap<u64, String>> + Send>> + Send + Sync;

fn start_load(
    options: &DemoOptions,
    addr: SocketAddr,
) -> (
    Shared,
    watch::Sender<bool>,
    Instant,
    tokio::task::JoinHandle<()>,
) {
    let stats: Shared = Arc::default();
    let (stop, mut stopped) = watch::channel(false);
    let start = Instant::now();
    let start_ns = load::monotonic_ns();
    let sink = stats.clone();
    let load = tokio::spawn(load::run_with(
        load::Config::concurrent(addr, options.concurrency),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
        move |event| {
            let second = (event.start_ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
            sink.lock().expect("stats lock").record(second, &event);
        },
    ));
    (stats, stop, start, load)
}

fn take(stats: Shared) -> Stats {
    std::mem::take(&mut *stats.lock().expect("stats lock"))
}

/// Waits until `until` (reloads keep a fixed schedule whatever they take),
/// refreshing the view every 500 ms.
async fn tick(
    view: &View,
    stats: &Shared,
    start: Instant,
    reloads: u64,
    failed: u64,
    states: &States,
    until: Instant,
) {
    loop {
        let states = states().await;
        view.show(
            &stats.lock().expect("stats lock"),
            start,
            reloads,
            failed,
            &states,
        );
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
    }
}

/// The live view: a redrawn screen on a terminal, one line a second
/// otherwise (logs, CI).
struct View {
    title: &'static str,
    terminal: bool,
    options: DemoOptions,
    last_line: Mutex<u64>,
}

impl View {
    fn new(title: &'static str, options: &DemoOptions) -> Self {
        Self {
            title,
            terminal: std::io::stdout().is_terminal(),
            options: options.clone(),
            last_line: Mutex::new(u64::MAX),
        }
    }

    fn show(
        &self,
        stats: &Stats,
        start: Instant,
        reloads: u64,
        failed: u64,
        states: &BTreeMap<u64, String>,
    ) {
        let elapsed = start.elapsed();
        let active = states
            .iter()
            .rev()
            .find(|(_, s)| *s == "active")
            .map_or("-".into(), |(g, _)| g.to_string());
        if !self.terminal {
            let second = elapsed.as_secs();
            let mut last = self.last_line.lock().expect("view lock");
            if *last != second {
                *last = second;
                println!(
                    "[{}] {:>3}s  active generation {active:>3}  reloads {reloads:>3}  \
                     connections {:>7}  failed {}",
                    self.title,
                    second,
                    stats.ok(),
                    stats.failed()
                );
            }
            return;
        }
        let mut out = String::new();
        out.push_str("\x1b[H\x1b[2J");
        out.push_str(&format!(
            "reloader demo — {} — 127.0.0.1:{}, reload every {}, {} of {}\n\n",
            self.title,
            self.options.port,
            human_duration(self.options.reload_every),
            human_duration(Duration::from_secs(elapsed.as_secs())),
            human_duration(self.options.duration),
        ));
        out.push_str("  GEN  STATE      CONNECTIONS/S (last second)\n");
        let last = elapsed.as_secs().saturating_sub(1) as usize;
        let second = stats.answered.get(last).cloned().unwrap_or_default();
        let busiest = second.values().copied().max().unwrap_or(1).max(1);
        let mut shown: Vec<u64> = states
            .keys()
            .copied()
            .chain(second.keys().copied())
            .collect();
        shown.sort_unstable();
        shown.dedup();
        for g in shown.iter().rev().take(8) {
            let n = second.get(g).copied().unwrap_or(0);
            let state = states.get(g).map_or("", String::as_str);
            let bar = "█".repeat((n * 40 / busiest) as usize);
            out.push_str(&format!("  {g:>3}  {state:<9} {n:>7} {bar}\n"));
        }
        out.push_str(&format!(
            "\n  active generation {active}   reloads {reloads} ({failed} failed)   \
             connections {}   failed connections {}\n",
            stats.ok(),
            stats.failed()
        ));
        for (kind, n) in &stats.failures {
            out.push_str(&format!("    {}: {n}\n", kind.name()));
        }
        print!("{out}");
        let _ = std::io::stdout().flush();
    }

    fn done(&self, stats: &Stats, reloads: u64, failed: u64) {
        if !self.terminal {
            println!(
                "[{}] done: {reloads} reloads ({failed} failed), {} connections, {} failed",
                self.title,
                stats.ok(),
                stats.failed()
            );
        }
    }
}

fn print_summary(options: &DemoOptions, outcomes: &mut [Outcome]) {
    println!();
    println!(
        "reloader demo summary: 127.0.0.1:{}, {} of load ({} concurrent connection loops), \
         a reload every {}",
        options.port,
        human_duration(options.duration),
        options.concurrency,
        human_duration(options.reload_every)
    );
    let mut rows: Vec<(String, Vec<String>)> = vec![
        ("".into(), Vec::new()),
        ("reloads".into(), Vec::new()),
        ("connections answered".into(), Vec::new()),
        ("connections failed".into(), Vec::new()),
        ("  by kind".into(), Vec::new()),
        ("failed per reload".into(), Vec::new()),
        ("connections/s".into(), Vec::new()),
        ("latency p50 / p99 / max".into(), Vec::new()),
        ("generations that served".into(), Vec::new()),
        ("spawn→ready (median)".into(), Vec::new()),
        ("cutover→old exited (median)".into(), Vec::new()),
    ];
    for o in outcomes.iter_mut() {
        let failed = o.stats.failed();
        let kinds: Vec<String> = o
            .stats
            .failures
            .iter()
            .map(|(k, n)| format!("{} {n}", k.name()))
            .collect();
        // Milliseconds, kept to the microsecond.
        let median = |v: Vec<f64>| -> String {
            if v.is_empty() {
                return "-".into();
            }
            let mut h = stats::histogram();
            for ms in v {
                h.saturating_record((ms * 1000.0).round() as u64);
            }
            human_duration(Duration::from_micros(stats::quantile(&h, 0.5)))
        };
        let values = [
            o.title.to_string(),
            format!("{} ({} failed)", o.reloads, o.reloads_failed),
            o.stats.ok().to_string(),
            failed.to_string(),
            if kinds.is_empty() {
                "-".into()
            } else {
                kinds.join(", ")
            },
            format!("{:.1}", failed as f64 / o.reloads.max(1) as f64),
            format!("{:.0}", o.stats.ok() as f64 / o.elapsed.as_secs_f64()),
            format!(
                "{} / {} / {}",
                human_duration(o.stats.latency(0.5)),
                human_duration(o.stats.latency(0.99)),
                human_duration(o.stats.latency(1.0))
            ),
            o.stats.per_generation().len().to_string(),
            median(o.timings.iter().map(|t| t.0).collect()),
            median(o.timings.iter().map(|t| t.1).collect()),
        ];
        for (row, value) in rows.iter_mut().zip(values) {
            row.1.push(value);
        }
    }
    for (label, values) in rows {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:>30}")).collect();
        println!("  {label:<28}{}", cells.join(""));
    }
    if let Some(reloader) = outcomes.last()
        && reloader.stats.failed() == 0
    {
        println!(
            "\n  reloader: 0 failed connections across {} reloads.",
            reloader.reloads
        );
    }
}

/// Sends SIGTERM to a demo server we started (our unreaped child: its pid
/// cannot have been reused).
fn terminate(child: &Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
}
