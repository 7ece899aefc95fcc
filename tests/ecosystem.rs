//! How reloader fits where users run it: Prometheus, systemd's notify
//! protocol, log formats. Real binary, real kernel, own network namespace.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    time::Duration,
};

use reloader_tests::{
    instance::{Instance, StatusExt},
    load::{self},
    privileged,
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";
const METRICS: &str = "127.0.0.1:9100";

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// `name{labels} value` lines of an OpenMetrics scrape.
fn scrape(addr: &str) -> (String, HashMap<String, f64>) {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint listens");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let mut values = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        values.insert(series.to_owned(), value);
    }
    (body.to_owned(), values)
}

#[test]
fn metrics_are_served_and_agree_with_what_happened() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--metrics", METRICS],
        &[testserver(), "--listen", ADDR],
    );
    let addr: SocketAddr = ADDR.parse().unwrap();
    for _ in 0..20 {
        assert_eq!(load::request(addr).unwrap(), 1);
    }
    instance.reload_wait().done();
    for _ in 0..5 {
        assert_eq!(load::request(addr).unwrap(), 2);
    }
    let (body, m) = scrape(METRICS);
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics terminator");
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing in\n{body}"));
    assert_eq!(get(r#"reloader_reloads_total{result="succeeded"}"#), 1.0);
    assert_eq!(
        get(r#"reloader_connections_steered_total{generation="1"}"#),
        20.0
    );
    assert_eq!(
        get(r#"reloader_connections_steered_total{generation="2"}"#),
        5.0
    );
    assert_eq!(
        get(r#"reloader_connections_fallback_total{generation="2"}"#),
        0.0
    );
    assert_eq!(get(r#"reloader_generations{state="active"}"#), 1.0);
    assert_eq!(get(r#"reloader_generations{state="exited"}"#), 1.0);
    assert_eq!(get("reloader_active_generation"), 2.0);
    assert_eq!(
        get(r#"reloader_reload_phase_seconds_count{phase="total"}"#),
        1.0
    );
    assert!(get(r#"reloader_reload_phase_seconds_sum{phase="total"}"#) > 0.0);
    assert_eq!(get(r#"reloader_child_restarts_total{reason="crash"}"#), 0.0);
    assert_eq!(
        get(r#"reloader_child_restarts_total{reason="stopped_listening"}"#),
        0.0
    );
    assert_eq!(get("reloader_drain_kills_total"), 0.0);

    // No reload failed, so there is no failed series yet.
    assert!(!m.contains_key(r#"reloader_reloads_total{result="failed"}"#));
    assert!(instance.stop().success());
}

#[test]
fn a_taken_metrics_port_is_an_error_before_anything_starts() {
    privileged();
    let _taken = std::net::TcpListener::bind(METRICS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::spawn_in(
        dir,
        &["--listen", ADDR, "--metrics", METRICS],
        &[testserver(), "--listen", ADDR],
    );
    assert!(!instance.wait_exit(Duration::from_secs(20)).success());
    let log = instance.log_text();
    assert!(
        log.contains("--metrics 127.0.0.1:9100: cannot listen there"),
        "{log}"
    );
    assert!(
        !log.contains("starting generation"),
        "nothing started: {log}"
    );
}

/// Reads notify datagrams until one contains `want` (10 s at most).
fn expect_notify(socket: &UnixDatagram, seen: &mut Vec<String>, want: &str) -> String {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    wait_for(
        format!("a {want:?} notification"),
        Duration::from_secs(10),
        || {
            if let Some(m) = seen.iter().find(|m| m.contains(want)) {
                let m = m.clone();
                seen.retain(|x| *x != m);
                return Ok(m);
            }
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Err(format!("got {seen:?}"))
        },
    )
}

#[test]
fn systemd_notify_protocol_for_type_notify_reload() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let path_text = path.display().to_string();
    let mut instance = Instance::spawn_with_env(
        dir,
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
        &[("NOTIFY_SOCKET", &path_text)],
    );
    let mut seen = Vec::new();
    let ready = expect_notify(&socket, &mut seen, "READY=1");
    assert!(ready.contains("STATUS=generation 1 active"), "{ready}");
    instance.wait_active(Duration::from_secs(10));

    instance.reload_wait().done();
    let reloading = expect_notify(&socket, &mut seen, "RELOADING=1");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = expect_notify(&socket, &mut seen, "READY=1");
    assert!(ready.contains("STATUS=generation 2 active"), "{ready}");

    assert!(instance.stop().success());
    expect_notify(&socket, &mut seen, "STOPPING=1");
}

#[test]
fn json_logs_are_one_object_per_line() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--log-format", "json"],
        &[testserver(), "--listen", ADDR],
    );
    let log = instance.log_text();
    let mut parsed = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
        parsed += 1;
    }
    assert!(parsed >= 3, "controller events logged as JSON: {log}");
    assert!(
        log.lines()
            .any(|l| l.contains("\"message\":\"active\"") && l.contains("\"generation\":1")),
        "structured fields: {log}"
    );
    assert!(instance.stop().success());
}

fn demo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(reloader_tests::instance::reloader_bin())
        .arg("demo")
        .args(args)
        .output()
        .expect("run reloader demo")
}

/// The number after `label` on the summary row that starts with it.
fn summary_value(stdout: &str, label: &str, column: usize) -> u64 {
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in\n{stdout}"));
    let cells: Vec<&str> = row[row.find(label).unwrap() + label.len()..]
        .split_whitespace()
        .collect();
    cells[column]
        .parse()
        .unwrap_or_else(|_| panic!("{label:?} column {column} in {row:?}"))
}

#[test]
fn demo_runs_headless_and_its_summary_adds_up() {
    privileged();
    let out = demo(&[
        "--duration",
        "4s",
        "--reload-every",
        "500ms",
        "--port",
        "18080",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answered = summary_value(&stdout, "connections answered", 0);
    let failed = summary_value(&stdout, "connections failed", 0);
    let reloads = summary_value(&stdout, "reloads", 0);
    assert!(answered > 100, "{stdout}");
    assert_eq!(failed, 0, "{stdout}");
    assert!(reloads >= 6, "a reload every 500ms for 4s: {stdout}");
    // The progress lines and the summary count the same connections.
    let done = stdout
        .lines()
        .find(|l| l.starts_with("[reloader] done:"))
        .expect("final progress line");
    assert!(
        done.contains(&format!("{answered} connections, 0 failed")),
        "{done} vs {answered}"
    );
    assert!(stdout.contains(&format!(
        "reloader: 0 failed connections across {reloads} reloads"
    )));
    let generations = summary_value(&stdout, "generations that served", 0);
    assert!(generations >= reloads, "each generation served: {stdout}");
}

#[test]
fn demo_compare_runs_both_methods_under_the_same_load() {
    privileged();
    let out = demo(&[
        "--duration",
        "3s",
        "--reload-every",
        "500ms",
        "--compare",
        "--port",
        "18081",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("naive reuseport") && stdout.contains("reloader"),
        "{stdout}"
    );
    let naive_reloads = summary_value(&stdout, "reloads", 0);
    let reloader_reloads = summary_value(&stdout, "reloads", 3);
    assert_eq!(naive_reloads, reloader_reloads, "same schedule: {stdout}");
    assert!(summary_value(&stdout, "connections answered", 0) > 100);
    assert_eq!(
        summary_value(&stdout, "connections failed", 1),
        0,
        "{stdout}"
    );
}

#[test]
fn demo_without_privileges_says_what_is_needed() {
    use std::os::unix::process::CommandExt;
    privileged();
    let (dir, bin) = reloader_tests::instance::reloader_bin_for_any_user();
    let out = std::process::Command::new(&bin)
        .args(["demo", "--duration", "1s"])
        .current_dir(dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("run it as root"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(reloader_tests::instance::reloader_bin())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    for word in ["reload", "status", "--drain-signal", "--ready-probe"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(run(&["completions", "zsh"]).contains("#compdef reloader"));
    let man = run(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH reloader"),
        "roff: {}",
        &man[..80]
    );
}

/// `--pass-fds`: reloader opens each generation's listeners and hands them
/// over; the server only accepts inherited sockets (it checks LISTEN_PID is
/// its own pid) and reloads under load lose nothing.
#[test]
fn pass_fds_hands_each_generation_its_listeners() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--listen", "[::1]:8443", "--pass-fds"],
        &[testserver(), "--inherited"],
    );
    let addr: SocketAddr = ADDR.parse().unwrap();
    let v6: SocketAddr = "[::1]:8443".parse().unwrap();
    assert_eq!(load::request(v6).unwrap(), 1, "both listeners were passed");
    let running = load::Load::start(addr, 4);
    for _ in 0..5 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "{reload}\n{}", instance.log_text());
    }
    let report = running.finish();
    report.assert_no_failures();
    assert_eq!(load::request(v6).unwrap(), 6);
    let log = instance.log_text();
    assert!(
        log.contains(r#"2 inherited sockets named "listen0:listen1""#),
        "{log}"
    );
    assert!(instance.stop().success());
}

/// `--ready notify`: a generation is ready only once it sent READY=1 to the
/// NOTIFY_SOCKET reloader gave it; one that never does is rolled back.
#[test]
fn ready_notify_waits_for_the_generation_to_say_ready() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "--notify-ready").unwrap();
    let mode_arg = mode.display().to_string();
    let mut instance = Instance::start_in(
        dir,
        &[
            "--listen",
            ADDR,
            "--ready",
            "notify",
            "--ready-timeout",
            "2s",
        ],
        &[testserver(), "--listen", ADDR, "--mode-file", &mode_arg],
    );
    instance.reload_wait().done();
    // The next generation listens but never says READY=1.
    std::fs::remove_file(&mode).unwrap();
    let reload = instance.reload_wait();
    let error = reload.failed().error.as_deref().expect("the reason");
    assert!(error.contains("never sent READY=1"), "{error}");
    assert_eq!(instance.active_generation(), Some(2));
    assert!(instance.stop().success());
}

/// As a container's PID 1: reaps processes reparented to it (a generation
/// that leaves an orphan behind), answers as pid 1, stops cleanly.
#[test]
fn works_as_pid_1_of_a_pid_namespace() {
    privileged();
    // The generation's shell forks a short-lived helper into a subshell that
    // exits at once: the helper is reparented to PID 1, reloader.
    let script = format!("(sleep 0.3 &); exec {} --listen {ADDR}", testserver());
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::spawn_wrapped(
        dir,
        &["unshare", "--pid", "--fork", "--mount-proc"],
        &["--listen", ADDR],
        &["sh", "-c", &script],
        &[],
    );
    instance.wait_active(Duration::from_secs(20));
    let status = instance.status();
    assert_eq!(status.pid, 1, "the controller is PID 1 in its namespace");
    instance.reload_wait().done();
    assert_eq!(load::request(ADDR.parse().unwrap()).unwrap(), 2);

    // Once the orphaned `sleep` has ended, none is left as a zombie.
    let unshare = instance.pid();
    let controller: Vec<u32> = reloader_tests::process::children(unshare)
        .into_iter()
        .collect();
    assert_eq!(
        controller.len(),
        1,
        "unshare runs one child: the controller"
    );
    let orphan_ran = |pid: &u32| {
        procfs::process::Process::new(*pid as i32)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.comm == "sleep")
    };
    wait_for(
        "the orphan to end and be reaped",
        Duration::from_secs(5),
        || {
            let children = reloader_tests::process::children(controller[0]);
            let zombies: Vec<u32> = children
                .iter()
                .copied()
                .filter(|pid| reloader_tests::process::zombie(*pid))
                .collect();
            let sleeping = children.iter().any(orphan_ran);
            if !sleeping && zombies.is_empty() {
                Ok(())
            } else {
                Err(format!("unreaped orphans: {zombies:?}"))
            }
        },
    );
    assert!(instance.stop().success(), "clean stop as PID 1");
}

/// contrib/reloader@.service is a unit systemd accepts (with ExecStart
/// pointed at the binary under test, which `verify` checks exists).
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/reloader@.service"
    ))
    .expect("contrib/reloader@.service");
    let bin = reloader_tests::instance::reloader_bin();
    assert!(
        unit.contains("ExecStart=/usr/bin/reloader run"),
        "the unit names the binary where the Debian package installs it"
    );
    let unit = unit.replace("/usr/bin/reloader", &bin.display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reloader@web.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // nginx is referenced by the unit; anything else reported is a problem.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("/usr/sbin/nginx"))
        .collect();
    assert!(out.status.success() && problems.is_empty(), "{text}");
}

/// Regression: counters belong to a generation. Before, `status` showed
/// generation N's connections plus those of every generation that had used
/// its slot (5 connections each to generations 1–5 read 5, 5, 10, 10, 15),
/// and `/metrics` the same. Slot reuse starts with the third generation.
#[test]
fn counters_are_per_generation_across_slot_reuse() {
    privileged();
    let mut instance = Instance::start(
        &["--listen", ADDR, "--metrics", METRICS, "--settle", "0s"],
        &[testserver(), "--listen", ADDR],
    );
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut sent = HashMap::new();
    for generation in 1..=8u64 {
        let n = 2 + generation as usize;
        for _ in 0..n {
            assert_eq!(load::request(addr).unwrap(), generation);
        }
        sent.insert(generation, n as u64);
        if generation < 8 {
            let reload = instance.reload_wait();
            assert!(reload.ok(), "reload: {reload}");
        }
    }
    let status = instance.status();
    let (_, metrics) = scrape(METRICS);
    let generations = &status.generations;
    assert_eq!(generations.len(), 8, "all eight are listed: {status:?}");
    for g in generations {
        let number = g.generation;
        let slot = g.slot;
        let steered = g.counters.steered;
        assert_eq!(
            steered, sent[&number],
            "generation {number} (slot {slot}) shows only its own connections in status"
        );
        let metric = format!(r#"reloader_connections_steered_total{{generation="{number}"}}"#);
        assert_eq!(
            metrics.get(&metric).copied(),
            Some(sent[&number] as f64),
            "{metric}"
        );
    }
    let slots: std::collections::BTreeSet<u32> = generations.iter().map(|g| g.slot).collect();
    assert!(slots.len() < 8, "slots were reused: {slots:?}");
    assert!(instance.stop().success());
}

/// Regression: the controller's stderr was written with blocking writes on
/// its only thread, so a stderr pipe nobody read (a stuck log shipper)
/// stalled reloads, reaping and the control socket once the pipe filled.
#[test]
fn a_stderr_nobody_reads_does_not_stall_reloads() {
    privileged();
    let mut instance = Instance::start_with_unread_stderr(
        &["--listen", ADDR, "--settle", "0s"],
        &[testserver(), "--listen", ADDR, "--chatty", "20000"],
    );
    for i in 0..20 {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload {i}: {reload}");
        let status = instance.status();
        assert_eq!(
            status.active_generation(),
            Some(i + 2),
            "status answers between reloads"
        );
    }
    let status = instance.status();
    assert!(
        status.log_lines_dropped > 0,
        "the pipe filled and lines were dropped, counted: {status:?}"
    );
    assert!(instance.stop().success());
}
