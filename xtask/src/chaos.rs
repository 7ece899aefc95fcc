//! `cargo xtask chaos --seed N --duration D`: faults injected at random —
//! reproducibly, from the seed — into an instance serving a continuous load
//! of new connections, with the test server and with nginx, each in its own
//! network namespace:
//!
//! - reloads, some with a broken config (the new generation exits), a slow
//!   start, or a crash right after it became active (SIGKILL while the
//!   previous generation still settles: it must be reinstated);
//! - SIGKILL of the active generation and of draining ones, SIGSTOP of a
//!   draining one (killed at the drain timeout);
//! - SIGKILL and restart of the controller (adoption);
//! - a flood of idle control connections, and malformed control messages.
//!
//! Invariants, checked as it goes and at the end: every connection that
//! failed is explained by a fault that killed, stopped or crashed a
//! generation (it was in flight on it at that moment, or started while no
//! generation was active after the active one died) — anything else is a
//! violation; decoy processes in the namespace (not the instance's) are
//! never signalled; after the stop no process of the instance, no zombie,
//! no file, no pin is left; the controller's fds and the maps' entries do
//! not grow. It exits non-zero on any violation.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nix::{sys::signal::Signal, unistd::Pid};
use reloader::{
    demo::load::{self, Config, Event, Kind},
    generation::State,
    status::StatusReport,
};
use reloader_tests::{
    instance::{Instance, StatusExt},
    nginx::Nginx,
    privileged,
};
use serde_json::{Value, json};

use crate::{run, workspace_root};

const ADDR: &str = "127.0.0.1:8080";
const DRAIN_TIMEOUT_S: u64 = 3;
const SETTLE_MS: u64 = 500;

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Seed of the fault schedule (the same seed, the same faults at the
    /// same moments).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long to inject faults, in all (split over the servers).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Servers: testserver, nginx.
    #[arg(long, value_delimiter = ',', default_value = "testserver,nginx")]
    servers: Vec<String>,
}

/// A small deterministic generator (splitmix64): the schedule depends on
/// the seed only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Reload,
    BrokenReload,
    SlowReload,
    CrashAfterCutover,
    KillActive,
    KillDraining,
    StopDraining,
    KillController,
    ControlFlood,
    MalformedControl,
}

impl Fault {
    /// Picks a fault; weights out of 100.
    fn pick(rng: &mut Rng) -> Self {
        const TABLE: [(Fault, u64); 10] = [
            (Fault::Reload, 30),
            (Fault::BrokenReload, 8),
            (Fault::SlowReload, 8),
            (Fault::CrashAfterCutover, 8),
            (Fault::KillActive, 6),
            (Fault::KillDraining, 8),
            (Fault::StopDraining, 6),
            (Fault::KillController, 10),
            (Fault::ControlFlood, 8),
            (Fault::MalformedControl, 8),
        ];
        let mut roll = rng.below(100);
        for (fault, weight) in TABLE {
            if roll < weight {
                return fault;
            }
            roll -= weight;
        }
        Fault::Reload
    }
}

/// A moment a generation was killed, stopped or crashed, and until when no
/// generation was active because of it (if it was the active one).
#[derive(Clone, Debug)]
struct Disruption {
    fault: Fault,
    at_ns: u64,
    outage_until_ns: Option<u64>,
}

pub fn run_chaos(args: ChaosArgs) -> Result<()> {
    let root = workspace_root();
    // The debug build `cargo xtask test` uses: CI has it already.
    run(Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--workspace", "--bins"]))?;
    let release = root.join("target/debug");
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("RELOADER_BIN", release.join("reloader")) };
    let each = args.duration / args.servers.len().max(1) as u32;
    let mut results = Vec::new();
    for (i, server) in args.servers.iter().enumerate() {
        let (server, release) = (server.clone(), release.clone());
        let seed = args.seed.wrapping_add(i as u64);
        let result = std::thread::spawn(move || chaos_one(&server, seed, each, &release))
            .join()
            .map_err(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                anyhow::anyhow!("the chaos thread panicked: {msg}")
            })??;
        results.push(result);
    }
    let path = root.join("target/chaos.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nresults: {}", path.display());
    let violations: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r["violations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |v| format!("{}: {}", r["server"].as_str().unwrap_or("?"), v))
        })
        .collect();
    ensure!(
        violations.is_empty(),
        "chaos found violations:\n{}",
        violations.join("\n")
    );
    println!("chaos: no violation");
    Ok(())
}

/// What one server's run needs to break its next generation.
enum Knobs {
    /// The test server's mode file: extra flags for the next start.
    TestServer { mode: PathBuf },
    /// nginx: per-generation configs (breakable) and a "slow" marker the
    /// wrapper script sleeps on.
    Nginx { nginx: Nginx, slow: PathBuf },
}

impl Knobs {
    fn broken(&self, generation: u64) -> Result<()> {
        match self {
            Knobs::TestServer { mode } => Ok(std::fs::write(mode, "--exit-on-start")?),
            Knobs::Nginx { nginx, .. } => Ok(std::fs::write(
                nginx.dir.path().join(format!("gen-{generation}.conf")),
                "this is not an nginx configuration;\n",
            )?),
        }
    }

    fn slow(&self) -> Result<()> {
        match self {
            Knobs::TestServer { mode } => Ok(std::fs::write(mode, "--start-delay-ms 2000")?),
            Knobs::Nginx { slow, .. } => Ok(std::fs::write(slow, "")?),
        }
    }

    fn normal(&self) {
        match self {
            Knobs::TestServer { mode } => {
                let _ = std::fs::remove_file(mode);
            }
            Knobs::Nginx { slow, .. } => {
                let _ = std::fs::remove_file(slow);
            }
        }
    }
}

fn chaos_one(server: &str, seed: u64, duration: Duration, release: &Path) -> Result<Value> {
    privileged();
    let dir = tempfile::tempdir()?;
    let (knobs, command, drain): (Knobs, Vec<String>, &str) = match server {
        "testserver" => {
            let mode = dir.path().join("mode");
            let mut command = reloader_tests::testserver_command(&release.join("testserver"), ADDR);
            command.extend(["--mode-file".into(), mode.display().to_string()]);
            (Knobs::TestServer { mode }, command, "TERM")
        }
        "nginx" => {
            // Configs for more generations than a run starts.
            let nginx = Nginx::new(ADDR, 5000);
            let slow = dir.path().join("slow");
            let inner = nginx
                .command()
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" ");
            let script = format!("[ -e {} ] && sleep 2; exec {inner}", slow.display());
            (
                Knobs::Nginx { nginx, slow },
                vec!["sh".into(), "-c".into(), script],
                "QUIT",
            )
        }
        other => bail!("unknown server {other:?}: use testserver or nginx"),
    };
    let decoys = Decoys::start(dir.path())?;
    let drain_timeout = format!("{DRAIN_TIMEOUT_S}s");
    let settle = format!("{SETTLE_MS}ms");
    let args = [
        "--name",
        "chaos",
        "--listen",
        ADDR,
        "--drain-signal",
        drain,
        "--drain-timeout",
        &drain_timeout,
        "--settle",
        &settle,
        "--ready-timeout",
        "5s",
        "--ready-probe",
        "http://127.0.0.1:8080/",
        "--max-draining",
        "6",
    ];
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let instance_dir = tempfile::tempdir()?;
    let mut instance = Instance::start_in(instance_dir, &args, &command);
    let fds_start = fd_count(instance.pid())?;

    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let (stop_load, stopped) = tokio::sync::oneshot::channel::<()>();
    let load = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(load::run_with(
                Config {
                    max_duration: Duration::from_secs(7200),
                    ..Config::concurrent(ADDR.parse().expect("address"), 8)
                },
                async {
                    let _ = stopped.await;
                },
                move |e| {
                    let _ = events_tx.send(e);
                },
            ));
    });

    let mut rng = Rng(seed);
    let began = Instant::now();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut disruptions: Vec<Disruption> = Vec::new();
    let mut reloads = (0u64, 0u64);
    let mut stopped_pids: Vec<u32> = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    // Every fault with when it began and ended (monotonic ns).
    let mut timeline: Vec<(Fault, u64, u64)> = Vec::new();
    let load_began = load::monotonic_ns();
    while began.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(200 + rng.below(1300)));
        let fault = Fault::pick(&mut rng);
        *faults.entry(format!("{fault:?}")).or_default() += 1;
        let at = load::monotonic_ns();
        let next = instance
            .status()
            .generations
            .first()
            .map_or(0, |g| g.generation)
            + 1;
        match fault {
            Fault::Reload | Fault::BrokenReload | Fault::SlowReload => {
                match fault {
                    Fault::BrokenReload => knobs.broken(next)?,
                    Fault::SlowReload => knobs.slow()?,
                    _ => {}
                }
                let ok = instance.reload_wait().ok();
                knobs.normal();
                if ok {
                    reloads.0 += 1;
                } else {
                    reloads.1 += 1;
                }
                if fault == Fault::Reload && !ok {
                    violations.push(format!(
                        "a plain reload failed at {:.1}s",
                        began.elapsed().as_secs_f64()
                    ));
                }
            }
            Fault::CrashAfterCutover => {
                // Reload in the background; kill the new generation as soon
                // as it is active (the previous one still settles).
                let mut client = Command::new(reloader_tests::instance::reloader_bin())
                    .args(["reload", "--wait", "--timeout", "30s", "--control-socket"])
                    .arg(&instance.socket)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut killed = None;
                while Instant::now() < deadline && killed.is_none() {
                    let status = instance.status();
                    if let Some(pid) = active_pid(&status, next) {
                        let at_ns = load::monotonic_ns();
                        kill_group(pid, Signal::SIGKILL);
                        killed = Some((at_ns, pid));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let _ = client.wait();
                if let Some((at_ns, pid)) = killed {
                    disruptions.push(Disruption {
                        fault,
                        at_ns,
                        outage_until_ns: Some(wait_active(&instance, pid)),
                    });
                }
                reloads.1 += 1;
            }
            Fault::KillActive => {
                if let Some(pid) = active_pid(&instance.status(), 0) {
                    let at_ns = load::monotonic_ns();
                    kill_group(pid, Signal::SIGKILL);
                    disruptions.push(Disruption {
                        fault,
                        at_ns,
                        outage_until_ns: Some(wait_active(&instance, pid)),
                    });
                }
            }
            Fault::KillDraining | Fault::StopDraining => {
                // A reload without waiting; the old generation drains (it
                // settles for SETTLE_MS first).
                let _ = instance.client(&["reload"]);
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut draining = None;
                while draining.is_none() && Instant::now() < deadline {
                    draining = draining_pid(&instance.status());
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Some(pid) = draining {
                    let at_ns = load::monotonic_ns();
                    if fault == Fault::KillDraining {
                        kill_group(pid, Signal::SIGKILL);
                    } else {
                        kill_group(pid, Signal::SIGSTOP);
                        stopped_pids.push(pid);
                    }
                    disruptions.push(Disruption {
                        fault,
                        at_ns,
                        outage_until_ns: None,
                    });
                }
            }
            Fault::KillController => {
                nix::sys::signal::kill(Pid::from_raw(instance.pid() as i32), Signal::SIGKILL)?;
                instance.wait_exit(Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
                instance.respawn();
                instance.wait_active(Duration::from_secs(20));
                // The old controller's fds are gone with it; start again.
            }
            Fault::ControlFlood => {
                let idle: Vec<_> = (0..300)
                    .filter_map(|_| std::os::unix::net::UnixStream::connect(&instance.socket).ok())
                    .collect();
                let reload = instance.reload_wait();
                drop(idle);
                if reload.ok() {
                    reloads.0 += 1;
                } else {
                    violations.push(format!("a reload during a control flood failed: {reload}"));
                }
            }
            Fault::MalformedControl => {
                for garbage in [
                    &b"{\"request\":\"explode\"}\n"[..],
                    b"\xff\xfe\n",
                    &[b' '; 5000][..],
                ] {
                    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&instance.socket) {
                        let _ = s.write_all(garbage);
                    }
                }
                let status = instance.status();
                if status.active_generation().is_none() {
                    violations.push("no active generation after malformed requests".into());
                }
            }
        }
        timeline.push((fault, at, load::monotonic_ns()));
    }
    for pid in &stopped_pids {
        kill_group(*pid, Signal::SIGCONT);
    }
    let _ = stop_load.send(());
    load.join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    let events: Vec<Event> = events_rx.try_iter().collect();

    // Resources of the controller now running, and map entries.
    let status = instance.status();
    let fds_end = fd_count(instance.pid())?;
    let live_sockets: u64 = status
        .generations
        .iter()
        .filter(|g| {
            matches!(
                g.state,
                State::Active | State::Draining | State::Ready | State::Starting
            )
        })
        .map(|g| g.sockets.len() as u64)
        .sum();
    let entries = status.map_entries;
    if entries.probes != 0 {
        violations.push(format!("probe routes left in the map: {entries:?}"));
    }
    if entries.sockets > live_sockets {
        violations.push(format!(
            "map entries ({entries:?}) beyond the live generations' sockets ({live_sockets})"
        ));
    }
    let stopped_cleanly = instance.stop().success();
    let pins = reloader::state::saved::pin_dir("chaos", &instance.socket);
    let mut left: Vec<String> = std::fs::read_dir(instance.dir.path())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "reloader.log")
        .collect();
    if pins.exists() {
        left.push(pins.display().to_string());
    }
    if !left.is_empty() {
        violations.push(format!("left behind after the stop: {left:?}"));
    }
    let orphans = instance_processes("chaos");
    if !orphans.is_empty() {
        violations.push(format!(
            "processes of the instance outlived it: {orphans:?}"
        ));
    }
    violations.extend(decoys.check());

    // Failures: explained by a disruption, or not.
    let mut explained: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexplained: Vec<String> = Vec::new();
    let mut failed_by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind.is_failure()) {
        *failed_by_kind.entry(e.kind.name()).or_default() += 1;
        let end = e.start_ns + u64::from(e.latency_us) * 1000;
        let cause = disruptions.iter().find(|d| {
            let in_flight = e.start_ns <= d.at_ns && d.at_ns <= end;
            let in_outage = d
                .outage_until_ns
                .is_some_and(|until| e.start_ns >= d.at_ns && e.start_ns <= until);
            in_flight || in_outage
        });
        match cause {
            Some(d) => *explained.entry(format!("{:?}", d.fault)).or_default() += 1,
            None => {
                let secs = |ns: u64| ns.saturating_sub(load_began) as f64 / 1e9;
                let during = timeline
                    .iter()
                    .rev()
                    .find(|(_, from, _)| *from <= e.start_ns)
                    .map(|(f, from, to)| format!("{f:?} {:.3}s–{:.3}s", secs(*from), secs(*to)))
                    .unwrap_or_default();
                unexplained.push(format!(
                    "{} started {:.3}s, ended {:.3}s (last fault: {during})",
                    e.kind.name(),
                    secs(e.start_ns),
                    secs(end)
                ));
            }
        }
    }
    if !unexplained.is_empty() {
        violations.push(format!(
            "{} failed connections not explained by a killed, stopped or crashed generation: \
             first ones {:?}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(10)]
        ));
    }
    let ok = events.iter().filter(|e| e.kind == Kind::Ok).count();
    println!(
        "{server}: {:.0}s, faults {faults:?}; reloads {} succeeded, {} failed (as injected); \
         {} connections, {ok} answered, failures by kind {failed_by_kind:?}, explained by \
         {explained:?}, unexplained {}; controller fds {fds_start} -> {fds_end} (restarts \
         reset this); clean stop {stopped_cleanly}; violations {}",
        began.elapsed().as_secs_f64(),
        reloads.0,
        reloads.1,
        events.len(),
        unexplained.len(),
        violations.len()
    );
    Ok(json!({
        "server": server,
        "seed": seed,
        "seconds": began.elapsed().as_secs_f64(),
        "faults": faults,
        "reloads_succeeded": reloads.0,
        "reloads_failed": reloads.1,
        "connections": events.len(),
        "answered": ok,
        "failed_by_kind": failed_by_kind,
        "failed_explained_by": explained,
        "failed_unexplained": unexplained.len(),
        "controller_fds": [fds_start, fds_end],
        "clean_stop": stopped_cleanly,
        "violations": violations,
    }))
}

/// The pid of generation `at_least`'s (or any, with 0) active generation.
fn active_pid(status: &StatusReport, at_least: u64) -> Option<u32> {
    status
        .generations
        .iter()
        .find_map(|g| (g.state == State::Active && g.generation >= at_least).then_some(g.pid)?)
}

fn draining_pid(status: &StatusReport) -> Option<u32> {
    status
        .generations
        .iter()
        .find_map(|g| (g.state == State::Draining).then_some(g.pid)?)
}

/// Waits until a generation other than the one with `killed` pid is
/// active; returns when (monotonic ns).
fn wait_active(instance: &Instance, killed: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if active_pid(&instance.status(), 0).is_some_and(|pid| pid != killed) {
            return load::monotonic_ns();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    load::monotonic_ns()
}

fn kill_group(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), signal);
}

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("fds of {pid}"))?
        .count())
}

/// Live processes whose environment names instance `name`.
fn instance_processes(name: &str) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
        .filter(|p| {
            p.environ().is_ok_and(|env| {
                env.get(std::ffi::OsStr::new("RELOADER_NAME"))
                    .is_some_and(|v| v == name)
            })
        })
        .map(|p| p.pid as u32)
        .collect()
}

/// Processes in the namespace that are not the instance's: each records
/// every signal it receives; none may receive any.
struct Decoys {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Decoys {
    fn start(dir: &Path) -> Result<Self> {
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for i in 0..3 {
            let log = dir.join(format!("decoy-{i}.signals"));
            let script = format!(
                "for s in HUP INT QUIT USR1 USR2 TERM CONT; do trap \"echo $s >> {}\" $s; done; \
                 while :; do sleep 1; done",
                log.display()
            );
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &script]).stdin(Stdio::null());
            if i == 0 {
                // One in a process group of its own, like a server.
                cmd.process_group(0);
            }
            children.push(cmd.spawn()?);
            logs.push(log);
        }
        Ok(Self { children, logs })
    }

    fn check(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (child, log) in self.children.iter_mut().zip(&self.logs) {
            if let Ok(Some(status)) = child.try_wait() {
                problems.push(format!("decoy {} died: {status}", child.id()));
            }
            if let Ok(text) = std::fs::read_to_string(log)
                && !text.is_empty()
            {
                problems.push(format!(
                    "decoy {} received signals: {}",
                    child.id(),
                    text.trim()
                ));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        problems
    }
}
