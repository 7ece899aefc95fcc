//! `--inject-reuseport` and `--drain-command` against the real kernel and
//! real servers that bind without `SO_REUSEPORT`, each in its own network
//! namespace: every reload under load loses nothing, and every answer
//! after a reload comes from the new generation (or a later one).
//!
//! Kernel-facing (run in the VM too): the project's test server with
//! `--no-reuseport` (TCP with two workers, UDP), the refusal where the
//! kernel cannot set `SO_REUSEPORT` from a bind hook (Linux 5.10) or no
//! cgroup v2 exists, the programs outliving a killed controller. Host
//! only (`cargo xtask test` installs them): Node.js, Go `ListenAndServe`,
//! uvicorn, Python's `ThreadingHTTPServer`, a Python DNS-like UDP server, a
//! server's unmanaged sockets read back through `pidfd_getfd`, and a
//! server whose graceful stop is `POST /drain` (`--drain-command`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use reloader_tests::{
    instance::Instance,
    keepalive,
    load::Load,
    privileged,
    servers::{require, shared_tempdir, venv, version_of, write},
    udp_load::UdpLoad,
    wait::wait_for,
};

/// Reloads per test.
const RELOADS: u64 = 10;
/// Load clients, each one connection at a time.
const CONCURRENCY: usize = 8;

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// One load at a time keeps a small machine's numbers comparable.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts `reloader run --inject-reuseport ARGS -- SERVER` and waits until
/// its first generation is active; panics with the controller's log if it
/// refuses or never gets there. On a kernel where injection is refused
/// (Linux 5.10: `injection_is_refused_by_name_where_the_kernel_cannot`),
/// every test that calls this fails: the VM runner lists them as not
/// applicable there.
fn start_injected(args: &[&str], server: &[&str], env: &[(&str, &str)]) -> Instance {
    let mut all = vec!["--inject-reuseport", "--drain-timeout", "10s"];
    all.extend_from_slice(args);
    let instance = Instance::spawn_with_env(tempfile::tempdir().unwrap(), &all, server, env);
    assert_injection_supported(&instance);
    instance
}

/// Waits for the first generation; panics if the controller refused
/// `--inject-reuseport` or exited.
#[track_caller]
fn assert_injection_supported(instance: &Instance) {
    wait_for(
        "a generation active with --inject-reuseport",
        Duration::from_secs(60),
        || {
            let log = instance.log_text();
            assert!(
                reloader_tests::process::alive(instance.pid()),
                "the controller exited (is --inject-reuseport supported on this kernel?):\n{log}"
            );
            instance.serving()
        },
    );
}

/// Reloads `instance` [`RELOADS`] times under a load of new connections
/// to `addr`; panics unless every connection and reload succeeded and
/// every connection that started after a reload completed was answered by
/// its generation or a later one.
fn reloads_lose_nothing(name: &str, instance: &mut Instance, addr: SocketAddr) {
    let load = Load::start(addr, CONCURRENCY);
    let mut completed = Vec::new();
    let mut failures = Vec::new();
    for i in 1..=RELOADS {
        let reload = instance.reload_wait();
        if reload.ok() {
            completed.push((load.start.elapsed(), reload.done().generation));
        } else {
            failures.push(format!("reload {i} failed: {}", reload.why()));
        }
    }
    let report = load.finish();
    for outcome in &report.outcomes {
        let Ok(served) = outcome.result else { continue };
        let newest = completed
            .iter()
            .filter(|(t, _)| *t < outcome.started)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(1);
        if served < newest {
            failures.push(format!(
                "a connection started at {:?}, after generation {newest} was active, was \
                 answered by generation {served}",
                outcome.started
            ));
        }
    }
    let failed = report.failures();
    println!(
        "{name}: {} reloads succeeded; {} connections, {} failed; answered per generation {:?}",
        completed.len(),
        report.total(),
        failed.len(),
        report.by_generation()
    );
    if !failed.is_empty() {
        failures.push(format!(
            "{} of {} connections failed, first ones: {:?}",
            failed.len(),
            report.total(),
            &failed[..failed.len().min(3)]
        ));
    }
    assert!(
        report.by_generation().len() as u64 > RELOADS / 2,
        "{name}: too few generations answered: {:?}",
        report.by_generation()
    );
    let stopped = instance.stop();
    assert!(stopped.success(), "reloader stop: {stopped}");
    assert!(failures.is_empty(), "{name}:\n- {}", failures.join("\n- "));
}

/// `SO_REUSEPORT` and `SO_REUSEADDR` of the socket `fd` of process `pid`,
/// read through a copy (`pidfd_getfd`).
fn options_of(pid: u32, fd: i32) -> (bool, bool) {
    let copy = reloader::discovery::copy_fd(pid, fd).expect("pidfd_getfd");
    let get = |option| {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, an int buffer and its length.
        let rc = unsafe {
            libc::getsockopt(
                copy.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value != 0
    };
    (get(libc::SO_REUSEPORT), get(libc::SO_REUSEADDR))
}

/// Every listening TCP / bound UDP socket the processes of generation
/// `number` hold: (transport, address) → (SO_REUSEPORT, SO_REUSEADDR).
fn sockets_of(
    instance: &Instance,
    number: u64,
) -> BTreeMap<(reloader::steering::Transport, SocketAddr), (bool, bool)> {
    let pid = instance.generation(number).pid.expect("pid");
    let pids: Vec<u32> = reloader_tests::servers::tree(pid).into_iter().collect();
    let holders = reloader::discovery::socket_holders(&pids);
    reloader::discovery::listeners()
        .expect("sock_diag")
        .into_iter()
        .filter_map(|l| {
            let holder = holders.get(&l.inode)?;
            Some(((l.transport, l.addr), options_of(holder.pid, holder.fd)))
        })
        .collect()
}

// ---- kernel-facing: the project's test server, run in the VM too ----

#[test]
fn testserver_without_reuseport_reloads_under_load_with_injection() {
    let _serial = serial();
    privileged();
    let addr = "127.0.0.1:18601";
    let mut instance = start_injected(
        &[
            "--listen",
            addr,
            "--ready-probe",
            &format!("http://{addr}/"),
        ],
        &[
            testserver(),
            "--listen",
            addr,
            "--no-reuseport",
            "--workers",
            "2",
        ],
        &[],
    );
    // Both workers' sockets (the second could not have been bound without
    // SO_REUSEPORT) have it, and the controller registered both.
    let sockets = instance.generation(1).sockets.len();
    assert_eq!(sockets, 2, "{:?}", instance.generation(1).sockets);
    for ((_, a), (reuseport, _)) in sockets_of(&instance, 1) {
        assert!(reuseport, "{a}: no SO_REUSEPORT");
    }
    reloads_lose_nothing(
        "testserver --no-reuseport --workers 2",
        &mut instance,
        addr.parse().unwrap(),
    );
}

#[test]
fn testserver_udp_without_reuseport_loses_no_datagram_with_injection() {
    let _serial = serial();
    privileged();
    let addr = "127.0.0.1:18602";
    let listen = format!("udp://{addr}?mode=stateless");
    let mut instance = start_injected(
        &["--listen", &listen],
        &[testserver(), "--udp", addr, "--no-reuseport"],
        &[],
    );
    udp_reloads_lose_nothing("testserver --udp --no-reuseport", &mut instance, addr);
}

/// Reloads under a stateless UDP load; panics unless every datagram got
/// its answer and every reload succeeded.
fn udp_reloads_lose_nothing(name: &str, instance: &mut Instance, addr: &str) {
    let load = UdpLoad::start(addr.parse().unwrap(), 4, Duration::from_millis(2));
    let mut failures = Vec::new();
    for i in 1..=RELOADS {
        let reload = instance.reload_wait();
        if !reload.ok() {
            failures.push(format!("reload {i} failed: {}", reload.why()));
        }
    }
    let outcomes = load.finish();
    let lost = outcomes.iter().filter(|o| o.generation.is_none()).count();
    let mut by_generation: BTreeMap<u64, usize> = BTreeMap::new();
    for g in outcomes.iter().filter_map(|o| o.generation) {
        *by_generation.entry(g).or_default() += 1;
    }
    println!(
        "{name}: {} datagrams, {lost} lost; answered per generation {by_generation:?}",
        outcomes.len()
    );
    if lost > 0 {
        failures.push(format!("{lost} of {} datagrams lost", outcomes.len()));
    }
    let stopped = instance.stop();
    assert!(stopped.success(), "reloader stop: {stopped}");
    assert!(failures.is_empty(), "{name}:\n- {}", failures.join("\n- "));
}

/// The programs are a plain cgroup attachment: a killed controller
/// leaves them on the generation's cgroup, so a process of the generation
/// that binds later still gets SO_REUSEPORT (here: a second testserver
/// started in the generation's cgroup after the SIGKILL, listening beside
/// the first).
#[test]
fn the_bind_programs_outlive_a_killed_controller() {
    let _serial = serial();
    privileged();
    let addr = "127.0.0.1:18603";
    let mut instance = start_injected(
        &["--listen", addr],
        &[testserver(), "--listen", addr, "--no-reuseport"],
        &[],
    );
    let cgroup = instance
        .status()
        .generations
        .iter()
        .find(|g| g.generation == 1)
        .and_then(|g| g.cgroup.clone())
        .expect("generation 1 has a cgroup");
    let first = instance.generation(1).pid.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the controller");
    let _ = instance.wait_exit(Duration::from_secs(10));
    // A late process of generation 1: enters its cgroup before it binds.
    let procs = PathBuf::from(&cgroup).join("cgroup.procs");
    let mut late = Command::new(testserver());
    late.args(["--listen", addr, "--no-reuseport"]);
    // SAFETY: the child only writes its own pid ("0") to a cgroup file.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut late, move || {
            std::fs::write(&procs, "0")
        });
    }
    let mut late = late.spawn().expect("spawn the late server");
    let listening = || {
        reloader::discovery::listeners()
            .unwrap()
            .iter()
            .filter(|l| l.addr == addr.parse().unwrap())
            .count()
    };
    // The bridge went with the controller: the first server's listener
    // and the late one's.
    wait_for(
        "the late server listens beside the first",
        Duration::from_secs(10),
        || listening() >= 2 || late.try_wait().unwrap().is_some(),
    );
    let status = late.try_wait().unwrap();
    let _ = late.kill();
    let _ = late.wait();
    // Clean up: the next controller of this instance adopts generation 1.
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    let stopped = instance.stop();
    assert!(
        status.is_none(),
        "the late server exited ({status:?}): its bind got no SO_REUSEPORT after the controller \
         was killed"
    );
    assert!(stopped.success(), "reloader stop: {stopped}");
    assert!(!reloader_tests::process::alive(first));
}

/// Where the kernel cannot (before 5.13 by our reading; 5.10's verifier
/// rejects `bpf_setsockopt` in bind programs), `--inject-reuseport` is
/// refused at start with the kernel and the reason; where it can (verified
/// on 6.1, 6.12, 6.18), the same command starts.
#[test]
fn injection_is_refused_by_name_where_the_kernel_cannot() {
    privileged();
    let addr = "127.0.0.1:18604";
    let mut instance = Instance::spawn_in(
        tempfile::tempdir().unwrap(),
        &["--inject-reuseport", "--listen", addr],
        &[testserver(), "--listen", addr, "--no-reuseport"],
    );
    if reloader_tests::kernel_at_least(5, 13) {
        instance.wait_active(Duration::from_secs(30));
        assert!(instance.stop().success());
        return;
    }
    let status = instance.wait_exit(Duration::from_secs(30));
    let log = instance.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--inject-reuseport is not supported on this kernel")
            && log.contains("bpf_setsockopt"),
        "the refusal names the flag, the kernel and why: {log}"
    );
}

/// Without a cgroup v2 (here: a mount namespace without cgroupfs) the
/// generations get no cgroup to attach the programs to: refused at start,
/// saying so.
#[test]
fn injection_without_a_cgroup_v2_is_refused() {
    privileged();
    let addr = "127.0.0.1:18605";
    let mut instance = Instance::spawn_wrapped(
        tempfile::tempdir().unwrap(),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount -l /sys/fs/cgroup/unified 2>/dev/null; umount -l /sys/fs/cgroup; exec \"$@\"",
            "sh",
        ],
        &["--inject-reuseport", "--listen", addr],
        &[testserver(), "--listen", addr, "--no-reuseport"],
        &[],
    );
    let status = instance.wait_exit(Duration::from_secs(30));
    let log = instance.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--inject-reuseport attaches cgroup bind programs to each generation's")
            && log.contains("cgroup2 is not mounted"),
        "{log}"
    );
}

/// Without injection, a server that binds without SO_REUSEPORT is refused
/// with the fix, which names --inject-reuseport.
#[test]
fn without_injection_the_error_names_inject_reuseport() {
    privileged();
    let addr = "127.0.0.1:18606";
    let mut instance = Instance::spawn_in(
        tempfile::tempdir().unwrap(),
        &["--listen", addr],
        &[testserver(), "--listen", addr, "--no-reuseport"],
    );
    let _ = instance.wait_exit(Duration::from_secs(30));
    let log = instance.log_text();
    assert!(
        log.contains("does not have SO_REUSEPORT set") && log.contains("--inject-reuseport"),
        "{log}"
    );
}

// ---- host only: real servers that bind without SO_REUSEPORT ----

#[test]
fn node_http_listen_without_reuseport_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    require(Path::new("/usr/bin/node"), "Node.js (Debian's nodejs)");
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "server.js",
        include_str!("src/inject/node_server.js"),
    );
    // listen(port) binds the IPv6 wildcard, dual-stack: [::]:P is the
    // --listen that covers it; IPv4 clients reach it too.
    let mut instance = start_injected(
        &[
            "--listen",
            "[::]:18611",
            "--ready-probe",
            "http://[::1]:18611/",
        ],
        &["/usr/bin/node", &script, "18611"],
        &[],
    );
    let version = version_of("/usr/bin/node", &["--version"]);
    reloads_lose_nothing(
        &format!("Node.js {version}"),
        &mut instance,
        "127.0.0.1:18611".parse().unwrap(),
    );
}

/// Builds `tests/src/inject/goplain` with Debian's Go into `target/servers`.
fn go_plain() -> String {
    reloader_tests::servers::go::build_source("src/inject/goplain", "goplain")
        .display()
        .to_string()
}

#[test]
fn go_listen_and_serve_without_listenconfig_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    let binary = go_plain();
    let mut instance = start_injected(
        &[
            "--listen",
            "[::]:18612",
            "--ready-probe",
            "http://[::1]:18612/",
        ],
        &[&binary, "-listen", ":18612"],
        &[],
    );
    reloads_lose_nothing(
        &format!(
            "Go {} ListenAndServe",
            version_of("/usr/bin/go", &["version"])
        ),
        &mut instance,
        "127.0.0.1:18612".parse().unwrap(),
    );
}

#[test]
fn uvicorn_default_listener_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    let python = venv().join("bin/python");
    require(
        &venv().join("bin/uvicorn"),
        "uvicorn (PyPI, in target/venv)",
    );
    let dir = shared_tempdir();
    write(
        dir.path(),
        "uvicorn_app.py",
        include_str!("src/inject/uvicorn_app.py"),
    );
    let app_dir = dir.path().display().to_string();
    let addr = "127.0.0.1:18613";
    let mut instance = start_injected(
        &[
            "--listen",
            addr,
            "--ready-probe",
            &format!("http://{addr}/"),
        ],
        &[
            python.to_str().unwrap(),
            "-m",
            "uvicorn",
            "--app-dir",
            &app_dir,
            "uvicorn_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "18613",
            "--log-level",
            "warning",
        ],
        &[],
    );
    let version = version_of(python.to_str().unwrap(), &["-m", "uvicorn", "--version"]);
    reloads_lose_nothing(&version, &mut instance, addr.parse().unwrap());
}

#[test]
fn python_threading_http_server_reloads_lose_nothing() {
    let _serial = serial();
    privileged();
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "server.py",
        include_str!("src/inject/threading_server.py"),
    );
    let addr = "127.0.0.1:18614";
    let mut instance = start_injected(
        &[
            "--listen",
            addr,
            "--ready-probe",
            &format!("http://{addr}/"),
        ],
        &["/usr/bin/python3", &script, addr],
        &[],
    );
    reloads_lose_nothing(
        "Python http.server.ThreadingHTTPServer",
        &mut instance,
        addr.parse().unwrap(),
    );
}

#[test]
fn python_dns_like_udp_server_stateless_loses_nothing() {
    let _serial = serial();
    privileged();
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "dns.py",
        include_str!("src/inject/dns_server.py"),
    );
    let addr = "127.0.0.1:18615";
    let listen = format!("udp://{addr}?mode=stateless");
    let probe = format!("dns://{addr}/example.org");
    let mut instance = start_injected(
        &["--listen", &listen, "--ready-probe", &probe],
        &["/usr/bin/python3", &script, addr],
        &[],
    );
    udp_reloads_lose_nothing("Python DNS-like UDP server", &mut instance, addr);
}

/// Only binds to the managed address get SO_REUSEPORT: the server's
/// other sockets — another port (with the SO_REUSEADDR it set), another
/// port where it set SO_REUSEPORT itself, the same port over UDP, the same
/// port on [::1] — keep exactly the options it gave them.
#[test]
fn unmanaged_sockets_keep_their_options() {
    let _serial = serial();
    privileged();
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "unmanaged.py",
        include_str!("src/inject/unmanaged.py"),
    );
    let addr = "127.0.0.1:18620";
    let mut instance = start_injected(
        &["--listen", addr],
        &["/usr/bin/python3", &script, addr],
        &[],
    );
    use reloader::steering::Transport::{Tcp, Udp};
    let expected: BTreeMap<_, _> = [
        ((Tcp, "127.0.0.1:18620"), (true, false)),
        ((Tcp, "127.0.0.1:18621"), (false, true)),
        ((Tcp, "127.0.0.1:18622"), (true, false)),
        ((Udp, "127.0.0.1:18620"), (false, false)),
        ((Tcp, "[::1]:18620"), (false, false)),
    ]
    .into_iter()
    .map(|((t, a), o)| ((t, a.parse::<SocketAddr>().unwrap()), o))
    .collect();
    let found = sockets_of(&instance, 1);
    let stopped = instance.stop();
    assert_eq!(
        found, expected,
        "(transport, address) → (SO_REUSEPORT, SO_REUSEADDR)"
    );
    assert!(stopped.success(), "reloader stop: {stopped}");
}

/// A keep-alive load (8 connections, requests back to back) through
/// [`RELOADS`] reloads of `drain_server.py`; returns the failed requests.
fn keepalive_reloads(drain_command: Option<&str>) -> (usize, usize) {
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "drain.py",
        include_str!("src/inject/drain_server.py"),
    );
    let addr = "127.0.0.1:18630";
    let mut args = vec!["--listen", addr, "--ready-probe", "http://127.0.0.1:18630/"];
    if let Some(command) = drain_command {
        args.extend(["--drain-command", command]);
    }
    // Each generation's admin port: 18700 + its number.
    let mut instance = start_injected(
        &args,
        &[
            "sh",
            "-c",
            "exec /usr/bin/python3 \"$0\" 127.0.0.1:18630 $((18700 + RELOADER_GENERATION))",
            &script,
        ],
        &[],
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let client = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(keepalive::run(
                keepalive::Config {
                    addr: addr.parse().unwrap(),
                    connections: CONCURRENCY,
                    timeout: Duration::from_secs(5),
                    retry: false,
                    pause: Duration::ZERO,
                    max_duration: Duration::from_secs(300),
                },
                async {
                    let _ = stopped.await;
                },
            ))
    });
    let mut reports = Vec::new();
    for i in 1..=RELOADS {
        let reload = instance.reload_wait();
        assert!(reload.ok(), "reload {i}: {}", reload.why());
        reports.push(reload.done().clone());
    }
    let _ = stop.send(());
    let events = client.join().unwrap();
    let stopped = instance.stop();
    assert!(stopped.success(), "reloader stop: {stopped}");
    if drain_command.is_some() {
        for report in &reports {
            let run = report
                .drain_command
                .as_ref()
                .unwrap_or_else(|| panic!("no drain command in {report:?}"));
            assert!(
                run.ok,
                "--drain-command for generation {}: {}",
                run.generation, run.how
            );
            assert_eq!(run.generation, report.generation - 1);
        }
    }
    let failed = events.iter().filter(|e| e.outcome.is_failure()).count();
    (failed, events.len())
}

/// A server whose only graceful drain is an HTTP call: with
/// `--drain-command` (POST /drain to the old generation's admin port),
/// keep-alive clients see no failed request over 10 reloads; with its
/// SIGTERM alone (it exits at once), some fail.
#[test]
fn drain_command_drains_a_server_whose_graceful_stop_is_an_http_call() {
    let _serial = serial();
    privileged();
    let command = "/usr/bin/python3 -c \"import urllib.request; \
                   urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:' + \
                   str(18700 + {generation}) + '/drain', method='POST'), timeout=5)\"";
    let (with_command, total) = keepalive_reloads(Some(command));
    let (sigterm, total_sigterm) = keepalive_reloads(None);
    println!(
        "keep-alive requests failed over {RELOADS} reloads: --drain-command {with_command} of \
         {total}, SIGTERM alone {sigterm} of {total_sigterm}"
    );
    assert_eq!(with_command, 0, "with --drain-command");
    assert!(
        sigterm > 0,
        "SIGTERM alone failed no request: the comparison shows nothing"
    );
}
