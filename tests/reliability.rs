//! Faults and hostile input: each test reproduces one and asserts what the
//! user sees and that nothing is lost or left half-started.

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::Command,
    time::{Duration, Instant},
};

use reloader::{generation::State, steering::Mode};
use reloader_tests::{
    instance::{Instance, StatusExt, process_alive, reloader_bin, reloader_bin_for_any_user},
    load::{self, Load},
    privileged,
    wait::wait_for,
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
    let mut first = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
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
    let mut first = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let log = refused(
        tempfile::tempdir().unwrap(),
        &["--name", "other", "--listen", ADDR],
    );
    // The address is claimed by the first instance from its start on
    // (`survival.rs` has why); the refusal names it and its controller.
    assert!(
        log.contains(&format!(
            "127.0.0.1:8080 is already claimed by instance \"default\" (controller pid {})",
            first.pid()
        )),
        "names the holder: {log}"
    );
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
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    // Let uid 65534 reach the socket at all (it is 0600 in a 0700 dir), so
    // the controller's own SO_PEERCRED check is what refuses it.
    std::fs::set_permissions(instance.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&instance.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (bin_dir, bin) = reloader_bin_for_any_user();
    for request in [&["reload", "--wait"][..], &["stop"][..], &["status"][..]] {
        let out = Command::new(&bin)
            .args(request)
            .arg("--control-socket")
            .arg(&instance.socket)
            .current_dir(bin_dir.path())
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
    assert_eq!(status.active_generation(), Some(1), "nothing changed");
    assert_eq!(status.reloads_succeeded, 0);
    assert!(instance.stop().success());
}

#[test]
fn run_without_privileges_says_what_is_needed_and_starts_nothing() {
    privileged();
    // A runtime directory of its own, as a user without privileges has.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let (bin_dir, bin) = reloader_bin_for_any_user();
    let out = Command::new(&bin)
        .args(["run", "--control-socket"])
        .arg(dir.path().join("c.sock"))
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .current_dir(bin_dir.path())
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
        instance.reload_wait().done();
    }
    let report = running.finish();
    report.assert_no_failures();
    assert_eq!(instance.status().steering, Mode::SelectOnly);
    assert!(instance.log_text().contains("select-only steering forced"));
    assert!(instance.stop().success());
}

fn kill_controller(instance: &mut Instance) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(5));
}

/// SIGKILL the controller under load, start it again with the same
/// instance: it adopts the running generation (same pid, no new one
/// started), reloads work as before, and no connection fails across the
/// kill, the restart and the reload.
#[test]
fn a_restarted_controller_adopts_running_generations_without_downtime() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--workers",
            "2",
            "--close-idle-on-drain",
        ],
    );
    instance.reload_wait().done();
    let before = instance.status();
    let pid = before.generations[0].pid.expect("a pid");
    let load = Load::start(addr(), 4);
    std::thread::sleep(Duration::from_millis(200));

    kill_controller(&mut instance);
    std::thread::sleep(Duration::from_millis(300));
    instance.respawn();
    instance.wait_active(Duration::from_secs(20));
    let after = instance.status();
    assert_eq!(after.active_generation(), Some(2), "{after:?}");
    assert_eq!(
        after.generations[0].pid,
        Some(pid),
        "the same process, adopted"
    );
    assert_eq!(after.generations[0].state, State::Active);
    assert!(
        after
            .recovered
            .as_deref()
            .is_some_and(|r| r.starts_with("adopted generations 2 (active")),
        "{after:?}"
    );
    let steered_before = before.generations[0].counters.steered;
    let steered_after = after.generations[0].counters.steered;
    assert!(
        steered_after > steered_before,
        "the pinned counters kept counting"
    );

    for _ in 0..3 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "{reload}\n{}", instance.log_text());
    }
    let report = load.finish();
    report.assert_no_failures();
    assert_eq!(*report.by_generation().keys().max().unwrap(), 5);
    assert!(instance.stop().success());
    assert!(
        !instance.socket.with_extension("state.json").exists(),
        "a clean stop leaves no state file behind"
    );
    let pins = reloader::state::saved::pin_dir("default", &instance.socket);
    assert!(!pins.exists(), "nor pinned maps: {}", pins.display());
}

/// The previous controller died and so did its generations: the state it
/// left is cleaned up and reported, and the instance starts fresh, with
/// generation numbers continuing.
#[test]
fn stale_state_is_cleaned_up_and_reported() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    instance.reload_wait().done();
    let server = instance.status().generations[0].pid.expect("a pid");
    kill_controller(&mut instance);
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(server as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the server to die", Duration::from_secs(5), || {
        !process_alive(server)
    });
    instance.respawn();
    instance.wait_active(Duration::from_secs(20));
    let status = instance.status();
    assert!(
        status.recovered.as_deref().is_some_and(|r| {
            r.contains("none of its generations serves any more (generations 2)")
        }),
        "{status:?}"
    );
    assert_eq!(status.active_generation(), Some(3), "numbering continues");
    assert_eq!(load::request(addr()).unwrap(), 3);
    assert!(instance.stop().success());
}

/// A reload was starting a candidate when the controller died: the
/// successor kills that candidate and keeps the active generation.
#[test]
fn a_candidate_starting_when_the_controller_died_is_killed_on_adoption() {
    privileged();
    let (mut instance, mode) = Instance::with_mode_file(
        testserver(),
        ADDR,
        &["--listen", ADDR, "--ready-timeout", "30s"],
        None,
    );
    std::fs::write(&mode, "--never-listen").unwrap();
    assert!(instance.client(&["reload"]).status.success());
    // Wait until the candidate (generation 2) runs the server (its start
    // gate opens only once the state file names it) and has written its
    // last stderr line (written after the controller is gone, it would
    // fail with EPIPE, and the test server's `eprintln!` panics on that).
    wait_for(
        "the candidate's last stderr line in the log",
        Duration::from_secs(10),
        || {
            instance
                .log_text()
                .contains("[default gen 2] testserver: not listening")
        },
    );
    let candidate = instance.generation(2).pid.expect("candidate pid");
    kill_controller(&mut instance);
    std::fs::remove_file(&mode).unwrap();
    instance.respawn();
    instance.wait_active(Duration::from_secs(20));
    wait_for("the candidate to be killed", Duration::from_secs(5), || {
        !process_alive(candidate)
    });
    let status = instance.status();
    assert_eq!(status.active_generation(), Some(1));
    let failed = instance.generation(2);
    assert_eq!(failed.state, State::Failed);
    assert_eq!(instance.reload_wait().done().generation, 3);
    assert!(instance.stop().success());
}

/// Many idle control connections (connected, sending nothing) do not keep
/// a reload request from being served.
#[test]
fn idle_control_connections_do_not_block_reloads() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let idle: Vec<_> = (0..200)
        .map(|_| std::os::unix::net::UnixStream::connect(&instance.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The controller's own read timeout for a request is 5s: a reload that
    // had to wait for idle clients to time out would miss this deadline.
    let out = instance.client(&["reload", "--wait", "--timeout", "3s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(idle);
    assert_eq!(instance.active_generation(), Some(2));
    assert!(instance.stop().success());
}

/// bpffs not mounted at /sys/fs/bpf (a private mount namespace without
/// it): reloader mounts it itself, and works.
/// A wrapper that runs the controller in a private mount namespace after
/// `script` (which ends with `exec "$@"`) changed what it sees.
fn in_private_mount_namespace(script: &str) -> [&str; 8] {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
}

#[test]
fn bpffs_not_mounted_is_mounted() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::spawn_wrapped(
        dir,
        &in_private_mount_namespace(r#"umount /sys/fs/bpf && exec "$@""#),
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
        &[],
    );
    instance.wait_active(Duration::from_secs(20));
    assert_eq!(load::request(addr()).unwrap(), 1);
    let log = instance.log_text();
    assert!(log.contains("mounted bpffs at /sys/fs/bpf"), "{log}");
    assert!(log.contains("reused_pinned_maps=false"), "{log}");
    assert!(instance.stop().success());
}

/// bpffs cannot be mounted (here: /sys/fs is an empty read-only tmpfs, so
/// /sys/fs/bpf neither exists nor can be created): reloader says so and
/// runs without pinned maps.
#[test]
fn bpffs_unavailable_runs_without_pins_and_says_so() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let script = r#"mount -t tmpfs -o ro tmpfs /sys/fs && exec "$@""#;
    let mut instance = Instance::spawn_wrapped(
        dir,
        &in_private_mount_namespace(script),
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
        &[],
    );
    instance.wait_active(Duration::from_secs(20));
    assert_eq!(load::request(addr()).unwrap(), 1);
    let reload = instance.reload_wait();
    assert!(reload.ok(), "reloads work without pins: {reload}");
    let log = instance.log_text();
    assert!(
        log.contains("bpffs is not mounted at /sys/fs/bpf and mounting it failed"),
        "{log}"
    );
    assert!(log.contains("a restarted controller cannot adopt"), "{log}");
    assert!(instance.stop().success());
}

// ---- Trust nothing read back from disk (each test: one finding).

/// Finding 1: another user's runtime directory (here world-writable and
/// owned by uid 65534, with the lock planted as a symlink to a victim file)
/// is refused before any file in it is touched; a symlink planted in a
/// directory that is ours is not followed either.
#[test]
fn a_planted_symlink_in_the_runtime_directory_is_refused_and_its_target_untouched() {
    privileged();
    let base = tempfile::tempdir().unwrap();
    let victim = base.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    let planted = base.path().join("reloader-planted");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("control.lock")).unwrap();
    let out = Command::new(reloader_bin())
        .args(["run", "--listen", ADDR, "--control-socket"])
        .arg(planted.join("control.sock"))
        .args(["--", testserver(), "--listen", ADDR])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse: {stderr}");
    assert!(
        stderr.contains("refusing the runtime directory")
            && stderr.contains("belongs to uid 65534"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(
        !planted.join("control.sock").exists(),
        "no socket created there"
    );

    // Our own directory, with a symlink where the lock goes.
    let ours = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&victim, ours.path().join("control.lock")).unwrap();
    let out = Command::new(reloader_bin())
        .args(["run", "--listen", ADDR, "--control-socket"])
        .arg(ours.path().join("control.sock"))
        .args(["--", testserver(), "--listen", ADDR])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse: {stderr}");
    assert!(stderr.contains("instance lock"), "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Finding 2: a state file naming an unrelated live process, with its
/// correct start time, as the active generation. Before, the controller
/// adopted it and sent it SIGTERM at the next reload. It holds none of the
/// recorded sockets and its environment does not name the instance: it is
/// neither adopted nor signalled, and the message names it.
#[test]
fn a_state_file_naming_an_unrelated_process_is_neither_adopted_nor_signalled() {
    privileged();
    let mut unrelated = Command::new("sleep").arg("300").spawn().unwrap();
    let pid = unrelated.id();
    let start = procfs::process::Process::new(pid as i32)
        .unwrap()
        .stat()
        .unwrap()
        .starttime;
    let dir = tempfile::tempdir().unwrap();
    let state = serde_json::json!({
        "version": 2,
        "controller_pid": 1,
        "listen": [ADDR],
        "limits": {"listeners": 1, "slots": 6, "sockets_per_slot": 256},
        "next_generation": 5,
        "generations": [{
            "number": 4, "slot": 0, "pid": pid, "start_time": start,
            "state": "active", "sockets": [12345]
        }]
    });
    std::fs::write(
        dir.path().join("control.state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    let mut instance =
        Instance::start_in(dir, &["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let status = instance.status();
    let recovered = status.recovered.clone().expect("what was recovered");
    assert!(
        recovered.contains(&format!("pid {pid} (sleep)")) && recovered.contains("never signalled"),
        "{recovered}"
    );
    assert_eq!(
        status.active_generation(),
        Some(5),
        "a fresh generation, numbering continued"
    );
    instance.reload_wait().done();
    assert!(instance.stop().success());
    assert!(
        reloader_tests::process::alive(pid),
        "the unrelated process was never signalled"
    );
    unrelated.kill().unwrap();
    unrelated.wait().unwrap();
}

/// Finding 3: `stop` after an adoption waited the whole drain timeout,
/// exited 2 and then killed a long-gone process group. Adopted exits are
/// watched by pidfd, so the stop ends when they exit, cleanly.
#[test]
fn stop_after_adoption_returns_promptly_and_cleanly() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--drain-timeout", "60s"],
        &[testserver(), "--listen", ADDR, "--workers", "2"],
    );
    kill_controller(&mut instance);
    instance.respawn();
    instance.wait_active(Duration::from_secs(20));
    assert!(
        instance
            .status()
            .recovered
            .is_some_and(|r| r.contains("adopted")),
        "adopted"
    );
    let started = Instant::now();
    let status = instance.stop();
    let took = started.elapsed();
    println!("stop after adoption took {took:?}");
    assert!(status.success(), "a clean stop exits 0: {status}");
    assert!(
        took < Duration::from_secs(20),
        "the stop waited for the drain timeout ({took:?})"
    );
}

/// Finding 4: stop and SIGTERM took effect only when --ready-timeout ran
/// out while the first generation started, and `reload --wait` ended with
/// a raw EAGAIN. Now a stop cancels the start, and a client that times out
/// is told what the controller is doing.
#[test]
fn stop_during_a_slow_first_start_returns_within_a_second() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::spawn_in(
        dir,
        &["--listen", ADDR, "--ready-timeout", "120s"],
        &[testserver(), "--listen", ADDR, "--never-listen"],
    );
    wait_for(
        "the first generation to say it is not listening",
        Duration::from_secs(20),
        || {
            instance
                .log_text()
                .contains("not listening (--never-listen)")
        },
    );
    let out = instance.client(&["reload", "--wait", "--timeout", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("still working on it"), "{stderr}");
    assert!(!stderr.contains("os error 11"), "{stderr}");

    let started = Instant::now();
    let out = instance.client(&["stop", "--timeout", "30s"]);
    let took = started.elapsed();
    println!("stop during the first start took {took:?}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    instance.wait_exit(Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(5),
        "the stop waited for the start ({took:?})"
    );
    assert!(
        !instance.log_text().contains("did not pass within"),
        "the start was cancelled, not timed out"
    );
}

/// Finding 5: a client reopening idle connections kept the control socket
/// at its 256-connection limit, and `reload --wait` failed with "busy".
/// Idle connections now give their place to newcomers.
#[test]
fn a_flood_of_idle_control_connections_cannot_lock_out_reload_and_stop() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let socket = instance.socket.clone();
    let stop_flood = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop_flood = stop_flood.clone();
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            let mut opened = 0usize;
            while !stop_flood.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
                    held.push_back(stream);
                    opened += 1;
                }
                if held.len() > 400 {
                    held.pop_front();
                }
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload during the flood: {reload}");
    }
    let out = instance.client(&["stop", "--timeout", "30s"]);
    stop_flood.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.join().unwrap();
    println!("the flood opened {opened} idle connections");
    assert!(opened > 256, "the flood filled the socket ({opened})");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    instance.wait_exit(Duration::from_secs(30));
}

/// Finding 6: a failed first start left its pin directory, every run left
/// NAME.lock. Nothing of the instance remains after either.
#[test]
fn no_leftovers_after_a_failed_first_start_or_a_clean_stop() {
    privileged();
    let leftovers = |dir: &std::path::Path, name: &str| -> Vec<String> {
        let socket = dir.join("control.sock");
        let pins = reloader::state::saved::pin_dir(name, &socket);
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "reloader.log")
            .collect();
        if pins.exists() {
            found.push(pins.display().to_string());
        }
        found
    };
    let mut failed = Instance::spawn_in(
        tempfile::tempdir().unwrap(),
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--exit-on-start"],
    );
    assert!(!failed.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(
        leftovers(failed.dir.path(), "default"),
        Vec::<String>::new()
    );

    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    instance.reload_wait().done();
    assert!(instance.stop().success());
    assert_eq!(
        leftovers(instance.dir.path(), "default"),
        Vec::<String>::new()
    );
}

/// Finding 6: a corrupt state file while the servers still run was
/// "cleaned up, starting fresh" and then refused for the port the orphaned
/// server held. The refusal names the processes that still serve and says
/// what to do.
#[test]
fn a_corrupt_state_file_with_live_servers_names_them_and_says_what_to_do() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let server = instance.generation(1).pid.expect("a pid");
    kill_controller(&mut instance);
    std::fs::write(instance.dir.path().join("control.state.json"), b"{garbage").unwrap();
    instance.respawn();
    let status = instance.wait_exit(Duration::from_secs(20));
    let log = instance.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("pid {server}")),
        "names the server: {log}"
    );
    assert!(log.contains("kill -TERM"), "says what to do: {log}");
    assert!(reloader_tests::process::alive(server), "left serving");
    // A failed restart leaves no socket of the dead controller behind.
    assert!(!instance.socket.exists(), "{}", instance.socket.display());
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(server as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

// ---- A cgroup per generation.

/// The processes of generation `g`'s cgroup.
fn cgroup_members(cgroup: &str) -> Vec<u32> {
    std::fs::read_to_string(std::path::Path::new(cgroup).join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A server whose listener escapes into a `setsid()` daemon (its own
/// session and process group): after a controller restart (adoption), a
/// reload and `stop`, the daemon still listened on the managed port; `stop`
/// said clean, and the next `reloader run` was refused. Its generation's
/// cgroup holds it: it is killed at the drain timeout like the rest. On a
/// kernel without `cgroup.kill` (before 5.14: the VM's 5.10) the kill goes
/// to each member instead, and this test checks which way it went.
#[test]
fn a_setsid_daemon_of_a_generation_is_killed_at_its_drain_timeout_also_after_adoption() {
    privileged();
    let script = format!(
        "setsid {} --listen {ADDR} --ignore-drain & exec sleep 600",
        testserver()
    );
    let mut instance = Instance::start(
        &["--listen", ADDR, "--drain-timeout", "2s"],
        &["sh", "-c", &script],
    );
    let first = instance.generation(1);
    let leader = first.pid.expect("a pid");
    let cgroup = first.cgroup.clone().expect("generation 1 has a cgroup");
    let daemon = wait_for("the daemon in the cgroup", Duration::from_secs(5), || {
        cgroup_members(&cgroup).into_iter().find(|p| *p != leader)
    });
    let pgid = procfs::process::Process::new(daemon as i32)
        .unwrap()
        .stat()
        .unwrap()
        .pgrp;
    assert_ne!(pgid as u32, leader, "the daemon left its process group");
    // The controller dies and a new one adopts generation 1.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(5));
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    assert_eq!(instance.generation(1).cgroup.as_deref(), Some(&*cgroup));
    // The reload drains it: its leader exits on TERM, the daemon ignores
    // it and is killed with its cgroup at the drain timeout.
    let reload = instance.reload_wait();
    assert_eq!(reload.done().generation, 2, "{reload}");
    assert!(
        !process_alive(daemon),
        "the daemon was killed with its cgroup"
    );
    assert!(
        !std::path::Path::new(&cgroup).exists(),
        "the empty cgroup was removed"
    );
    for _ in 0..20 {
        assert_eq!(
            load::request(addr()).unwrap(),
            2,
            "only generation 2 answers"
        );
    }
    let log = instance.log_text();
    if reloader_tests::kernel_at_least(5, 14) {
        assert!(log.contains("killed through cgroup.kill"), "{log}");
    } else {
        assert!(
            log.contains("cgroup.kill is missing (Linux < 5.14): SIGKILL to each member"),
            "{log}"
        );
    }
    let second = instance.generation(2).cgroup.expect("a cgroup");
    // Generation 2's daemon ignores the drain signal too: the stop kills it.
    let stopped = instance.stop();
    assert!(
        stopped.code() == Some(0) || stopped.code() == Some(2),
        "{stopped}"
    );
    assert!(
        std::net::TcpStream::connect(addr()).is_err(),
        "nothing listens after the stop"
    );
    let instance_dir = std::path::Path::new(&second).parent().unwrap();
    assert!(
        !instance_dir.exists(),
        "no cgroup of the instance is left: {}",
        instance_dir.display()
    );
}

/// The reload's barrier (the old generation has exited) waited for the
/// old generation's leader only: a process it left behind — here one that
/// outlives it by 2 s after leaving its process group — was not waited
/// for. The generation has exited when its cgroup is empty.
#[test]
fn a_generation_is_exited_when_its_cgroup_is_empty_not_when_its_leader_exits() {
    privileged();
    let script = format!(
        "{} --listen {ADDR} & trap 'kill $!; setsid sleep 2 & exit 0' TERM; wait",
        testserver()
    );
    let mut instance = Instance::start(&["--listen", ADDR], &["sh", "-c", &script]);
    assert!(instance.generation(1).cgroup.is_some());
    let reload = instance.reload_wait();
    let report = reload.done();
    let waited = report.cutover_to_old_exited_ms.expect("measured");
    assert!(
        waited >= 1800.0,
        "the barrier waited for the lingering process (2 s), not only the leader: {waited} ms"
    );
    assert_eq!(
        instance.status().find_generation(1).map(|g| g.state),
        Some(State::Exited)
    );
    assert!(instance.stop().success());
}

/// cgroup v2 is read-only here (a container without a delegated cgroup):
/// reloader says once what is missing and how to fix it, and runs as it
/// did before cgroups (generations are process groups and trees).
#[test]
fn without_a_writable_cgroup_the_instance_runs_and_says_why() {
    privileged();
    let mount = reloader_tests::cgroup2_mount().expect("cgroup2 is mounted");
    let script = format!(
        r#"mount -o remount,bind,ro {} && exec "$@""#,
        mount.display()
    );
    let mut instance = Instance::spawn_wrapped(
        tempfile::tempdir().unwrap(),
        &in_private_mount_namespace(&script),
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
        &[],
    );
    instance.wait_active(Duration::from_secs(20));
    let status = instance.status();
    let why = status
        .cgroup_unavailable
        .clone()
        .expect("status says why there are no cgroups");
    assert!(why.contains("Delegate=yes"), "says how to fix it: {why}");
    assert!(status.generations.iter().all(|g| g.cgroup.is_none()));
    let reload = instance.reload_wait();
    assert!(reload.ok(), "reloads work without cgroups: {reload}");
    assert_eq!(load::request(addr()).unwrap(), 2);
    let log = instance.log_text();
    assert_eq!(
        log.matches("no cgroup per generation").count(),
        1,
        "said once: {log}"
    );
    assert!(instance.stop().success());
}
