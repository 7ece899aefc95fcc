//! When an old generation gets its drain signal (`--settle auto|idle|
//! DURATION`, `--settle-max`). Real binary, real kernel, own network
//! namespace; the signal is read from the controller's log line
//! (`draining generation=N`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use reloader_tests::{instance::Instance, load::Load, privileged, wait::wait_for};

const ADDR: &str = "127.0.0.1:8080";

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// Whether generation `number` was sent its drain signal.
fn signalled(instance: &Instance, number: u64) -> bool {
    let generation = format!("generation={number} ");
    instance
        .log_text()
        .lines()
        .any(|l| l.contains("reloader::state::ending: draining") && l.contains(&generation))
}

#[track_caller]
fn wait_signalled(instance: &Instance, number: u64, within: Duration) {
    wait_for(
        format_args!("generation {number}'s drain signal"),
        within,
        || {
            if signalled(instance, number) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    );
}

/// Stays `for_` without generation `number` being signalled.
#[track_caller]
fn assert_not_signalled_for(instance: &Instance, number: u64, for_: Duration, why: &str) {
    let until = Instant::now() + for_;
    while Instant::now() < until {
        assert!(
            !signalled(instance, number),
            "generation {number} was signalled while {why}:\n{}",
            instance.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// One request on `stream`, its answer read to the end (the test server
/// closes after answering): the generation that answered.
fn ask(mut stream: TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// `auto` under load: every reload ends (its old generation signalled and
/// exited) long before the 60 s bound, with no failed connection. Then a
/// client that connected and sent nothing holds the old generation
/// unsignalled until it speaks; once answered, the signal follows.
#[test]
fn auto_settle_signals_the_old_generation_once_it_has_answered_what_it_accepted() {
    privileged();
    let instance = Instance::start(
        &[
            "--listen",
            ADDR,
            "--settle",
            "auto",
            "--settle-max",
            "60s",
            "--drain-timeout",
            "60s",
        ],
        &[testserver(), "--listen", ADDR, "--workers", "2"],
    );
    let load = Load::start(addr(), 8);
    for reload in 0..6 {
        let started = Instant::now();
        let out = instance.client(&["reload", "--wait"]);
        assert!(
            out.status.success(),
            "reload {reload}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Functional, not a timing target: 60 s is the bound, so a reload
        // that took half of it waited for the bound, not for the answers.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reload {reload} took {:?}: the settle waited for --settle-max",
            started.elapsed()
        );
    }
    let report = load.finish();
    assert!(report.total() > 100, "the load ran: {}", report.total());
    report.assert_no_failures();

    // A silent client of generation 7 (the active one).
    let silent = TcpStream::connect(addr()).unwrap();
    thread::sleep(Duration::from_millis(200)); // accepted by a worker
    instance.reload_to(8);
    assert_not_signalled_for(
        &instance,
        7,
        Duration::from_millis(1500),
        "its client had sent nothing",
    );
    let answer = ask(silent);
    assert!(
        answer.contains("gen=7"),
        "the old generation answered: {answer}"
    );
    wait_signalled(&instance, 7, Duration::from_secs(20));
}

/// `idle`: no drain signal while the old generation holds a connection,
/// one soon after the last closes; and `--settle-max` bounds the wait.
#[test]
fn idle_settle_waits_for_the_last_connection() {
    privileged();
    let instance = Instance::start(
        &[
            "--listen",
            ADDR,
            "--settle",
            "idle",
            "--settle-max",
            "60s",
            "--drain-timeout",
            "60s",
        ],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            "2",
            "--hold-connections",
        ],
    );
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr()).unwrap())
        .collect();
    instance.wait_status(
        "generation 1 holds 3 connections",
        Duration::from_secs(20),
        |s| {
            s.generations
                .iter()
                .any(|g| g.generation == 1 && g.connections == Some(3))
        },
    );
    instance.reload_to(2);
    assert_not_signalled_for(
        &instance,
        1,
        Duration::from_secs(1),
        "it held 3 connections",
    );
    held.truncate(1);
    assert_not_signalled_for(&instance, 1, Duration::from_secs(1), "it held 1 connection");
    drop(held);
    wait_signalled(&instance, 1, Duration::from_secs(20));
    instance.wait_status("generation 1 exited", Duration::from_secs(20), |s| {
        s.generations
            .iter()
            .any(|g| g.generation == 1 && !g.state.is_live())
    });
    drop(instance);

    // The bound: a connection that never closes, --settle-max 1s.
    let instance = Instance::start(
        &[
            "--listen",
            ADDR,
            "--settle",
            "idle",
            "--settle-max",
            "1s",
            "--drain-timeout",
            "60s",
        ],
        &[testserver(), "--listen", ADDR, "--hold-connections"],
    );
    let kept = TcpStream::connect(addr()).unwrap();
    instance.wait_status(
        "generation 1 holds the connection",
        Duration::from_secs(20),
        |s| {
            s.generations
                .iter()
                .any(|g| g.generation == 1 && g.connections == Some(1))
        },
    );
    instance.reload_to(2);
    wait_signalled(&instance, 1, Duration::from_secs(20));
    assert!(
        instance
            .log_text()
            .contains("--settle-max (1s) reached with 1 open connections"),
        "the log says why: {}",
        instance.log_text()
    );
    drop(kept);
}

/// `--settle 1s` is a fixed wait, as before `auto`: a silent client does
/// not hold the old generation beyond it, and the signal never comes
/// before it.
#[test]
fn a_fixed_settle_still_works() {
    privileged();
    let instance = Instance::start(
        &["--listen", ADDR, "--settle", "1s", "--drain-timeout", "60s"],
        &[testserver(), "--listen", ADDR, "--hold-connections"],
    );
    let silent = TcpStream::connect(addr()).unwrap();
    thread::sleep(Duration::from_millis(200));
    let cutover = Instant::now();
    instance.reload_to(2);
    wait_signalled(&instance, 1, Duration::from_secs(20));
    assert!(
        cutover.elapsed() >= Duration::from_secs(1),
        "signalled before the fixed settle ended ({:?})",
        cutover.elapsed()
    );
    drop(silent);
}
