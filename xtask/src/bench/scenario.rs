//! One scenario: one server, one reload method, R reloads at interval I
//! under the load client's connections, in a network namespace of its own.
//!
//! - `naive`: start instance N+1 (it listens with `SO_REUSEPORT` beside N),
//!   wait until its listeners are up, send N its graceful stop signal, wait
//!   until N exited. `net.ipv4.tcp_migrate_req=0`.
//! - `sysctl`: the same with `net.ipv4.tcp_migrate_req=1`: the kernel moves
//!   what is queued in a closing listener to another member of the group.
//! - `reloader`: `reloader run` and `reloader reload --wait`.
//!
//! The load is the new-connection client (`loadgen`) or the keep-alive
//! client (`kaload`, see [`Client`]).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use reloader_tests::{
    instance::Instance,
    keepalive,
    loadgen::{self, monotonic_ns},
};

use super::{
    report::{Phases, Reload},
    server::{self, ADDR, Extra, MigrateReq, Proc, Server, Setup},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Naive,
    Sysctl,
    Reloader,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Naive, Method::Sysctl, Method::Reloader];

    pub fn name(self) -> &'static str {
        match self {
            Method::Naive => "naive",
            Method::Sysctl => "sysctl",
            Method::Reloader => "reloader",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Method::Naive => {
                "new instance with SO_REUSEPORT, then graceful stop of the old; tcp_migrate_req=0"
            }
            Method::Sysctl => "the same with net.ipv4.tcp_migrate_req=1",
            Method::Reloader => "reloader run + reloader reload --wait",
        }
    }
}

/// The release binaries the bench runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub reloader: PathBuf,
    pub testserver: PathBuf,
    pub loadgen: PathBuf,
    pub kaload: PathBuf,
    pub steerbench: PathBuf,
}

/// The load client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    /// `loadgen`: this many new connections at a time, one request each
    /// (`Connection: close`), each followed at once by the next.
    Connections { concurrency: usize },
    /// `kaload`: this many persistent HTTP/1.1 connections, each sending
    /// its next request `pause_ms` after the previous response (0: back to
    /// back); a request that failed on a reused connection before any byte
    /// of its response is retried once on a new connection (both attempts
    /// recorded).
    KeepAlive { connections: usize, pause_ms: u64 },
}

/// How a scenario departs from the plain setup: the server's own
/// configuration, and `reloader run`'s options.
#[derive(Clone, Debug, Default)]
pub struct Variant {
    pub extra: Extra,
    /// Added to `reloader run` (e.g. `--settle 1s`).
    pub reloader_args: Vec<String>,
}

/// The same for every scenario of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    pub reloads: usize,
    pub interval_ms: u64,
    pub client: Client,
    /// Load before the first reload and after the last.
    pub warmup_ms: u64,
    pub cooldown_ms: u64,
    /// The load client's whole-connection timeout.
    pub timeout_ms: u64,
}

/// What the load client recorded.
pub enum Events {
    /// One per connection (`loadgen`).
    Connections(Vec<loadgen::Event>),
    /// One per request (`kaload`).
    KeepAlive(Vec<keepalive::Event>),
}

/// What a scenario produced.
pub struct Outcome {
    pub events: Events,
    pub reloads: Vec<Reload>,
    /// `net.ipv4.tcp_migrate_req` in its namespace while it ran.
    pub migrate_req: String,
}

/// Runs one scenario in a fresh network namespace.
pub fn run(
    server: Server,
    method: Method,
    bins: &Bins,
    params: &Params,
    variant: &Variant,
) -> Result<Outcome> {
    let (bins, params, variant) = (bins.clone(), params.clone(), variant.clone());
    server::in_netns(move || {
        let setup = Setup::with_extra(
            server,
            &bins.testserver,
            params.reloads as u64 + 1,
            &variant.extra,
        )?;
        let sysctl = MigrateReq::set(method == Method::Sysctl)?;
        let migrate_req = server::migrate_req()?;
        let (events, reloads) = match method {
            Method::Naive | Method::Sysctl => plain(&setup, &bins, &params),
            Method::Reloader => with_reloader(&setup, &bins, &params, &variant.reloader_args),
        }
        .with_context(|| {
            format!(
                "{} / {}: server output in {}",
                server.name(),
                method.name(),
                tail(&setup.log(), 20)
            )
        })?;
        drop(sysctl);
        Ok(Outcome {
            events,
            reloads,
            migrate_req,
        })
    })
}

/// The load client, running.
struct Load {
    proc: Proc,
    out: PathBuf,
    timeout: Duration,
    client: Client,
}

impl Load {
    fn start(bins: &Bins, params: &Params, dir: &Path) -> Result<Self> {
        let out = dir.join("events.bin");
        // Bounded whatever happens here: the planned run plus a margin.
        let planned = params.warmup_ms
            + params.cooldown_ms
            + params.reloads as u64 * params.interval_ms.max(2_000);
        let mut argv = match params.client {
            Client::Connections { concurrency } => vec![
                bins.loadgen.display().to_string(),
                "--concurrency".into(),
                concurrency.to_string(),
            ],
            Client::KeepAlive {
                connections,
                pause_ms,
            } => vec![
                bins.kaload.display().to_string(),
                "--connections".into(),
                connections.to_string(),
                "--pause-ms".into(),
                pause_ms.to_string(),
                "--retry".into(),
            ],
        };
        argv.extend([
            "--addr".into(),
            ADDR.into(),
            "--timeout-ms".into(),
            params.timeout_ms.to_string(),
            "--max-duration-s".into(),
            (planned / 1000 + 120).to_string(),
            "--out".into(),
            out.display().to_string(),
        ]);
        let proc = Proc::spawn(&argv, &[], &dir.join("loadgen.log"))?;
        Ok(Self {
            proc,
            out,
            timeout: Duration::from_millis(params.timeout_ms),
            client: params.client,
        })
    }

    fn finish(mut self) -> Result<Events> {
        self.proc.signal(Signal::SIGTERM);
        if !self.proc.wait(self.timeout + Duration::from_secs(30))? {
            bail!("the load client did not exit after SIGTERM");
        }
        let file = std::fs::File::open(&self.out)
            .with_context(|| format!("the load client wrote no {}", self.out.display()))?;
        let file = std::io::BufReader::new(file);
        let events = match self.client {
            Client::Connections { .. } => Events::Connections(loadgen::read_events(file)?),
            Client::KeepAlive { .. } => Events::KeepAlive(keepalive::read_events(file)?),
        };
        let _ = std::fs::remove_file(&self.out);
        Ok(events)
    }
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1000.0
}

/// Sleeps until reload `k` is due (reloads start every interval; one that
/// is late because the previous took longer starts at once).
fn wait_for_slot(first: Instant, k: usize, interval: Duration) {
    let due = first + interval * k as u32;
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// Runs the load client, and `reload(k)` for k in 0..R, one every
/// interval, with warm-up and cool-down around them; returns every
/// connection and every reload.
fn under_load(
    bins: &Bins,
    params: &Params,
    dir: &Path,
    mut reload: impl FnMut(usize) -> Result<Reload>,
) -> Result<(Events, Vec<Reload>)> {
    let load = Load::start(bins, params, dir)?;
    std::thread::sleep(Duration::from_millis(params.warmup_ms));
    let interval = Duration::from_millis(params.interval_ms);
    let mut reloads = Vec::with_capacity(params.reloads);
    let first = Instant::now();
    for k in 0..params.reloads {
        wait_for_slot(first, k, interval);
        reloads.push(reload(k)?);
    }
    std::thread::sleep(Duration::from_millis(params.cooldown_ms));
    Ok((load.finish()?, reloads))
}

fn plain(setup: &Setup, bins: &Bins, params: &Params) -> Result<(Events, Vec<Reload>)> {
    let sockets = setup.server.sockets_per_generation();
    let log = setup.log();
    let start = |generation: u64| {
        Proc::spawn(
            &setup.command_for(generation),
            &[("RELOADER_GENERATION", generation.to_string())],
            &log,
        )
    };
    let mut current = start(1)?;
    server::wait_listening(sockets, Duration::from_secs(30))
        .context("the first instance did not listen")?;

    let result = under_load(bins, params, setup.dir.path(), |k| {
        let generation = k as u64 + 2;
        let start_ns = monotonic_ns();
        let t0 = Instant::now();
        let mut next = start(generation)?;
        if let Err(e) = server::wait_listening(2 * sockets, Duration::from_secs(30)) {
            next.kill();
            return Ok(Reload {
                start_ns,
                end_ns: monotonic_ns(),
                succeeded: false,
                error: Some(format!("generation {generation} did not listen: {e:#}")),
                phases: Phases::default(),
            });
        }
        let ready = Instant::now();
        current.signal(setup.server.drain_signal());
        let signalled = Instant::now();
        let by_itself = current.wait(Duration::from_secs(30))?;
        let exited = Instant::now();
        current = next;
        Ok(Reload {
            start_ns,
            end_ns: monotonic_ns(),
            succeeded: by_itself,
            error: (!by_itself).then(|| {
                format!(
                    "generation {} was killed at the drain timeout",
                    generation - 1
                )
            }),
            phases: Phases {
                spawn_to_ready_ms: Some(ms_between(t0, ready)),
                ready_to_cutover_ms: Some(ms_between(ready, signalled)),
                cutover_to_old_exited_ms: Some(ms_between(signalled, exited)),
                total_ms: Some(ms_between(t0, exited)),
            },
        })
    });
    current.signal(setup.server.drain_signal());
    current.wait(Duration::from_secs(10))?;
    result
}

/// `reloader run` (the bench's release build, through `$RELOADER_BIN`)
/// wrapping `setup`'s server, its first generation active.
pub fn start_reloader(setup: &Setup, extra: &[&str]) -> Instance {
    let mut args = vec![
        "--listen",
        ADDR,
        "--drain-signal",
        setup.server.drain_signal_name(),
        "--drain-timeout",
        "30s",
    ];
    args.extend(extra);
    let command = setup.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().expect("scratch directory");
    // Warnings only: the bench measures reloader, not its debug log —
    // unless BENCH_RELOADER_LOG asks for more (with BENCH_KEEP_LOGS=DIR,
    // to see where a phase's time goes).
    let level = std::env::var("BENCH_RELOADER_LOG").unwrap_or_else(|_| "warn".into());
    let instance = Instance::spawn_with_env(dir, &args, &command, &[("RELOADER_LOG", &level)]);
    instance.wait_active(Duration::from_secs(30));
    instance
}

fn with_reloader(
    setup: &Setup,
    bins: &Bins,
    params: &Params,
    reloader_args: &[String],
) -> Result<(Events, Vec<Reload>)> {
    let args: Vec<&str> = reloader_args.iter().map(String::as_str).collect();
    let mut instance = start_reloader(setup, &args);
    let result = under_load(bins, params, setup.dir.path(), |_| {
        let start_ns = monotonic_ns();
        let reload = instance.reload_wait();
        let end_ns = monotonic_ns();
        let succeeded = reload.ok();
        Ok(Reload {
            start_ns,
            end_ns,
            succeeded,
            error: (!succeeded).then(|| reload.to_string()),
            phases: Phases::of(reload.report()),
        })
    });
    if !instance.stop().success() {
        eprintln!(
            "bench: reloader did not stop cleanly:\n{}",
            tail_text(&instance.log_text(), 20)
        );
    }
    if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {dir}"))?;
        let path = Path::new(&dir).join(format!("{}-reloader.log", setup.server.name()));
        std::fs::write(&path, instance.log_text())
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    result
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    format!("{} (last lines:\n{})", path.display(), tail_text(&text, n))
}

fn tail_text(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
