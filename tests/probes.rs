//! The probes a kubelet asks (`reloader run --health ADDR`, and on the
//! `--metrics` address): `/healthz` while the controller answers,
//! `/readyz` while the active generation listens on every managed address.
//! Real binary, real kernel, own network namespace.

use std::time::Duration;

use reloader_tests::{
    http::{Answer, get},
    instance::Instance,
    privileged,
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";
const HEALTH: &str = "127.0.0.1:9478";
const METRICS: &str = "127.0.0.1:9477";

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// Waits until `GET path` from `addr` answers `code` and returns that
/// answer.
#[track_caller]
fn wait_answer(addr: &str, path: &str, code: u16, within: Duration) -> Answer {
    wait_for(
        format!("{path} on {addr} to answer {code}"),
        within,
        || match get(addr, path) {
            Ok(answer) if answer.code == code => Ok(answer),
            Ok(answer) => Err(format!("{answer:?}")),
            Err(e) => Err(e),
        },
    )
}

/// `/readyz` is 503 while the first generation starts (it listens only
/// after 2 s here) and again once the stop began (the generation ignores
/// its drain signal, so the stop takes the 3 s drain timeout), 200 in
/// between; `/healthz` is 200 all along, also during the stop. Both are
/// served on `--health` and on `--metrics`; `--health` serves no metrics.
#[test]
fn readyz_follows_the_first_start_and_the_stop_and_healthz_the_controller() {
    privileged();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut instance = Instance::spawn_in(
        dir,
        &[
            "--listen",
            ADDR,
            "--health",
            HEALTH,
            "--metrics",
            METRICS,
            "--settle",
            "0s",
            "--drain-timeout",
            "3s",
        ],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--start-delay-ms",
            "2000",
            "--ignore-drain",
        ],
    );
    let first = wait_for("the probes to answer", Duration::from_secs(10), || {
        get(HEALTH, "/readyz")
    });
    assert_eq!(
        first.code, 503,
        "not ready while the first generation starts: {first:?}"
    );
    assert!(first.body.contains("no generation is active"), "{first:?}");
    assert_eq!(get(HEALTH, "/healthz").map(|a| a.code), Ok(200));

    let ready = wait_answer(HEALTH, "/readyz", 200, Duration::from_secs(30));
    assert!(ready.body.contains("generation 1 is active"), "{ready:?}");
    for addr in [HEALTH, METRICS] {
        for path in ["/readyz", "/healthz"] {
            assert_eq!(get(addr, path).map(|a| a.code), Ok(200), "{path} on {addr}");
        }
    }
    assert_eq!(
        get(HEALTH, "/metrics").map(|a| a.code),
        Ok(404),
        "--health serves the probes only"
    );
    let metrics = get(METRICS, "/metrics").expect("a scrape");
    assert_eq!(metrics.code, 200);
    assert!(
        metrics.body.contains("reloader_active_generation 1"),
        "{metrics:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the controller");
    let stopping = wait_answer(HEALTH, "/readyz", 503, Duration::from_secs(5));
    assert!(stopping.body.contains("stopping"), "{stopping:?}");
    assert_eq!(
        get(HEALTH, "/healthz").map(|a| a.code),
        Ok(200),
        "the controller answers while it stops"
    );
    assert_eq!(get(METRICS, "/readyz").map(|a| a.code), Ok(503));
    instance.wait_exit(Duration::from_secs(20));
}

/// When every worker of the active generation closes its listener while
/// its leader lives on, `/readyz` turns 503 naming the address, and 200
/// again once the replacement (started after the bridge's 5 s) listens.
#[test]
fn readyz_is_503_while_the_active_generation_does_not_listen() {
    privileged();
    let instance = Instance::start(
        &["--listen", ADDR, "--health", HEALTH],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            "2",
            "--fail-on-usr2",
        ],
    );
    let ready = wait_answer(HEALTH, "/readyz", 200, Duration::from_secs(10));
    assert!(ready.body.contains("generation 1 is active"), "{ready:?}");
    let leader = instance
        .status()
        .generations
        .iter()
        .find(|g| g.generation == 1)
        .and_then(|g| g.pid)
        .expect("generation 1's pid");
    for worker in reloader_tests::process::children(leader) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker as i32),
            nix::sys::signal::Signal::SIGUSR2,
        );
    }
    let lost = wait_answer(HEALTH, "/readyz", 503, Duration::from_secs(5));
    assert!(
        lost.body
            .contains("the active generation 1 does not listen on 127.0.0.1:8080"),
        "{lost:?}"
    );
    assert_eq!(get(HEALTH, "/healthz").map(|a| a.code), Ok(200));
    let replaced = wait_answer(HEALTH, "/readyz", 200, Duration::from_secs(20));
    assert!(
        replaced.body.contains("generation 2 is active"),
        "{replaced:?}\n{}",
        instance.log_text()
    );
}
