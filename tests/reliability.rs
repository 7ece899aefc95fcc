//! Faults and hostile input: each test reproduces one and asserts what the
//! user sees and that nothing is lost or left half-started.

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::Command,
    time::Duration,
};

use reloader_tests::{
    instance::{Instance, reloader_bin},
    load::{self, Load},
    privileged,
};

const ADDR: &str = "127.0.0.1:8080";

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

/// Starts a controller that is expected to refuse; returns its log.
fn refused(dir: tempfile::TempDir, args: &[&str]) -> String {
    let mut instance = Instance::spawn_in(dir, args, &[testserver(), "--listen", ADDR]);
    let status = instance.wait_exit(Duration::from_secs(20));
    let log = instance.log_text();
    assert!(!status.success(), "must refuse: {log}");
    assert!(
        !log.contains("starting generation"),
        "nothing may start: {log}"
    );
    log
}

#[test]
fn a_second_controller_for_the_same_instance_is_refused_naming_the_running_pid() {
    privileged();
    let first = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    // Same control socket (hence same instance lock), another address.
    let dir = tempfile::tempdir().unwrap();
    let mut second = Command::new(reloader_bin());
    second
        .args(["run", "--control-socket"])
        .arg(&first.socket)
        .args([
            "--listen",
            "127.0.0.1:9090",
            "--",
            testserver(),
            "--listen",
            "127.0.0.1:9090",
        ]);
    let out = second.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("already running (controller pid {})", first.pid())),
        "{stderr}"
    );
    drop(dir);
    assert_eq!(load::request(addr()).unwrap(), 1, "the first keeps serving");
    assert!(first.stop().success());
}

#[test]
fn another_instance_on_the_same_address_is_refused_naming_the_holder() {
    privileged();
    let first = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let log = refused(
        tempfile::tempdir().unwrap(),
        &["--name", "other", "--listen", ADDR],
    );
    assert!(
        log.contains("127.0.0.1:8080 is already served by pid"),
        "{log}"
    );
    assert!(log.contains("(testserver)"), "names the holder: {log}");
    assert_eq!(load::request(addr()).unwrap(), 1);
    assert!(first.stop().success());
}

#[test]
fn a_port_held_by_a_plain_socket_is_refused_naming_the_holder() {
    privileged();
    let _plain = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
    let log = refused(tempfile::tempdir().unwrap(), &["--listen", ADDR]);
    assert!(
        log.contains(&format!("already served by pid {}", std::process::id())),
        "{log}"
    );
}

#[test]
fn a_peer_with_another_uid_is_refused() {
    privileged();
    let instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    // Let uid 65534 reach the socket at all (it is 0600 in a 0700 dir), so
    // the controller's own SO_PEERCRED check is what refuses it.
    std::fs::set_permissions(instance.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&instance.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for request in [&["reload", "--wait"][..], &["stop"][..], &["status"][..]] {
        let out = Command::new(reloader_bin())
            .args(request)
            .arg("--control-socket")
            .arg(&instance.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{request:?}");
        assert!(
            stderr.contains("permission denied: uid 65534 may not control this instance"),
            "{request:?}: {stderr}"
        );
    }
    let status = instance.status();
    assert_eq!(
        status["listeners"][0]["active_generation"], 1,
        "nothing changed"
    );
    assert_eq!(status["reloads_succeeded"], 0);
    assert!(instance.stop().success());
}

#[test]
fn run_without_privileges_says_what_is_needed_and_starts_nothing() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(reloader_bin())
        .args(["run", "--control-socket"])
        .arg(dir.path().join("c.sock"))
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("run reloader as root"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(!stderr.contains("starting generation"), "{stderr}");
}

/// The select-only program (kernels before 5.14, forced here) still gives
/// zero-drop reloads for a server that finishes what it accepted: steering
/// alone keeps new connections off the old generation. It warns that
/// queued connections are not migrated.
#[test]
fn forced_select_only_steering_reloads_without_failures() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--force-select-only"],
        &[testserver(), "--listen", ADDR],
    );
    let running = Load::start(addr(), 4);
    for _ in 0..5 {
        let (ok, answer) = instance.reload_wait();
        assert!(ok, "{answer}");
    }
    let report = running.finish();
    report.assert_no_failures();
    assert_eq!(instance.status()["steering"], "select-only");
    assert!(instance.log_text().contains("select-only steering forced"));
    assert!(instance.stop().success());
}
