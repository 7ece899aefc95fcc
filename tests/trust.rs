//! Nothing untrusted, nothing left behind: paths another user controls are
//! refused, what a state file says is proven and checked before it is
//! believed, and a start that fails leaves nothing of itself.

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::Command,
    time::Duration,
};

use reloader_tests::{
    instance::{Instance, StatusExt, reloader_bin, reloader_bin_for_any_user},
    load, privileged,
};

const ADDR: &str = "127.0.0.1:8080";
const NOBODY: u32 = 65534;

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `reloader run --control-socket SOCKET ARGS -- testserver`: its output.
fn run(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(reloader_bin())
        .arg("run")
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .output()
        .unwrap()
}

/// The runtime directory was checked, its ancestors were not: with the
/// control socket in a root-owned 0700 directory inside one `nobody` owns,
/// the start was accepted; `nobody` then swapped its directory for a
/// symlink, and the next reload wrote the root-owned state file into a
/// directory of `nobody`'s choosing.
#[test]
fn a_control_socket_under_another_users_directory_is_refused() {
    privileged();
    let base = tempfile::tempdir().unwrap();
    chmod(base.path(), 0o755);
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let ours = theirs.join("run");
    std::fs::create_dir(&ours).unwrap();
    chmod(&ours, 0o700);
    let out = run(&ours.join("c.sock"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} above it is owned by uid {NOBODY}",
            theirs.display()
        )),
        "names the ancestor and why: {stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&ours).unwrap().count(),
        0,
        "nothing was created"
    );
}

/// A watched file another user may write: that user could make reloader
/// reload (and choose the configuration the next generation runs).
#[test]
fn a_watched_file_writable_by_another_user_is_refused() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let open = dir.path().join("open.conf");
    std::fs::write(&open, "x").unwrap();
    chmod(&open, 0o666);
    let theirs = dir.path().join("theirs.conf");
    std::fs::write(&theirs, "x").unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    for (file, says) in [
        (&open, "is writable by every user (mode 666)"),
        (&theirs, &*format!("is owned by uid {NOBODY}")),
    ] {
        let out = run(
            &dir.path().join("c.sock"),
            &["--watch", file.to_str().unwrap()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "refused: {stderr}");
        assert!(
            stderr.contains(&format!("--watch {}", file.display())) && stderr.contains(says),
            "{stderr}"
        );
    }
}

/// A process of another uid that carries `RELOADER_NAME` and
/// `RELOADER_GENERATION` in its environment was adopted as the active
/// generation (and SIGTERMed at stop): anyone can set a variable.
#[test]
fn an_environment_proof_from_another_uid_is_not_adopted() {
    privileged();
    let mut impostor = Command::new("sleep")
        .arg("300")
        .env("RELOADER_NAME", "default")
        .env("RELOADER_GENERATION", "4")
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .unwrap();
    let pid = impostor.id();
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
            "state": "active", "sockets": []
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
        recovered.contains(&format!("pid {pid}")) && recovered.contains("never signalled"),
        "{recovered}"
    );
    assert_eq!(status.active_generation(), Some(5), "a fresh generation");
    assert!(instance.stop().success());
    assert!(
        reloader_tests::process::alive(pid),
        "the impostor was never signalled"
    );
    impostor.kill().unwrap();
    impostor.wait().unwrap();
}

/// Duplicate generations, duplicate slots and slot 99 were accepted from a
/// state file (a duplicate slot caused a spurious crash restart, a
/// duplicate generation made `stop` wait its whole drain timeout).
#[test]
fn an_invalid_state_file_is_refused_and_kept() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.state.json");
    let me = std::process::id();
    let state = serde_json::json!({
        "version": 2,
        "controller_pid": 1,
        "listen": [ADDR],
        "limits": {"listeners": 1, "slots": 6, "sockets_per_slot": 256},
        "next_generation": 5,
        "generations": [
            {"number": 4, "slot": 0, "pid": me, "start_time": 1, "state": "active", "sockets": []},
            {"number": 4, "slot": 1, "pid": me, "start_time": 1, "state": "draining", "sockets": []}
        ]
    });
    let bytes = serde_json::to_vec_pretty(&state).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let out = run(&dir.path().join("control.sock"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is invalid: generations[1].number is 4, recorded twice (nothing was deleted)",
            path.display()
        )),
        "names the field: {stderr}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "kept as it was");
    assert!(!dir.path().join("control.sock").exists());
}

/// A failed first start without privileges left `NAME.sock` behind.
#[test]
fn no_socket_file_is_left_after_a_failed_unprivileged_start() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let (bin_dir, bin) = reloader_bin_for_any_user();
    let out = Command::new(&bin)
        .args(["run", "--control-socket"])
        .arg(dir.path().join("c.sock"))
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .current_dir(bin_dir.path())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("run reloader as root"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // And nothing listens or answers for it.
    assert!(load::answer_within(addr(), Duration::from_millis(500)).is_err());
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// A `stop` whose client gave up (the controller was stopped: SIGSTOP)
/// used to be carried out later, when the controller resumed, after the
/// client had reported failure.
#[test]
fn a_stop_its_client_gave_up_on_is_not_carried_out() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    signal(instance.pid(), nix::sys::signal::Signal::SIGSTOP);
    let out = instance.client(&["stop", "--timeout", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    signal(instance.pid(), nix::sys::signal::Signal::SIGCONT);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the stop was not carried out"), "{stderr}");
    // Resumed, it reads the late stop and refuses it: it keeps serving.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(instance.active_generation(), Some(1));
    assert_eq!(load::request(addr()).unwrap(), 1);
    assert!(instance.stop().success());
}

/// `reload` without `--wait` only needs to hear that the request was
/// taken; against a controller that does not read (SIGSTOP) it waited its
/// whole 60 s `--timeout`.
#[test]
fn reload_without_wait_gives_up_within_seconds() {
    privileged();
    let mut instance = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    signal(instance.pid(), nix::sys::signal::Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let out = instance.client(&["reload"]);
    let waited = started.elapsed();
    signal(instance.pid(), nix::sys::signal::Signal::SIGCONT);
    assert!(!out.status.success());
    assert!(
        waited < Duration::from_secs(30),
        "gave up after {waited:?}, not the 60 s --timeout of --wait"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("within 5s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(instance.stop().success());
}

/// `rollback` while a reload with `--keep-previous` was still starting its
/// generation said "run with --keep-previous".
#[test]
fn rollback_during_a_reload_says_a_reload_is_in_progress() {
    privileged();
    let (mut instance, mode_file) = Instance::with_mode_file(
        testserver(),
        ADDR,
        &["--listen", ADDR, "--keep-previous", "1m"],
        None,
    );
    std::fs::write(&mode_file, "--start-delay-ms 3000").unwrap();
    let socket = instance.socket.clone();
    let reload = std::thread::spawn(move || reloader_tests::instance::reload_wait(&socket, &[]));
    reloader_tests::wait::wait_for("generation 2 to start", Duration::from_secs(10), || {
        instance
            .status()
            .generations
            .iter()
            .any(|g| g.generation == 2)
    });
    let out = instance.client(&["rollback"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("a reload is in progress (generation 2 is starting)"),
        "{stderr}"
    );
    assert!(reload.join().unwrap().ok());
    assert!(instance.stop().success());
}

/// A server flooding its stderr faster than the controller's own stderr
/// is read: lines are dropped (the controller never waits), and that is
/// said in the log as well as counted. 30,436 of 102,400 lines were
/// dropped before with no log line.
#[test]
fn dropped_log_lines_are_said_and_counted() {
    use std::io::Read;
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("c.sock");
    let mut controller = Command::new(reloader_bin())
        .arg("run")
        .arg("--control-socket")
        .arg(&socket)
        .args(["--listen", ADDR, "--", testserver(), "--listen", ADDR])
        .args(["--chatty", "20000"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A reader slower than the flood: 4 KiB every 20 ms.
    let mut stderr = controller.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(25);
        while std::time::Instant::now() < deadline {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&all);
            if text.contains("log lines dropped") {
                return text.into_owned();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let text = reader.join().unwrap();
    let status = Command::new(reloader_bin())
        .args(["status", "--json", "--control-socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let status: reloader::status::StatusReport =
        reloader_tests::instance::decode("`status --json`", &status.stdout);
    let _ = Command::new(reloader_bin())
        .args(["stop", "--control-socket"])
        .arg(&socket)
        .output();
    let _ = controller.wait();
    assert!(
        text.contains("log lines dropped"),
        "the drops were said in the log"
    );
    assert!(status.log_lines_dropped > 0, "and counted: {status:?}");
}
