//! `reloader run` end to end: the real binary, the real kernel, real
//! servers (the test server and Debian's nginx), each test in its own
//! network namespace, with a continuous load of new connections that must
//! all be answered.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use reloader::{control::Response, generation::State, steering::EntryCounts};
use reloader_tests::{
    instance::{Instance, Reload, StatusExt, decode, process_alive, reload_wait},
    load::{self, Load},
    privileged,
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

fn with_mode_file(args: &[&str], initial: Option<&str>) -> (Instance, std::path::PathBuf) {
    Instance::with_mode_file(testserver(), ADDR, args, initial)
}

/// Reloads `n` times under load and checks every connection was answered,
/// and that connections started after a reload completed were answered by
/// that reload's generation or a later one.
fn reload_under_load(instance: &mut Instance, n: usize, concurrency: usize) -> load::Report {
    let load = Load::start(addr(), concurrency);
    std::thread::sleep(Duration::from_millis(200));
    let mut completed: Vec<(Duration, u64)> = Vec::new();
    for i in 0..n {
        let reload = instance.reload_wait();
        assert!(
            reload.ok(),
            "reload {i} failed: {reload}\n{}",
            instance.log_text()
        );
        completed.push((load.start.elapsed(), reload.done().generation));
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    report.assert_no_failures();
    for outcome in &report.outcomes {
        let served = *outcome.result.as_ref().unwrap();
        let newest_done = completed
            .iter()
            .filter(|(t, _)| *t < outcome.started)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(1);
        assert!(
            served >= newest_done,
            "a connection started at {:?}, after generation {newest_done} was active and its \
             predecessor had exited, was answered by generation {served}",
            outcome.started
        );
    }
    println!(
        "{} connections, {} reloads, 0 failed; per generation: {:?}",
        report.total(),
        n,
        report.by_generation()
    );
    report
}

#[test]
fn test_server_reloads_under_load_lose_no_connection() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--drain-timeout", "10s"],
        // Workers hold the listeners (like nginx), and the old generation's
        // graceful stop closes accepted connections it has not read yet:
        // the behaviour that fails clients in a plain reuseport reload.
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            "2",
            "--close-idle-on-drain",
        ],
    );
    let report = reload_under_load(&mut instance, 20, 8);
    assert!(
        report.by_generation().len() >= 10,
        "most generations served traffic: {:?}",
        report.by_generation()
    );
    let status = instance.status();
    assert_eq!(status.reloads_succeeded, 20);
    assert_eq!(status.active_generation(), Some(21));
    assert!(instance.stop().success());
}

#[test]
fn nginx_reloads_under_load_lose_no_connection() {
    privileged();
    let nginx = reloader_tests::nginx::Nginx::new(ADDR, 40);
    let command = nginx.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance = Instance::start_in(
        nginx.dir,
        &[
            "--listen",
            ADDR,
            "--drain-signal",
            "QUIT",
            "--drain-timeout",
            "10s",
        ],
        &command,
    );
    let report = reload_under_load(&mut instance, 20, 8);
    let status = instance.status();
    assert_eq!(status.reloads_succeeded, 20);
    println!(
        "nginx: {} connections, 20 reloads, {} failed; last reload: {}",
        report.total(),
        report.failures().len(),
        status
            .last_reload
            .as_ref()
            .map_or_else(|| "none".into(), |r| r.human())
    );
    assert!(instance.stop().success());
}

/// A reload whose new generation cannot become ready fails with the reason;
/// the old generation keeps serving and no connection fails.
fn rollback(mode: &str, reason: &str) {
    privileged();
    // The timeout applies to the first generation too: 2 s was too short
    // for it under TCG on a busy 2-core host (a VM run failed there).
    let (mut instance, mode_file) =
        with_mode_file(&["--listen", ADDR, "--ready-timeout", "5s"], None);
    let load = Load::start(addr(), 4);
    std::fs::write(&mode_file, mode).unwrap();
    let reload = instance.reload_wait();
    // Failed (exit 1, `reload-failed`), not refused; then why.
    reload.failed();
    let text = reload.why();
    assert!(text.contains(reason), "reason {reason:?} not in {text}");
    assert_eq!(
        instance.active_generation(),
        Some(1),
        "generation 1 still active"
    );
    let failed = instance.generation(2);
    assert_eq!(failed.state, State::Failed);
    assert!(
        !process_alive(failed.pid.expect("the candidate's pid")),
        "candidate killed"
    );

    // The instance recovers once the server is fixed.
    std::fs::remove_file(&mode_file).unwrap();
    instance.reload_wait().done();
    let report = load.finish();
    report.assert_no_failures();
    assert!(report.by_generation().contains_key(&1));
    assert!(instance.stop().success());
}

#[test]
fn rollback_when_the_new_generation_exits_on_start() {
    rollback("--exit-on-start", "exiting on start as asked");
}

#[test]
fn rollback_when_the_new_generation_never_listens() {
    rollback(
        "--never-listen",
        "not ready within 5s (--ready-timeout): no listening socket for 127.0.0.1:8080",
    );
}

#[test]
fn rollback_when_the_new_generation_binds_without_reuseport() {
    rollback("--no-reuseport", "SO_REUSEPORT");
}

#[test]
fn a_first_generation_without_reuseport_is_refused_with_the_fix() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::spawn_in(
        dir,
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--no-reuseport"],
    );
    let status = instance.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = instance.log_text();
    assert!(log.contains("does not have SO_REUSEPORT set"), "{log}");
    assert!(log.contains("reuseport"), "names the fix: {log}");
}

#[test]
fn an_old_generation_that_ignores_the_drain_signal_is_killed_at_the_timeout() {
    privileged();
    let (mut instance, _) = with_mode_file(
        &["--listen", ADDR, "--drain-timeout", "1s"],
        Some("--ignore-drain"),
    );
    let load = Load::start(addr(), 4);
    let started = Instant::now();
    instance.reload_wait().done();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for the drain timeout"
    );
    let report = load.finish();
    report.assert_no_failures();
    let status = instance.status();
    assert_eq!(status.drain_kills, 1);
    let old = instance.generation(1);
    assert_eq!(old.outcome.as_deref(), Some("killed by SIGKILL"));
    assert!(instance.stop().success());
}

#[test]
fn overlapping_reloads_coalesce_into_one_follow_up() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        // Slow starts keep the first reload in progress while the others
        // arrive.
        &[testserver(), "--listen", ADDR, "--start-delay-ms", "500"],
    );
    let socket = instance.socket.clone();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 100 }));
                reload_wait(&socket, &["--timeout", "60s"])
            })
        })
        .collect();
    let mut generations = Vec::new();
    for r in requests {
        let reload: Reload = r.join().unwrap();
        generations.push(reload.done().generation);
    }
    generations.sort();
    assert_eq!(generations[0], 2, "the first request started generation 2");
    assert_eq!(
        *generations.last().unwrap(),
        3,
        "the five that arrived during it share one follow-up: {generations:?}"
    );
    assert_eq!(instance.status().reloads_succeeded, 2);
    instance.remember_pids();
    assert!(instance.stop().success());
}

#[test]
fn a_crashed_active_generation_is_restarted() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--crash-on-usr2"],
    );
    let pid = instance.generation(1).pid.expect("a pid") as i32;
    // The active generation crashes on its own.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    wait_for(
        "a restart: generation 2 active",
        Duration::from_secs(30),
        || instance.active_generation() == Some(2),
    );
    let status = instance.status();
    assert_eq!(status.restarts, 1);
    let crashed = &status.generations[1];
    assert_eq!(crashed.generation, 1);
    assert_eq!(crashed.outcome.as_deref(), Some("exited with status 70"));
    assert_eq!(
        load::request(addr()).unwrap(),
        2,
        "the new generation serves"
    );
    assert!(instance.stop().success());
}

/// An instance of the test server with `workers` workers (0: one process)
/// that fail on SIGUSR2, with select-or-migrate steering: the bridge is
/// made only there (closing it would reset what it holds without
/// migration), so on select-only kernels the VM runner lists the bridge
/// tests as not applicable instead of running them.
fn failing_test_server(workers: &str) -> Instance {
    let instance = Instance::start(
        &["--listen", ADDR],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            workers,
            "--fail-on-usr2",
        ],
    );
    let status = instance.status();
    assert_eq!(
        status.steering,
        reloader::steering::Mode::SelectOrMigrate,
        "the bridge needs select-or-migrate steering (Linux >= 5.14): {status:#?}"
    );
    instance
}

/// The active generation (one process) fails under load, three times in a
/// row (the third restart reuses a slot), with no previous generation to
/// take over: it stops accepting, answers what it accepted and exits
/// without closing its listener, so what was
/// queued in them must migrate, and new connections arrive while nothing
/// listens until the restart is ready. The bridge listener holds both
/// (`steering::bridge`): no connection fails, and the listener's status
/// counts what the bridge held.
#[test]
fn crashes_under_load_lose_no_connection_the_bridge_holds_them_until_the_restart() {
    privileged();
    let mut instance = failing_test_server("0");
    let status = instance.status();
    assert!(status.listeners[0].bridge, "{status:#?}");
    let load = Load::start(addr(), 4);
    const CRASHES: u64 = 3;
    for crash in 1..=CRASHES {
        std::thread::sleep(Duration::from_millis(300));
        let pid = instance.generation(crash).pid.expect("a pid") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .unwrap();
        wait_for(
            format!(
                "a restart after crash {crash}: generation {} active",
                crash + 1
            ),
            Duration::from_secs(30),
            || instance.active_generation() == Some(crash + 1),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    let status = instance.status();
    println!(
        "{CRASHES} crashes under load: {} connections, {} failed, bridge held {} \
         (answered per generation {:?})",
        report.total(),
        report.failures().len(),
        status.listeners[0].bridged,
        report.by_generation()
    );
    report.assert_no_failures();
    assert_eq!(status.restarts, CRASHES, "{status:#?}");
    assert!(
        status.listeners[0].bridged > 0,
        "connections arrived while no generation listened, so the bridge held some: {status:#?}"
    );
    assert!(instance.stop().success());
}

/// What the controller logs (at debug level) when the listen notifier
/// reports a socket listening on a managed address.
const LISTEN_EVENT: &str = "listen event: a socket started listening on a managed address";

/// A `listen()` on the managed address in another network namespace of the
/// controller's cgroup (the tests run many instances, each in a namespace
/// of its own, in one cgroup) is another reuseport group and must not wake
/// the instance. The notifier used to filter by address only, so every
/// such listen was a listen event and a look (issue 23). Kernels before
/// 5.15 do not give `sock_ops` programs the namespace: there the notifier
/// still reports them, and says so when it starts.
#[test]
fn a_listen_in_another_network_namespace_does_not_wake_the_instance() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let events = |instance: &Instance| instance.log_text().matches(LISTEN_EVENT).count();
    // Generation 1's own listen was reported: the notifier runs here.
    wait_for(
        "generation 1's listen to be reported",
        Duration::from_secs(5),
        || events(&instance) > 0,
    );
    std::thread::sleep(Duration::from_millis(200));
    let before = events(&instance);
    std::thread::spawn(|| {
        // This thread only: a network namespace of its own, same cgroup.
        privileged();
        for _ in 0..5 {
            drop(reloader_tests::reuseport_listener(addr()));
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .expect("the other namespace's listens");
    std::thread::sleep(Duration::from_millis(300));
    let after = events(&instance);
    let scoped = reloader_tests::kernel_at_least(5, 15);
    if scoped {
        assert_eq!(
            after,
            before,
            "listens in another network namespace woke the instance:\n{}",
            instance.log_text()
        );
    } else {
        assert!(
            instance
                .log_text()
                .contains("listen events come from every network namespace of the cgroup"),
            "before Linux 5.15 the notifier says it cannot tell namespaces apart"
        );
    }
    // Listens in its own namespace still wake it: the next generation's.
    let reload = instance.reload_wait();
    assert!(reload.ok(), "{reload}");
    wait_for(
        "generation 2's listen to be reported",
        Duration::from_secs(5),
        || events(&instance) > after,
    );
    println!(
        "listen events: {before} before 5 listens in another namespace, {after} after, {} after \
         a reload (namespace-scoped: {scoped})",
        events(&instance)
    );
    assert!(instance.stop().success());
}

/// A generation whose workers all stop listening for good while its
/// leader lives on. The bridge used to hold the connections that arrived
/// for 5 s, reset them, and from then on every connection was refused
/// until someone reloaded (387 refused in 10 s under light load), while
/// the `reload --wait` that made it active had returned 0. Now, once it has
/// not listened for as long as the bridge holds (5 s), a new generation is
/// started in its place under the crash policy, and what the bridge held
/// meanwhile is answered by it.
#[test]
fn a_generation_that_stops_listening_is_replaced() {
    privileged();
    let mut instance = failing_test_server("2");
    let leader = instance.generation(1).pid.expect("a pid");
    for worker in reloader_tests::process::children(leader) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker as i32),
            nix::sys::signal::Signal::SIGUSR2,
        );
    }
    // Until both workers' listeners are closed (the leader does not reap
    // them: they stay as zombies).
    wait_for(
        "the workers' listeners to close",
        Duration::from_secs(5),
        || {
            let sockets = instance.generation(1).sockets;
            if sockets.iter().all(|s| s.accept_queue.is_none()) {
                Ok(())
            } else {
                Err(format!("the workers still listen: {sockets:?}"))
            }
        },
    );
    // A client that arrives now waits on the bridge until the new
    // generation takes what it holds.
    let started = Instant::now();
    let answer = load::answer_within(addr(), Duration::from_secs(20));
    let waited = started.elapsed();
    assert_eq!(
        answer.map(|a| a.generation),
        Ok(Some(2)),
        "held on the bridge and answered by the replacement"
    );
    assert!(
        waited >= Duration::from_secs(3),
        "it waited on the bridge while generation 1 was given its 5 s: {waited:?}"
    );
    let status = instance.status();
    assert_eq!(status.active_generation(), Some(2));
    assert_eq!((status.restarts, status.restarts_stopped_listening), (1, 1));
    assert!(
        status.listeners[0].bridged > 0,
        "the bridge held it: {status:#?}"
    );
    assert!(
        instance
            .log_text()
            .contains("it has not listened on a managed address for"),
        "the replacement is logged"
    );
    wait_for(
        "generation 1 to be drained",
        Duration::from_secs(15),
        || !process_alive(leader),
    );
    assert_eq!(load::request(addr()).unwrap(), 2);
    assert!(instance.stop().success());
}

#[test]
fn stop_leaves_no_process_behind() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--workers", "3"],
    );
    instance.reload_wait().done();
    let controller = instance.pid();
    let tree = reloader_tests::process::descendants(controller);
    assert!(tree.len() >= 4, "leader and three workers: {tree:?}");
    let status = instance.stop();
    assert!(status.success(), "clean stop exits 0: {status}");
    for pid in tree {
        assert!(!process_alive(pid), "pid {pid} outlived the stop");
    }
}

#[test]
fn status_json_matches_reality() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--ready-probe", "http://127.0.0.1:8080/"],
        &[testserver(), "--listen", ADDR, "--workers", "2"],
    );
    for _ in 0..30 {
        assert_eq!(load::request(addr()).unwrap(), 1);
    }
    let status = instance.status();
    assert_eq!(status.steering, reloader_tests::expected_steering_mode());
    let g1 = &status.generations[0];
    assert_eq!(g1.generation, 1);
    assert_eq!(g1.state, State::Active);
    let pid = g1.pid.expect("a pid");
    assert!(process_alive(pid));
    assert_eq!(
        g1.counters.steered, 30,
        "every connection went through the program"
    );
    assert_eq!(g1.counters.probe_routed, 1, "the readiness probe");
    assert_eq!(g1.sockets.len(), 2, "one listener per worker");
    for s in &g1.sockets {
        assert_eq!(s.addr, ADDR);
        assert_eq!(s.accept_queue, Some(0));
        assert!(s.inode > 0);
    }

    let reload = instance.reload_wait();
    let report = reload.done();
    for (phase, ms) in [
        ("spawn_to_ready_ms", report.spawn_to_ready_ms),
        ("ready_to_cutover_ms", report.ready_to_cutover_ms),
        ("cutover_to_old_exited_ms", report.cutover_to_old_exited_ms),
        ("total_ms", report.total_ms),
    ] {
        assert!(ms.is_some_and(|ms| ms >= 0.0), "{phase} in {report:?}");
    }
    for _ in 0..10 {
        assert_eq!(load::request(addr()).unwrap(), 2);
    }
    let status = instance.status();
    let gens = &status.generations;
    assert_eq!(gens[0].generation, 2);
    assert_eq!(gens[0].counters.steered, 10);
    assert_eq!(gens[1].state, State::Exited);
    assert_eq!(gens[1].counters.steered, 30, "frozen when it exited");
    assert!(!process_alive(pid));
    assert_eq!(status.last_reload.as_ref().map(|r| r.generation), Some(2));
    assert_eq!(
        status.map_entries,
        EntryCounts {
            listeners: 1,
            sockets: 2,
            probes: 0
        },
        "the exited generation's sockets are gone from the maps; the probe route was removed"
    );
    assert!(instance.stop().success());
}

#[test]
fn reload_without_wait_returns_once_accepted() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let out = instance.client(&["reload"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reload requested"
    );
    wait_for(
        "the accepted reload: generation 2 active",
        Duration::from_secs(15),
        || instance.active_generation() == Some(2),
    );
    assert!(instance.stop().success());
}

/// Generations are not tied to the controller's life: killed with SIGKILL,
/// it leaves the servers serving and the steering program attached. The
/// generation's leader here is a shell (it keeps the SIGPIPE disposition it
/// was started with, as a C server does; Rust's runtime would not) that
/// writes to its stderr, a pipe nobody reads once the controller is gone:
/// that write must fail, not kill the server.
#[test]
fn generations_keep_serving_when_the_controller_is_killed() {
    privileged();
    let script = format!(
        "{} --listen {ADDR} & while :; do echo tick >&2; sleep 0.05; done",
        testserver()
    );
    let mut instance = Instance::start(&["--listen", ADDR], &["sh", "-c", &script]);
    instance.reload_wait().done();
    let leader = instance.status().generations[0].pid.expect("a pid");
    let load = Load::start(addr(), 4);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    report.assert_no_failures();
    assert_eq!(
        *report.by_generation().keys().max().unwrap(),
        2,
        "generation 2 kept serving: {:?}",
        report.by_generation()
    );
    assert_eq!(
        load::request(addr()).expect("served after the controller died"),
        2
    );
    assert!(
        process_alive(leader),
        "the generation's leader died writing to its stderr after the controller was killed"
    );
}

/// `--max-draining N`: a reload that would make N+1 generations drain at
/// once waits until one has exited; below the limit reloads proceed while
/// old generations still drain.
/// Generation 1 ignores its drain signal and is killed only at this
/// timeout: long, so that "did not wait for it" holds on a slow machine.
const DRAIN_TIMEOUT: &str = "20s";

fn reload_while_draining(max_draining: &str) -> (Duration, Reload) {
    privileged();
    let (mut instance, _) = with_mode_file(
        &[
            "--listen",
            ADDR,
            "--drain-timeout",
            DRAIN_TIMEOUT,
            "--max-draining",
            max_draining,
        ],
        Some("--ignore-drain"),
    );
    // Generation 1 ignores its drain signal: it drains until killed at the
    // drain timeout.
    assert!(instance.client(&["reload"]).status.success());
    wait_for(
        "generation 2 to become active",
        Duration::from_secs(10),
        || instance.active_generation() == Some(2),
    );
    let started = Instant::now();
    let reload = reload_wait(&instance.socket, &["--timeout", "60s"]);
    let took = started.elapsed();
    assert_eq!(reload.done().generation, 3);
    instance.stop();
    (took, reload)
}

#[test]
fn a_reload_beyond_max_draining_waits_for_a_draining_generation_to_exit() {
    let (took, _) = reload_while_draining("1");
    // Generation 3 could only start once generation 1 was killed at its
    // drain timeout.
    assert!(took >= Duration::from_secs(15), "reload took {took:?}");
}

#[test]
fn reloads_below_max_draining_do_not_wait_for_old_generations() {
    let (took, answer) = reload_while_draining("2");
    // Generation 3 started at once; its own predecessor (2) drains fast.
    assert!(
        took < Duration::from_secs(15),
        "reload took {took:?}: it waited for generation 1 ({answer})"
    );
}

/// Garbage on the control socket gets an error reply and changes nothing.
#[test]
fn malformed_control_requests_get_an_error_and_change_nothing() {
    use std::io::{Read, Write};
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let ask = |bytes: &[u8], close_write: bool| -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(&instance.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(bytes);
        if close_write {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let cases: &[(&[u8], bool, &str)] = &[
        (b"{\"request\":\"explode\"}\n", false, "malformed"),
        (b"not json at all\n", false, "malformed"),
        (b"{\"request\":\"reload\"}\n", false, "malformed"),
        (b"{\"request\":\"status\",\"evil\":1}\n", false, "malformed"),
        (b"{\"request\":\"stop\"", true, "truncated"),
        (&[b'x'; 10_000], false, "larger than"),
    ];
    for (bytes, close, expect) in cases {
        let answer = ask(bytes, *close);
        assert!(answer.contains("\"error\""), "{answer}");
        assert!(answer.contains(expect), "{expect:?} not in {answer}");
    }
    let status = instance.status();
    assert_eq!(status.active_generation(), Some(1), "nothing changed");
    assert_eq!(status.reloads_succeeded, 0);
    assert_eq!(load::request(addr()).unwrap(), 1);
    assert!(instance.stop().success(), "and a stop request still works");
}

#[test]
fn malformed_canary_requests_get_an_error_and_the_controller_keeps_answering() {
    use std::io::{Read, Write};
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    // Before the protocol edge checked plans, `steps: []` panicked the
    // controller while it held the state's lock: every later request got
    // no answer, and the half-started generation was orphaned.
    for (canary, says) in [
        (r#"{"steps":[]}"#, "canary.steps is empty"),
        (r#"{"steps":[0]}"#, "canary.steps[0] is 0"),
        (r#"{"steps":[4000000000]}"#, "canary.steps[0] is 4000000000"),
        (r#"{"steps":[50,10],"dwell_ms":1000}"#, "steps must grow"),
        (
            r#"{"steps":[1000],"dwell_ms":18446744073709551615}"#,
            "canary.dwell_ms is 18446744073709551615",
        ),
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(&instance.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        writeln!(
            stream,
            r#"{{"request":"reload","wait":true,"canary":{canary}}}"#
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let response: Response = decode("the answer to a malformed canary", answer.as_bytes());
        match response {
            Response::Error { message } => assert!(message.contains(says), "{canary}: {message}"),
            other => panic!("{canary} was not refused: {other:?}"),
        }
    }
    let status = instance.status();
    assert_eq!(status.active_generation(), Some(1), "nothing started");
    assert_eq!(status.generations.len(), 1, "no generation was begun");
    let reload = instance.reload_wait();
    assert_eq!(reload.done().generation, 2, "{reload}");
    assert!(instance.stop().success());
}

#[test]
fn overlapping_reload_waits_name_the_generations_that_were_really_active() {
    // Two `reload --wait` 30 ms apart: the second starts generation N+1
    // while N-1 still settles, and N+1's cutover drains N, which could then
    // exit before N-1 did. The first reload's barrier (N-1 exited) then
    // found N ended and reported it as failed ("generation N exited with
    // status 0 after the cutover; generation N-1 is still active") in 2 of
    // about 55 tries, while N+1 served and N-1 had exited.
    // To make that order the usual one, not a 1-in-30 race, the second
    // reload's generation ignores the drain signal (it is killed at the
    // drain timeout when the next round replaces it), so the generation
    // the first reload replaces exits last.
    privileged();
    let (mut instance, mode_file) =
        with_mode_file(&["--listen", ADDR, "--drain-timeout", "600ms"], None);
    let socket = instance.socket.clone();
    for round in 0..50 {
        std::fs::write(&mode_file, "").unwrap();
        let first = {
            let socket = socket.clone();
            std::thread::spawn(move || reload_wait(&socket, &[]))
        };
        std::thread::sleep(Duration::from_millis(30));
        std::fs::write(&mode_file, "--ignore-drain").unwrap();
        let second = reload_wait(&socket, &[]);
        let first = first.join().unwrap();
        for reload in [&first, &second] {
            assert!(
                reload.ok(),
                "round {round}: a reload was reported failed: {reload}"
            );
        }
        // Which of the two clients reached the controller first is up to
        // the scheduler: the later generation of the two serves.
        let (a, b) = (first.done().generation, second.done().generation);
        assert_eq!(
            instance.active_generation(),
            Some(a.max(b)),
            "round {round}: the later reload's generation serves ({a}, {b})"
        );
    }
    assert_eq!(instance.status().reloads_failed, 0);
    // The last one ignores the drain signal: replace it, then stop.
    std::fs::write(&mode_file, "").unwrap();
    assert!(instance.reload_wait().ok());
    assert!(instance.stop().success());
}

/// Measurements, not checks: connections that fail per reload under load
/// with whichever steering program this kernel loads (select-only before
/// Linux 5.14, where connections still queued in a closing listener are
/// reset), for three `--settle` values (the default is 250ms). Each prints
/// one `@@MEASURE` line and asserts nothing about failures. Opt in, e.g. on
/// 5.10: `cargo xtask integration-test --vm --kernel bullseye --only
/// launcher --test-args "--ignored --nocapture measure_failed_connections"`
/// (`--force-select-only` is not used: the kernel decides).
fn measure_failed_connections_per_reload(settle: &str) {
    privileged();
    let reloads = 20;
    let mut instance = Instance::start(
        &[
            "--listen",
            ADDR,
            "--drain-timeout",
            "10s",
            "--settle",
            settle,
        ],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            "2",
            "--close-idle-on-drain",
        ],
    );
    measure_reloads_under_load(&mut instance, reloads, &format!("settle={settle}"));
}

/// Reloads `reloads` times under a load of 8 connection loops and prints
/// one `@@MEASURE` line: the steering program, `label`, connections,
/// failures (per reload and by kind). Asserts only that every reload
/// succeeded and the instance stops.
fn measure_reloads_under_load(instance: &mut Instance, reloads: usize, label: &str) {
    let steering = instance.status().steering;
    let load = Load::start(addr(), 8);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    for i in 0..reloads {
        let reload = instance.reload_wait();
        assert!(
            reload.ok(),
            "reload {i} failed: {reload}\n{}",
            instance.log_text()
        );
    }
    let reloading = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for failure in report.failures() {
        let error = failure.result.as_ref().unwrap_err();
        // "read (12 bytes so far): …": the kind without the byte count.
        let kind = match (error.find(" ("), error.find("): ")) {
            (Some(a), Some(b)) if a < b => format!("{}{}", &error[..a], &error[b + 1..]),
            _ => error.clone(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let failed = report.failures().len();
    println!(
        "@@MEASURE steering={steering} {label} reloads={reloads} connections={} \
         failed={failed} failed_per_reload={:.2} reload_seconds={:.1} kinds={kinds:?}",
        report.total(),
        failed as f64 / reloads as f64,
        reloading.as_secs_f64(),
    );
    assert!(instance.stop().success());
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_failed_connections_settle_0s() {
    measure_failed_connections_per_reload("0s");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_failed_connections_settle_250ms() {
    measure_failed_connections_per_reload("250ms");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_failed_connections_settle_1s() {
    measure_failed_connections_per_reload("1s");
}

/// As [`measure_failed_connections_per_reload`], for Debian's nginx (2
/// workers, `reuseport`) with a drain signal and a settle: QUIT is nginx's
/// graceful shutdown (it closes its listeners at once and finishes the
/// requests it holds), TERM its fast one (it closes everything). On a
/// select-only kernel the connections queued in the old workers' listeners
/// when they close are reset. Opt in, e.g. on 5.10: `cargo xtask
/// integration-test --vm --kernel bullseye --only launcher --test-args
/// "--ignored --nocapture measure_nginx"`.
fn measure_nginx_failed_connections_per_reload(drain_signal: &str, settle: &str) {
    privileged();
    let reloads = 20;
    let nginx = reloader_tests::nginx::Nginx::new(ADDR, reloads as u64 + 1);
    let command = nginx.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance = Instance::start_in(
        nginx.dir,
        &[
            "--listen",
            ADDR,
            "--drain-signal",
            drain_signal,
            "--drain-timeout",
            "10s",
            "--settle",
            settle,
        ],
        &command,
    );
    measure_reloads_under_load(
        &mut instance,
        reloads,
        &format!("server=nginx drain_signal={drain_signal} settle={settle}"),
    );
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_quit_settle_0s() {
    measure_nginx_failed_connections_per_reload("QUIT", "0s");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_quit_settle_250ms() {
    measure_nginx_failed_connections_per_reload("QUIT", "250ms");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_quit_settle_1s() {
    measure_nginx_failed_connections_per_reload("QUIT", "1s");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_quit_settle_3s() {
    measure_nginx_failed_connections_per_reload("QUIT", "3s");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_term_settle_250ms() {
    measure_nginx_failed_connections_per_reload("TERM", "250ms");
}

#[test]
#[ignore = "measurement: prints failed connections per reload, run with --ignored"]
fn measure_nginx_term_settle_3s() {
    measure_nginx_failed_connections_per_reload("TERM", "3s");
}

// ---- UDP.

const UDP_ADDR: &str = "127.0.0.1:5353";

/// UDP where every datagram goes to the newest generation (DNS-like):
/// reloads under a continuous request load lose no datagram, the readiness
/// probe is a DNS query routed to the candidate's own socket, and after each
/// reload requests are answered by the new generation.
/// A UDP server that reads slowly (starved of CPU) and closes its socket
/// at once on the drain signal, as unbound and Knot do: the datagrams
/// still queued in the old generation at the cutover are read before it
/// is told to drain (the kernel would drop them with the socket), even
/// with `--settle 0s`.
#[test]
fn udp_datagrams_queued_in_the_old_generation_are_answered_before_the_drain_signal() {
    privileged();
    let listen = format!("udp://{UDP_ADDR}?mode=stateless");
    let probe = format!("dns://{UDP_ADDR}/probe.test");
    let mut instance = Instance::start(
        &[
            "--listen",
            &listen,
            "--ready-probe",
            &probe,
            "--settle",
            "0s",
        ],
        &[
            testserver(),
            "--udp",
            UDP_ADDR,
            "--udp-reply-delay-ms",
            "20",
            "--udp-close-on-drain",
        ],
    );
    let load =
        reloader_tests::udp_load::UdpLoad::start(UDP_ADDR.parse().unwrap(), 8, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload {i}: {reload}\n{}", instance.log_text());
    }
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    let lost: Vec<_> = outcomes.iter().filter(|o| o.generation.is_none()).collect();
    assert!(
        lost.is_empty(),
        "{} of {} requests lost (queued in an old generation's socket when it closed); first: \
         {:?}",
        lost.len(),
        outcomes.len(),
        &lost[..lost.len().min(5)]
    );
    println!(
        "{} UDP requests to a slow server across 5 reloads, none lost",
        outcomes.len()
    );
    assert!(instance.stop().success());
}

#[test]
fn udp_stateless_reloads_lose_no_datagram() {
    privileged();
    let listen = format!("udp://{UDP_ADDR}?mode=stateless");
    let probe = format!("dns://{UDP_ADDR}/probe.test");
    let mut instance = Instance::start(
        &["--listen", &listen, "--ready-probe", &probe],
        &[testserver(), "--udp", UDP_ADDR, "--workers", "2"],
    );
    let load =
        reloader_tests::udp_load::UdpLoad::start(UDP_ADDR.parse().unwrap(), 8, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(200));
    let mut completed = Vec::new();
    for i in 0..10 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload {i}: {reload}\n{}", instance.log_text());
        completed.push((load.start.elapsed(), reload.done().generation));
    }
    std::thread::sleep(Duration::from_millis(200));
    let outcomes = load.finish();
    let lost: Vec<_> = outcomes.iter().filter(|o| o.generation.is_none()).collect();
    assert!(
        lost.is_empty(),
        "{} of {} requests lost; first: {:?}",
        lost.len(),
        outcomes.len(),
        &lost[..lost.len().min(5)]
    );
    for o in &outcomes {
        let newest = completed
            .iter()
            .filter(|(t, _)| *t < o.sent)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(1);
        assert!(
            o.generation.unwrap() >= newest,
            "a request sent at {:?}, after generation {newest} was active alone, was answered by {:?}",
            o.sent,
            o.generation
        );
    }
    let status = instance.status();
    let probed: u64 = status
        .generations
        .iter()
        .map(|g| g.counters.probe_routed)
        .sum();
    assert!(
        probed >= 1,
        "the DNS probe went through the program: {status:?}"
    );
    println!(
        "{} UDP requests across 10 reloads, none lost",
        outcomes.len()
    );
    assert!(instance.stop().success());
}

/// UDP with flow affinity (QUIC-like): a flow keeps being served by the
/// generation that served its first datagram after a newer one became
/// active, for as long as that generation holds its socket; a new flow goes
/// to the new generation at once; once the old generation has exited, the
/// old flow is served by the new one.
#[test]
fn udp_flows_stay_with_their_generation_until_it_exits() {
    privileged();
    let listen = format!("udp://{UDP_ADDR}?mode=flows");
    let mut instance = Instance::start(
        &["--listen", &listen, "--settle", "1s"],
        &[testserver(), "--udp", UDP_ADDR],
    );
    let addr: SocketAddr = UDP_ADDR.parse().unwrap();
    let old_flow = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    old_flow
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        reloader_tests::udp_load::request(&old_flow, addr, 1),
        Some(1)
    );
    assert!(instance.client(&["reload"]).status.success());
    wait_for(
        "generation 2 to become active",
        Duration::from_secs(10),
        || instance.active_generation() == Some(2),
    );
    // Within the settle time the old generation still holds its socket.
    assert_eq!(
        reloader_tests::udp_load::request(&old_flow, addr, 2),
        Some(1),
        "the old flow stays with generation 1"
    );
    let new_flow = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    new_flow
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        reloader_tests::udp_load::request(&new_flow, addr, 1),
        Some(2),
        "a new flow goes to the active generation"
    );
    // Once generation 1 has exited its flow falls through to generation 2.
    wait_for("generation 1 to exit", Duration::from_secs(20), || {
        instance.generation(1).state == State::Exited
    });
    assert_eq!(
        reloader_tests::udp_load::request(&old_flow, addr, 3),
        Some(2)
    );
    let status = instance.status();
    let g2 = instance.generation(2);
    assert!(g2.counters.affinity >= 1 || g2.udp_flows >= 1, "{status:?}");
    assert!(
        status.listeners[0]
            .flow_table
            .expect("a flow table for a UDP listener with flow affinity")
            .capacity
            > 0,
        "{status:?}"
    );
    assert!(instance.stop().success());
}

/// A server that daemonizes — nginx without `daemon off;`: the process
/// reloader starts forks the master into the background and exits 0 — was
/// refused ("exited with status 0 before it was ready: it probably
/// daemonized"). With a cgroup per generation its daemon is still in the
/// generation: readiness, the drain signal (to the cgroup's root process,
/// the master) and the exit follow the cgroup. Without cgroups it is still
/// refused, as before.
#[test]
fn nginx_that_daemonizes_is_followed_through_its_cgroup() {
    privileged();
    let nginx = reloader_tests::nginx::Nginx::daemonizing(ADDR, 10);
    let command = nginx.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance = Instance::start_in(
        nginx.dir,
        &[
            "--listen",
            ADDR,
            "--drain-signal",
            "QUIT",
            "--drain-timeout",
            "10s",
        ],
        &command,
    );
    let first = instance.generation(1);
    let cgroup = first.cgroup.clone().unwrap_or_else(|| {
        panic!(
            "a cgroup per generation: {first:?}\n{}",
            instance.log_text()
        )
    });
    assert_eq!(
        first.pid, None,
        "the process started exited (nginx daemonized): status shows no leader"
    );
    let report = reload_under_load(&mut instance, 5, 4);
    report.assert_no_failures();
    assert!(
        !std::path::Path::new(&cgroup).exists(),
        "generation 1 exited: its cgroup was emptied and removed"
    );
    let last = instance.generation(6).cgroup.expect("a cgroup");
    assert!(instance.stop().success());
    assert!(!std::path::Path::new(&last).exists());
    assert!(
        std::net::TcpStream::connect(addr()).is_err(),
        "nothing left listening"
    );
}
