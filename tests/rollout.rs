//! Rollback and canary end to end (`--keep-previous`, `reloader rollback`,
//! `reload --canary`, `reloader promote`, `--health-probe`): the real
//! binary and kernel, the test server and Debian's nginx, under a
//! continuous load of new connections that must all be answered. Each
//! scenario runs several cycles, so steering slots are reused.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use reloader::{
    generation::State,
    state::saved::{self, Saved},
    status::{ReloadResult, RollbackReport, RolloutKind, StatusReport},
    steering::Mode,
};
use reloader_tests::{
    instance::{Instance, Reload, StatusExt, decode, process_alive, reload_wait},
    load::{self, Load},
    nginx::Nginx,
    privileged,
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";
/// Cycles of each scenario (the third reuses a slot).
const CYCLES: u64 = 4;

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// The test server with two workers (like nginx) that fail on SIGUSR2.
fn testserver_command() -> Vec<String> {
    [
        testserver(),
        "--listen",
        ADDR,
        "--workers",
        "2",
        "--fail-on-usr2",
    ]
    .map(String::from)
    .to_vec()
}

fn start(extra: &[&str], server: &[String]) -> Instance {
    let mut args = vec![
        "--listen",
        ADDR,
        "--settle",
        "100ms",
        "--drain-timeout",
        "10s",
    ];
    args.extend_from_slice(extra);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    Instance::start(&args, &server)
}

/// Runs a client subcommand; (exit code, stdout and stderr).
fn client(instance: &Instance, args: &[&str]) -> (i32, String) {
    let out = instance.client(args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits (30 s at most) until `condition` holds for the instance's status
/// and returns that status. A restarted controller may not answer yet.
fn wait_status(
    instance: &Instance,
    what: &str,
    condition: impl Fn(&StatusReport) -> bool,
) -> StatusReport {
    instance.wait_status(what, Duration::from_secs(30), condition)
}

/// What the crash test relies on: queued connections of a closing
/// listener are migrated (Linux >= 5.14). Asserted, so that run on an older
/// kernel the test fails instead of passing vacuously.
fn assert_select_or_migrate(status: &StatusReport) {
    assert_eq!(
        status.steering,
        Mode::SelectOrMigrate,
        "this test needs the select-or-migrate program"
    );
}

/// The generation's state, or `None` once it is no longer listed.
fn state_of(status: &StatusReport, generation: u64) -> Option<State> {
    status.find_generation(generation).map(|g| g.state)
}

fn pid_of(status: &StatusReport, generation: u64) -> u32 {
    status.generation(generation).pid.expect("a pid")
}

/// The rollback under way: (kind, the generation it makes active).
fn rollout_of(status: &StatusReport) -> Option<(RolloutKind, u64)> {
    status.rollout.as_ref().map(|r| (r.kind, r.previous))
}

/// `n` new connections, `concurrency` at a time: answers per generation,
/// and the failures.
fn connections(n: usize, concurrency: usize) -> (BTreeMap<u64, usize>, Vec<String>) {
    let per_thread = n / concurrency;
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|_| load::request(addr()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut by_generation = BTreeMap::new();
    let mut failures = Vec::new();
    for thread in threads {
        for result in thread.join().unwrap() {
            match result {
                Ok(g) => *by_generation.entry(g).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    (by_generation, failures)
}

/// Reload, then roll back within the hold, `CYCLES` times under load: the
/// first connection after `rollback` returned is served by the previous
/// generation, the one rolled back from drains and exits, nothing fails.
fn rollback_cycles(extra: &[&str], server: &[String]) {
    let mut args = vec!["--keep-previous", "60s"];
    args.extend_from_slice(extra);
    let mut instance = start(&args, server);
    let load = Load::start(addr(), 4);
    let mut active = instance.active_generation().expect("active");
    for cycle in 0..CYCLES {
        let reload = instance.reload_wait_with(&["--timeout", "60s"]);
        assert!(reload.ok(), "reload {cycle}: {reload}");
        let report = reload.done();
        let new = report.generation;
        assert!(
            report.held_ms.is_some_and(|held| held > 50_000.0),
            "reload --wait returns at the cutover while the previous one is held: {report:?}"
        );
        let status = instance.status();
        assert_eq!(
            rollout_of(&status),
            Some((RolloutKind::Hold, active)),
            "{status:#?}"
        );
        assert_eq!(state_of(&status, active), Some(State::Draining));
        // People read `held` in its row (issue 29: they read `draining`).
        let human = instance.client(&["status"]);
        let human = String::from_utf8_lossy(&human.stdout);
        assert!(
            human.lines().any(|l| {
                let mut cells = l.split_whitespace();
                cells.next() == Some(&active.to_string()) && cells.nth(1) == Some("held")
            }),
            "generation {active} is not shown held:\n{human}"
        );
        let held_pid = pid_of(&status, active);
        assert!(process_alive(held_pid), "the held generation still runs");

        // Half the cycles wait for the rolled-back generation to exit.
        let wait = cycle % 2 == 1;
        let mut args = vec!["rollback", "--json"];
        if wait {
            args.push("--wait");
        }
        let out = instance.client(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "rollback {cycle}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            instance.log_text()
        );
        let first = load::request(addr());
        let rolled: RollbackReport = decode("`rollback --json`", &out.stdout);
        assert_eq!(rolled.from, new, "{rolled:?}");
        assert_eq!(rolled.to, active, "{rolled:?}");
        assert_eq!(
            first,
            Ok(active),
            "the first connection after `rollback` returned goes to the previous generation"
        );
        if wait {
            assert!(rolled.from_exited_ms.is_some(), "{rolled:?}");
            let status = instance.status();
            assert_eq!(
                state_of(&status, new),
                Some(State::Exited),
                "--wait: it has exited"
            );
        }
        let status = wait_status(&instance, "the rolled-back generation exits", |s| {
            state_of(s, new) == Some(State::Exited)
        });
        assert_eq!(status.active_generation(), Some(active));
        assert!(status.rollout.is_none(), "nothing left to roll back");
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    report.assert_no_failures();
    let status = instance.status();
    assert_eq!(status.rollbacks.manual, CYCLES, "{status:#?}");
    // Nothing is held now: a rollback says so.
    let (code, text) = client(&instance, &["rollback"]);
    assert_ne!(code, 0);
    assert!(text.contains("nothing to roll back"), "{text}");
    println!(
        "{CYCLES} reloads rolled back, {} connections, 0 failed: {:?}",
        report.total(),
        report.by_generation()
    );
    active = instance.active_generation().unwrap();
    assert_eq!(active, 1, "every rollback went back to generation 1");
    assert!(instance.stop().success());
}

#[test]
fn rollback_within_the_hold_restores_the_previous_test_server() {
    privileged();
    rollback_cycles(&[], &testserver_command());
}

#[test]
fn rollback_within_the_hold_restores_the_previous_nginx() {
    privileged();
    let nginx = Nginx::new(ADDR, 1 + CYCLES);
    // nginx's graceful stop is QUIT.
    rollback_cycles(&["--drain-signal", "QUIT"], &nginx.command());
}

/// The new generation exits on its own during the hold, `CYCLES` times
/// under load: the held one is made active again at once, the reload
/// counts as failed, the crashed configuration is not restarted, nothing
/// fails.
#[test]
fn a_crash_during_the_hold_reinstates_the_previous_generation() {
    privileged();
    let mut instance = start(&["--keep-previous", "60s"], &testserver_command());
    assert_select_or_migrate(&instance.status());
    let load = Load::start(addr(), 4);
    for cycle in 0..CYCLES {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload {cycle}: {reload}");
        let new = reload.done().generation;
        let status = instance.status();
        let held = status.rollout.as_ref().expect("a hold").previous;
        // The new generation fails between requests: its listeners close
        // with whatever is queued in them.
        let pid = pid_of(&status, new);
        let workers = reloader_tests::process::children(pid);
        for p in workers.iter().chain(std::iter::once(&pid)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p as i32),
                nix::sys::signal::Signal::SIGUSR2,
            );
        }
        let status = wait_status(&instance, "the held generation is active again", |s| {
            s.active_generation() == Some(held) && state_of(s, new) == Some(State::Exited)
        });
        assert_eq!(
            status.last_reload.as_ref().map(|r| r.result),
            Some(ReloadResult::Failed),
            "{status:#?}"
        );
        assert!(status.rollout.is_none());
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    report.assert_no_failures();
    let status = instance.status();
    assert_eq!(status.rollbacks.crash, CYCLES, "{status:#?}");
    assert_eq!(
        status.active_generation(),
        Some(1),
        "no restart replaced the reinstated generation"
    );
    println!(
        "{CYCLES} crashes during the hold, {} connections, 0 failed: {:?}",
        report.total(),
        report.by_generation()
    );
    assert!(instance.stop().success());
}

/// `--canary 20%`: 20 % ± 3 % of 5,000 new connections go to the canary;
/// `promote` moves all of them; a second canary rolled back gets none.
/// `reload --canary --wait` returns 0 when promoted and 3 when rolled back.
fn canary_split(extra: &[&str], server: &[String]) {
    let mut instance = start(extra, server);
    for cycle in 0..CYCLES / 2 {
        let active = instance.active_generation().unwrap();
        let socket = instance.socket.clone();
        let waiter = std::thread::spawn(move || {
            reload_wait(&socket, &["--canary", "20%", "--timeout", "120s"])
        });
        let status = wait_status(&instance, "the canary runs", |s| {
            s.rollout.as_ref().map(|r| r.kind) == Some(RolloutKind::Canary)
        });
        let rollout = status.rollout.expect("the canary");
        let canary = rollout.generation;
        assert_eq!(rollout.weight_percent, 20.0);
        let (split, failures) = connections(5000, 8);
        assert!(failures.is_empty(), "{failures:?}");
        let to_canary = *split.get(&canary).unwrap_or(&0) as f64;
        let total = split.values().sum::<usize>() as f64;
        let share = to_canary / total * 100.0;
        println!(
            "cycle {cycle}: canary {canary} got {share:.1}% of {total} connections: {split:?}"
        );
        assert!(
            (17.0..=23.0).contains(&share),
            "the canary got {share:.1}% of new connections, not 20% ± 3%: {split:?}"
        );
        assert_eq!(
            split.keys().copied().collect::<Vec<_>>(),
            vec![active.min(canary), active.max(canary)],
            "only the active generation and the canary answer"
        );
        // A reload meanwhile is refused, saying why.
        let (code, text) = client(&instance, &["reload", "--wait"]);
        assert_ne!(code, 0);
        assert!(text.contains("canary"), "{text}");

        let load = Load::start(addr(), 4);
        let promote = cycle % 2 == 0;
        let (code, text) = if promote {
            client(&instance, &["promote"])
        } else {
            client(&instance, &["rollback"])
        };
        assert_eq!(code, 0, "{text}");
        let (after, failures) = connections(500, 4);
        assert!(failures.is_empty(), "{failures:?}");
        let expected = if promote { canary } else { active };
        assert_eq!(
            after.keys().copied().collect::<Vec<_>>(),
            vec![expected],
            "after {}: every new connection to generation {expected}",
            if promote { "promote" } else { "rollback" }
        );
        let reload: Reload = waiter.join().unwrap();
        assert_eq!(
            reload.code,
            if promote { 0 } else { 3 },
            "reload --canary --wait: {reload}"
        );
        if promote {
            reload.done();
        } else {
            reload.rolled_back();
        }
        let gone = if promote { active } else { canary };
        wait_status(&instance, "the generation left behind exits", |s| {
            state_of(s, gone) == Some(State::Exited)
        });
        std::thread::sleep(Duration::from_millis(200));
        let report = load.finish();
        report.assert_no_failures();
    }
    assert!(instance.stop().success());
}

#[test]
fn a_canary_gets_its_share_then_promote_or_rollback_moves_everything_test_server() {
    privileged();
    canary_split(&[], &testserver_command());
}

#[test]
fn a_canary_gets_its_share_then_promote_or_rollback_moves_everything_nginx() {
    privileged();
    let nginx = Nginx::new(ADDR, 1 + CYCLES);
    canary_split(&["--drain-signal", "QUIT"], &nginx.command());
}

/// A canary that fails its health checks is rolled back on its own, and
/// one that passes them through timed steps is promoted.
#[test]
fn health_checks_roll_back_a_failing_canary_and_promote_a_healthy_one() {
    privileged();
    let (mut instance, mode_file) = Instance::with_mode_file(
        testserver(),
        ADDR,
        &[
            "--listen",
            ADDR,
            "--settle",
            "100ms",
            "--health-probe",
            &format!("http://{ADDR}/health"),
            "--health-interval",
            "200ms",
            "--health-failures",
            "2",
        ],
        None,
    );
    let load = Load::start(addr(), 4);
    // The next generation answers too slowly for the health probe (2 s
    // timeout), though in time for the load's clients.
    std::fs::write(&mode_file, "--reply-delay-ms 3000").unwrap();
    let reload = instance.reload_wait_with(&["--canary", "10%", "--timeout", "60s"]);
    assert_eq!(
        reload.code,
        3,
        "rolled back by health: {reload}\n{}",
        instance.log_text()
    );
    let report = reload.rolled_back();
    assert!(
        report
            .error
            .as_deref()
            .expect("the reason")
            .contains("health"),
        "{report:?}"
    );
    let status = instance.status();
    assert_eq!(status.rollbacks.health, 1, "{status:#?}");

    std::fs::remove_file(&mode_file).unwrap();
    let reload = instance.reload_wait_with(&[
        "--canary",
        "5%,50%",
        "--canary-for",
        "500ms",
        "--timeout",
        "60s",
    ]);
    assert_eq!(reload.code, 0, "a healthy canary is promoted: {reload}");
    let generation = reload.done().generation;
    assert_eq!(instance.active_generation(), Some(generation));
    std::thread::sleep(Duration::from_millis(200));
    // The slow canary answered late but answered: nothing failed.
    let report = load.finish();
    report.assert_no_failures();
    assert!(instance.stop().success());
}

/// Waits until the state file records generation `number` as `state`.
fn wait_recorded(instance: &Instance, number: u64, state: State) {
    // Written atomically (renamed into place): a file that is there is
    // whole.
    let path = saved::state_path(&instance.socket);
    wait_for(
        format!("the state file to record generation {number} as {state}"),
        Duration::from_secs(10),
        || {
            let Ok(bytes) = std::fs::read(&path) else {
                return Err("no state file".to_owned());
            };
            let saved: Saved = decode("the state file", &bytes);
            if saved
                .generations
                .iter()
                .any(|g| g.number == number && g.state == state)
            {
                Ok(())
            } else {
                Err(format!("{saved:#?}"))
            }
        },
    );
}

fn kill_controller(instance: &mut Instance) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(5));
}

/// The controller is SIGKILLed during a hold and during a canary, under
/// load: the restarted one keeps the hold (rollback still works) and the
/// canary's split (promote works and the generation beside it drains).
#[test]
fn a_restarted_controller_keeps_the_hold_and_the_canary() {
    privileged();
    let mut instance = start(&["--keep-previous", "60s"], &testserver_command());
    let load = Load::start(addr(), 4);
    instance.reload_wait().done();
    kill_controller(&mut instance);
    instance.respawn();
    let status = wait_status(&instance, "the restarted controller keeps the hold", |s| {
        s.rollout.as_ref().map(|r| r.kind) == Some(RolloutKind::Hold)
    });
    let rollout = status.rollout.as_ref().expect("the hold");
    assert_eq!(rollout.previous, 1, "{status:#?}");
    assert!(
        rollout.remaining_ms.expect("the hold's time left") > 30_000,
        "the hold's deadline was kept: {status:#?}"
    );
    let (code, text) = client(&instance, &["rollback", "--wait"]);
    assert_eq!(code, 0, "{text}\n{}", instance.log_text());
    assert_eq!(load::request(addr()), Ok(1));

    let (code, text) = client(&instance, &["reload", "--canary", "30%"]);
    assert_eq!(code, 0, "{text}");
    let status = wait_status(&instance, "the canary runs", |s| {
        s.rollout.as_ref().map(|r| r.kind) == Some(RolloutKind::Canary)
    });
    let canary = status.rollout.expect("the canary").generation;
    // Killed once the canary is on disk too: the state file is written
    // just after the change, and a controller killed in between leaves its
    // successor one step behind (CI saw the kill land 30 ms after the
    // canary started, before the write: the successor found generation
    // `canary` still "starting").
    wait_recorded(&instance, canary, State::Canary);
    kill_controller(&mut instance);
    instance.respawn();
    let status = wait_status(
        &instance,
        "the restarted controller keeps the canary",
        |s| s.rollout.as_ref().map(|r| r.kind) == Some(RolloutKind::Canary),
    );
    let rollout = status.rollout.as_ref().expect("the canary");
    assert_eq!(rollout.generation, canary);
    assert_eq!(rollout.weight_percent, 30.0, "{status:#?}");
    let (split, failures) = connections(1000, 4);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        (200..=400).contains(split.get(&canary).unwrap_or(&0)),
        "the split holds across the restart: {split:?}"
    );
    let (code, text) = client(&instance, &["promote"]);
    assert_eq!(code, 0, "{text}");
    // The generation beside the canary is now held (--keep-previous); a
    // rollback brings it back, then the canary drains.
    let status = instance.status();
    assert_eq!(
        status.rollout.as_ref().map(|r| r.kind),
        Some(RolloutKind::Hold),
        "{status:#?}"
    );
    assert_eq!(instance.active_generation(), Some(canary));
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    report.assert_no_failures();
    println!(
        "controller killed during a hold and a canary: {} connections, 0 failed: {:?}",
        report.total(),
        report.by_generation()
    );
    assert!(instance.stop().success());
}

/// `promote --wait` returns once the generation beside the canary has
/// exited, as `rollback --wait` does: here that generation ignores its
/// drain signal, so the answer comes at the drain timeout (2 s), after
/// its process group was killed. Without the wait, `promote` returned at
/// once while it still ran.
#[test]
fn promote_wait_returns_once_the_generation_beside_the_canary_exited() {
    privileged();
    let mut server = testserver_command();
    server.push("--ignore-drain".into());
    let args = ["--listen", ADDR, "--settle", "0s", "--drain-timeout", "2s"];
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let instance = Instance::start(&args, &server);
    let (code, text) = client(&instance, &["reload", "--canary", "50%"]);
    assert_eq!(code, 0, "{text}");
    let status = wait_status(&instance, "the canary runs", |s| {
        s.rollout.as_ref().map(|r| r.kind) == Some(RolloutKind::Canary)
    });
    let canary = status.rollout.as_ref().expect("the canary").generation;
    let previous_pid = pid_of(&status, 1);

    let t0 = std::time::Instant::now();
    let out = instance.client(&["promote", "--wait", "--json", "--timeout", "30s"]);
    let waited = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: reloader::control::Response = decode("`promote --wait --json`", &out.stdout);
    let reloader::control::Response::Promoted {
        generation,
        previous,
        previous_exited_ms,
        held_ms,
    } = answer
    else {
        panic!("promote answered {answer:?}");
    };
    assert_eq!((generation, previous, held_ms), (canary, 1, None));
    assert!(
        !process_alive(previous_pid),
        "generation 1 (pid {previous_pid}) still runs after `promote --wait` returned"
    );
    let exited = previous_exited_ms.expect("how long generation 1 took to exit");
    assert!(
        exited >= 1900.0 && waited >= Duration::from_millis(1900),
        "generation 1 ignores its drain signal: it exits at the 2s drain timeout, not after \
         {exited}ms (the command took {waited:?})"
    );
    assert_eq!(
        state_of(&instance.status(), 1),
        Some(State::Exited),
        "{}",
        instance.log_text()
    );
    assert_eq!(instance.active_generation(), Some(canary));
}
