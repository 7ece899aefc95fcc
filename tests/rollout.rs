//! Rollback and canary end to end (`--keep-previous`, `reloader rollback`,
//! `reload --canary`, `reloader promote`, `--health-probe`): the real
//! binary and kernel, the test server and Debian's nginx, under a
//! continuous load of new connections that must all be answered. Each
//! scenario runs several cycles, so steering slots are reused.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use reloader_tests::{
    instance::{Instance, process_alive},
    load::{self, Load},
    nginx::Nginx,
    privileged,
};
use serde_json::Value;

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

/// Runs a client subcommand; (exit code, stdout JSON or text).
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

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until `f(status)` holds.
fn wait_for(instance: &Instance, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A restarted controller may not answer yet.
        let out = instance.client(&["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() && f(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30s; status {status:#}\n{}",
            instance.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the crash test relies on: queued connections of a closing
/// listener are migrated (Linux >= 5.14). Asserted, so that run on an older
/// kernel the test fails instead of passing vacuously.
fn assert_select_or_migrate(status: &Value) {
    assert_eq!(
        status["steering"], "select-or-migrate",
        "this test needs the select-or-migrate program"
    );
}

fn state_of(status: &Value, generation: u64) -> String {
    status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["generation"] == generation)
        .map(|g| g["state"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| "forgotten".into())
}

fn pid_of(status: &Value, generation: u64) -> u32 {
    status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["generation"] == generation)
        .and_then(|g| g["pid"].as_u64())
        .expect("a pid") as u32
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
        let (code, text) = client(
            &instance,
            &["reload", "--wait", "--json", "--timeout", "60s"],
        );
        assert_eq!(code, 0, "reload {cycle}: {text}");
        let report = &json(&text)["report"];
        let new = report["generation"].as_u64().unwrap();
        assert!(
            report["held_ms"].as_f64().unwrap() > 50_000.0,
            "reload --wait returns at the cutover while the previous one is held: {report}"
        );
        let status = instance.status();
        assert_eq!(status["rollout"]["kind"], "hold", "{status:#}");
        assert_eq!(status["rollout"]["previous"], active);
        assert_eq!(state_of(&status, active), "draining");
        let held_pid = pid_of(&status, active);
        assert!(process_alive(held_pid), "the held generation still runs");

        // Half the cycles wait for the rolled-back generation to exit.
        let wait = cycle % 2 == 1;
        let mut args = vec!["rollback", "--json"];
        if wait {
            args.push("--wait");
        }
        let (code, text) = client(&instance, &args);
        assert_eq!(code, 0, "rollback {cycle}: {text}\n{}", instance.log_text());
        let first = load::request(addr());
        let rolled = json(&text);
        assert_eq!(rolled["from"], new, "{rolled}");
        assert_eq!(rolled["to"], active, "{rolled}");
        assert_eq!(
            first,
            Ok(active),
            "the first connection after `rollback` returned goes to the previous generation"
        );
        if wait {
            assert!(rolled["from_exited_ms"].as_f64().is_some(), "{rolled}");
            let status = instance.status();
            assert_eq!(state_of(&status, new), "exited", "--wait: it has exited");
        }
        let status = wait_for(&instance, "the rolled-back generation exits", |s| {
            state_of(s, new) == "exited"
        });
        assert_eq!(status["listeners"][0]["active_generation"], active);
        assert!(status["rollout"].is_null(), "nothing left to roll back");
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    report.assert_no_failures();
    let status = instance.status();
    assert_eq!(status["rollbacks"]["manual"], CYCLES, "{status:#}");
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
        let (ok, answer) = instance.reload_wait();
        assert!(ok, "reload {cycle}: {answer}");
        let new = answer["report"]["generation"].as_u64().unwrap();
        let status = instance.status();
        let held = status["rollout"]["previous"].as_u64().expect("a hold");
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
        let status = wait_for(&instance, "the held generation is active again", |s| {
            s["listeners"][0]["active_generation"] == held && state_of(s, new) == "exited"
        });
        assert_eq!(status["last_reload"]["result"], "failed", "{status:#}");
        assert!(status["rollout"].is_null());
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    report.assert_no_failures();
    let status = instance.status();
    assert_eq!(status["rollbacks"]["crash"], CYCLES, "{status:#}");
    assert_eq!(
        status["listeners"][0]["active_generation"], 1,
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
        let waiter = Command::new(reloader_tests::instance::reloader_bin())
            .args([
                "reload",
                "--canary",
                "20%",
                "--wait",
                "--json",
                "--timeout",
                "120s",
            ])
            .arg("--control-socket")
            .arg(&instance.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_for(&instance, "the canary runs", |s| {
            s["rollout"]["kind"] == "canary"
        });
        let canary = status["rollout"]["generation"].as_u64().unwrap();
        assert_eq!(status["rollout"]["weight_percent"], 20.0);
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
        let out = waiter.wait_with_output().unwrap();
        let code = out.status.code();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            code,
            Some(if promote { 0 } else { 3 }),
            "reload --canary --wait: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result = if promote { "succeeded" } else { "rolled-back" };
        assert_eq!(json(&text)["report"]["result"], result, "{text}");
        let gone = if promote { active } else { canary };
        wait_for(&instance, "the generation left behind exits", |s| {
            state_of(s, gone) == "exited"
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
    let (code, text) = client(
        &instance,
        &[
            "reload",
            "--canary",
            "10%",
            "--wait",
            "--json",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(
        code,
        3,
        "rolled back by health: {text}\n{}",
        instance.log_text()
    );
    let report = &json(&text)["report"];
    assert!(
        report["error"].as_str().unwrap().contains("health"),
        "{report}"
    );
    let status = instance.status();
    assert_eq!(status["rollbacks"]["health"], 1, "{status:#}");

    std::fs::remove_file(&mode_file).unwrap();
    let (code, text) = client(
        &instance,
        &[
            "reload",
            "--canary",
            "5%,50%",
            "--canary-for",
            "500ms",
            "--wait",
            "--json",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(code, 0, "a healthy canary is promoted: {text}");
    let generation = json(&text)["report"]["generation"].as_u64().unwrap();
    assert_eq!(instance.active_generation(), Some(generation));
    std::thread::sleep(Duration::from_millis(200));
    // The slow canary answered late but answered: nothing failed.
    let report = load.finish();
    report.assert_no_failures();
    assert!(instance.stop().success());
}

/// Waits until the state file records generation `number` as `state`.
fn wait_recorded(instance: &Instance, number: u64, state: &str) {
    let path = instance.socket.with_extension("state.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let saved: Value = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Value::Null);
        let recorded = saved["generations"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["number"] == number && g["state"] == state)
        });
        if recorded {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the state file never recorded generation {number} as {state}: {saved:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let (ok, answer) = instance.reload_wait();
    assert!(ok, "{answer}");
    kill_controller(&mut instance);
    instance.respawn();
    let status = wait_for(&instance, "the restarted controller keeps the hold", |s| {
        s["rollout"]["kind"] == "hold"
    });
    assert_eq!(status["rollout"]["previous"], 1, "{status:#}");
    assert!(
        status["rollout"]["remaining_ms"].as_u64().unwrap() > 30_000,
        "the hold's deadline was kept: {status:#}"
    );
    let (code, text) = client(&instance, &["rollback", "--wait"]);
    assert_eq!(code, 0, "{text}\n{}", instance.log_text());
    assert_eq!(load::request(addr()), Ok(1));

    let (code, text) = client(&instance, &["reload", "--canary", "30%"]);
    assert_eq!(code, 0, "{text}");
    let status = wait_for(&instance, "the canary runs", |s| {
        s["rollout"]["kind"] == "canary"
    });
    let canary = status["rollout"]["generation"].as_u64().unwrap();
    // Killed once the canary is on disk too: the state file is written
    // just after the change, and a controller killed in between leaves its
    // successor one step behind (CI saw the kill land 30 ms after the
    // canary started, before the write: the successor found generation
    // `canary` still "starting").
    wait_recorded(&instance, canary, "canary");
    kill_controller(&mut instance);
    instance.respawn();
    let status = wait_for(
        &instance,
        "the restarted controller keeps the canary",
        |s| s["rollout"]["kind"] == "canary",
    );
    assert_eq!(status["rollout"]["generation"], canary);
    assert_eq!(status["rollout"]["weight_percent"], 30.0, "{status:#}");
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
    assert_eq!(status["rollout"]["kind"], "hold", "{status:#}");
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
