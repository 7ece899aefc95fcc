//! Servers outlive their controller: a controller that dies (SIGKILL)
//! takes no server down, a restarted one adopts them and forwards their
//! logs again, recovery never destroys what still serves, a generation
//! that stops listening is replaced, and one address has one owner.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use reloader_tests::{
    instance::{Instance, process_alive},
    load::{self, Load},
    privileged,
    servers::{self, caddy::Which},
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

fn kill_controller(instance: &mut Instance) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(5));
}

/// Caddy with `log` writes a line to its stderr for every request. Its
/// stderr was a pipe only the controller read: after a SIGKILL of the
/// controller the next line got EPIPE, Go exits on EPIPE to fd 2, and the
/// port refused connections (904,528 failed requests in 6 s of load).
#[test]
fn a_logging_caddy_keeps_serving_after_the_controller_is_killed() {
    privileged();
    let server = servers::caddy::logging(ADDR, Which::Debian);
    let mut args = vec!["--listen", ADDR];
    args.extend(server.options.iter().map(String::as_str));
    let command: Vec<&str> = server.command.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = server
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut instance =
        Instance::spawn_with_env(tempfile::tempdir().unwrap(), &args, &command, &env);
    instance.wait_active(Duration::from_secs(30));
    let caddy = instance.generation(1).pid.expect("a pid");
    let load = Load::start(addr(), 4);
    std::thread::sleep(Duration::from_millis(300));
    kill_controller(&mut instance);
    // Every request is a log line on the dead controller's pipe.
    std::thread::sleep(Duration::from_secs(3));
    let report = load.finish();
    report.assert_no_failures();
    assert!(
        report.total() > 100,
        "too little load to prove anything: {}",
        report.total()
    );
    assert!(process_alive(caddy), "Caddy died writing its log");
    // A restarted controller adopts it and stops it cleanly.
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    assert_eq!(instance.active_generation(), Some(1));
    assert!(instance.stop().success());
}

/// A server with SIGPIPE at its default action (as a C server has it) is
/// killed by a write to a pipe without a reader.
#[test]
fn a_server_with_sigpipe_at_default_outlives_its_controller() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[
            testserver(),
            "--listen",
            ADDR,
            "--chatty",
            "200",
            "--sigpipe-default",
        ],
    );
    let pid = instance.generation(1).pid.expect("a pid");
    kill_controller(&mut instance);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        process_alive(pid),
        "the server died writing to its stderr after the controller was killed"
    );
    assert_eq!(load::request(addr()).expect("still served"), 1);
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    assert!(instance.stop().success());
}

#[test]
fn a_restarted_controller_forwards_the_servers_log_again() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--chatty", "100"],
    );
    let pid = instance.generation(1).pid.expect("a pid");
    kill_controller(&mut instance);
    let before = instance.log_text().len();
    std::thread::sleep(Duration::from_secs(1));
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    assert_eq!(
        instance.generation(1).pid,
        Some(pid),
        "the same server, adopted"
    );
    // The lines written while no controller ran are logged by the new
    // one, and the server's later lines are forwarded as they come.
    let since_restart = |text: &str| -> Vec<u64> {
        text[before..]
            .lines()
            .filter(|l| l.contains("chatter line"))
            .filter_map(|l| {
                l.split("chatter line ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let kept = wait_for(
        "the new controller to log what the keeper kept",
        Duration::from_secs(10),
        || {
            let log = instance.log_text();
            log[before..]
                .contains("forwarded the stderr lines the log keeper kept")
                .then(|| since_restart(&log))
        },
    );
    assert!(
        kept.len() >= 50,
        "about 100 lines were written in the second without a controller: {}",
        kept.len()
    );
    let first = *kept.iter().min().unwrap();
    wait_for(
        "lines written after the restart to be forwarded",
        Duration::from_secs(10),
        || {
            let numbers = since_restart(&instance.log_text());
            let newest = numbers.iter().max().copied().unwrap_or(0);
            // Consecutive from the first kept line: none lost in between.
            let distinct: std::collections::BTreeSet<u64> = numbers.into_iter().collect();
            (newest > first + 300 && distinct.len() as u64 == newest - first + 1).then_some(())
        },
    );
    assert!(instance.stop().success());
    let keeper = instance.socket.with_extension("keeper");
    assert!(!keeper.exists(), "a clean stop ends the log keeper");
}

/// Nothing of a stopped instance is left: its log keeper exits with it.
#[test]
fn a_clean_stop_ends_the_log_keeper() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let keeper = instance.socket.with_extension("keeper");
    assert!(keeper.exists(), "a keeper runs beside the instance");
    let started = Instant::now();
    assert!(instance.stop().success());
    assert!(!keeper.exists());
    let stray: Vec<u32> = procfs::process::all_processes()
        .unwrap()
        .flatten()
        .filter(|p| {
            p.cmdline().is_ok_and(|c| {
                c.iter().any(|a| a == "__keeper") && c.iter().any(|a| a == keeper.to_str().unwrap())
            })
        })
        .map(|p| p.pid as u32)
        .collect();
    assert!(
        stray.is_empty(),
        "keeper processes left {:?} after {:?}",
        stray,
        started.elapsed()
    );
}

/// Upgrading reloader itself: `reloader handover` makes the controller exit
/// (status 75) without signalling its generation, and the next `reloader
/// run` with the same options (a new binary, in a package upgrade) adopts
/// it. Under load no connection fails, the server is the same process, and
/// what it wrote to its stderr meanwhile was kept by the log keeper.
#[test]
fn a_handover_leaves_the_servers_to_the_next_controller_under_load() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--chatty", "100"],
    );
    let server = instance.generation(1).pid.expect("a pid");
    let old = instance.pid();
    let load = Load::start(addr(), 4);
    std::thread::sleep(Duration::from_millis(300));
    let out = instance.client(&["handover", "--timeout", "20s"]);
    assert!(
        out.status.success(),
        "handover failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        instance.log_text()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("controller pid {old} handed")),
        "{said}"
    );
    let exit = instance.wait_exit(Duration::from_secs(5));
    assert_eq!(exit.code(), Some(75), "{}", instance.log_text());
    // What the successor adopts by is all there; nobody answers meanwhile.
    assert!(instance.socket.with_extension("state.json").exists());
    assert!(instance.socket.with_extension("keeper").exists());
    assert!(!instance.socket.exists(), "the old control socket is gone");
    let before = instance.log_text().len();
    std::thread::sleep(Duration::from_secs(1));
    assert!(process_alive(server), "the server was signalled");
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    let status = instance.status();
    assert_eq!(
        status.generations[0].pid,
        Some(server),
        "the same server, adopted"
    );
    assert!(
        status
            .recovered
            .as_deref()
            .is_some_and(|r| r.starts_with("adopted generations 1 (active")),
        "{:?}",
        status.recovered
    );
    wait_for(
        "the new controller to log what the keeper kept",
        Duration::from_secs(10),
        || {
            instance.log_text()[before..]
                .contains("forwarded the stderr lines the log keeper kept")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    report.assert_no_failures();
    assert!(report.total() > 100, "too little load: {}", report.total());
    // The successor controls it: a reload, then a clean stop.
    assert_eq!(instance.reload_wait().done().generation, 2);
    assert!(instance.stop().success());
}

/// A binary that cannot adopt the instance's state (another layout of the
/// pinned maps here) refuses to ask for a hand-over: the controller keeps
/// running, nothing is touched.
#[test]
fn a_handover_is_refused_when_this_binary_could_not_adopt() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let state = instance.socket.with_extension("state.json");
    // The controller rewrites the state file while the generation settles
    // in (registration, the bridge): edit it only once it has stopped
    // changing, or the edit is overwritten (2 of 5 runs under load).
    let mut last = std::fs::read(&state).unwrap();
    let stable: Vec<u8> = wait_for(
        "the state file to stop changing",
        Duration::from_secs(10),
        || {
            std::thread::sleep(Duration::from_millis(300));
            let now = std::fs::read(&state).map_err(|e| e.to_string())?;
            if now == last {
                Ok(now)
            } else {
                last = now;
                Err(String::from("it changed within 300 ms"))
            }
        },
    );
    let mut saved: serde_json::Value = serde_json::from_slice(&stable).unwrap();
    saved["maps_layout"] = 99.into();
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    let out = instance.client(&["handover"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("not handing over") && said.contains("layout 99"),
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        instance.status().pid,
        instance.pid(),
        "the controller runs on"
    );
    assert!(instance.stop().success());
}

/// The recorded leader of the active generation died while no controller
/// ran, but its workers still listen. A new controller used to call that
/// "none of its generations serves any more", remove the state file and
/// the pins, and then refuse to start because the port was still served.
#[test]
fn recovery_keeps_pins_while_a_worker_of_a_dead_leader_serves() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR, "--workers", "2"],
    );
    let leader = instance.generation(1).pid.expect("a pid");
    let workers: Vec<u32> = reloader::discovery::process_tree(leader)
        .unwrap()
        .into_iter()
        .filter(|p| *p != leader)
        .collect();
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");
    let load = Load::start(addr(), 4);
    kill_controller(&mut instance);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the leader to be gone", Duration::from_secs(5), || {
        !process_alive(leader)
    });
    let state = reloader::state::saved::state_path(&instance.socket);
    assert!(state.exists());
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    let adopted = instance.generation(1);
    match &adopted.cgroup {
        // Adopted through its cgroup: it has no leader, and its workers are
        // the cgroup's members.
        Some(dir) => {
            assert_eq!(adopted.pid, None, "no leader: {adopted:?}");
            let members = std::fs::read_to_string(format!("{dir}/cgroup.procs")).unwrap();
            for worker in &workers {
                assert!(
                    members.lines().any(|l| l == worker.to_string()),
                    "worker {worker} in {dir}: {members}"
                );
            }
        }
        None => assert!(
            workers.contains(&adopted.pid.expect("a pid")),
            "adopted by a worker that holds its sockets: {adopted:?}"
        ),
    }
    let log = instance.log_text();
    assert!(
        !log.contains("cleaned up, starting fresh"),
        "nothing serving was cleaned up:\n{log}"
    );
    // It is drained like any old generation: every worker is told.
    let reload = instance.reload_wait();
    assert_eq!(reload.done().generation, 2, "{reload}");
    for worker in &workers {
        wait_for(
            format!("worker {worker} of the old generation to exit"),
            Duration::from_secs(15),
            || !process_alive(*worker),
        );
    }
    let report = load.finish();
    report.assert_no_failures();
    assert!(instance.stop().success());
}

/// While the first instance's server was still starting nothing listened
/// on the address, and a second instance for it was accepted: both
/// reported `active`, and whichever registered last got every connection.
#[test]
fn a_second_instance_is_refused_while_the_first_server_is_still_starting() {
    privileged();
    let first = Instance::spawn_in(
        tempfile::tempdir().unwrap(),
        &["--listen", ADDR, "--ready-timeout", "30s"],
        &[testserver(), "--listen", ADDR, "--start-delay-ms", "4000"],
    );
    wait_for(
        "the first instance to answer",
        Duration::from_secs(10),
        || first.try_status().is_some(),
    );
    assert!(first.active_generation().is_none(), "still starting");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(reloader_tests::instance::reloader_bin())
        .arg("run")
        .arg("--name")
        .arg("second")
        .arg("--control-socket")
        .arg(dir.path().join("second.sock"))
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "127.0.0.1:8080 is already claimed by instance \"default\" (controller pid {})",
            first.pid()
        )),
        "names the first instance and its pid: {stderr}"
    );
    // Nothing of the second one was left, and the first starts.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    first.wait_active(Duration::from_secs(30));
    assert_eq!(load::request(addr()).unwrap(), 1);
}

/// Claims live in the network namespace, like the addresses: the same
/// address in two namespaces is two addresses, and two instances.
#[test]
fn one_address_in_two_network_namespaces_is_two_claims() {
    privileged();
    let mut here = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    let mut there = Instance::spawn_wrapped(
        tempfile::tempdir().unwrap(),
        &[
            "unshare",
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ],
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
        &[],
    );
    there.wait_active(Duration::from_secs(30));
    assert_eq!(here.active_generation(), Some(1));
    assert_eq!(there.active_generation(), Some(1));
    assert_eq!(
        load::request(addr()).unwrap(),
        1,
        "this namespace's is served"
    );
    assert!(there.stop().success());
    assert!(here.stop().success());
}

/// After an adoption the bridge used to open only when the tracker next
/// registered sockets (for a generation that changes nothing: never), so a
/// connection arriving while the adopted generation had no listener was
/// refused. It opens as the controller starts.
#[test]
fn an_adopted_instance_has_its_bridge_at_once() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    if instance.status().steering != reloader::steering::Mode::SelectOrMigrate {
        panic!("the bridge needs select-or-migrate steering (Linux >= 5.14)");
    }
    kill_controller(&mut instance);
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    let status = instance.status();
    assert!(
        status.listeners[0].bridge,
        "the bridge is open right after the adoption: {:?}",
        status.listeners[0]
    );
    assert!(instance.stop().success());
}
