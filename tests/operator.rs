//! What operators and their tools ask of running instances: the probes a
//! kubelet asks (`reloader run --health ADDR`, and on the `--metrics`
//! address: `/healthz` while the controller answers, `/readyz` while the
//! active generation listens on every managed address), `reloader list`,
//! and what a new user's first mistakes are told (issue 29). Real binary,
//! real kernel, own network namespace.

use std::time::Duration;

use reloader::control::list::Listing;
use reloader_tests::{
    http::{Answer, get},
    instance::{Instance, decode, reloader_bin, reloader_bin_for_any_user},
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

/// `reloader list` finds an instance whose socket is where `reloader run`
/// puts it by default and one in a directory given with `--dir`, each with
/// its name, controller pid, listeners and active generation, and skips a
/// stale socket (its controller is gone) naming it.
#[test]
fn list_shows_the_instances_that_answer_and_skips_stale_sockets() {
    privileged();
    const OTHER: &str = "127.0.0.1:8081";
    let name = format!("list-test-{}", std::process::id());
    let named = Instance::start_named(
        &name,
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
    );
    let mut elsewhere = Instance::start(
        &["--name", "elsewhere", "--listen", OTHER],
        &[testserver(), "--listen", OTHER],
    );
    elsewhere.reload_wait().done();
    let stale = named.socket.with_file_name(format!("{name}-stale.sock"));
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket"));
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _stale = Remove(stale.clone());

    let list = |args: &[&str]| -> (Listing, String) {
        let out = std::process::Command::new(reloader_bin())
            .arg("list")
            .args(args)
            .output()
            .expect("run reloader list");
        assert!(out.status.success(), "{out:?}");
        let human = std::process::Command::new(reloader_bin())
            .arg("list")
            .args(args.iter().filter(|a| **a != "--json"))
            .output()
            .expect("run reloader list");
        (
            decode("`list --json`", &out.stdout),
            String::from_utf8_lossy(&human.stdout).into_owned(),
        )
    };
    let dir = elsewhere.dir.path().display().to_string();
    let (listing, human) = list(&["--json", "--dir", &dir]);
    let found = |n: &str| listing.instances.iter().find(|i| i.name == n).cloned();
    let first = found(&name).unwrap_or_else(|| panic!("{name} is not listed: {listing:#?}"));
    assert_eq!(first.pid, named.pid());
    assert_eq!(first.listeners, vec![ADDR.to_owned()]);
    assert_eq!(first.active_generation, Some(1));
    assert_eq!(first.live_generations, 1);
    let second = found("elsewhere").unwrap_or_else(|| panic!("{listing:#?}"));
    assert_eq!(
        (second.pid, second.active_generation),
        (elsewhere.pid(), Some(2))
    );
    assert_eq!(second.listeners, vec![OTHER.to_owned()]);
    assert!(listing.stale.contains(&stale), "{listing:#?}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(&name) && l.contains(ADDR)),
        "{human}"
    );
    assert!(
        human.contains(&format!("skipped {}: stale", stale.display())),
        "{human}"
    );
    // Without --dir, only the default directories are looked in.
    let (listing, _) = list(&["--json"]);
    assert!(
        listing.instances.iter().any(|i| i.name == name),
        "{listing:#?}"
    );
    assert!(
        !listing.instances.iter().any(|i| i.name == "elsewhere"),
        "{listing:#?}"
    );
}

/// A server that listens on another port than `--listen` names is told
/// about after a few seconds, naming both, long before `--ready-timeout`
/// (issue 29: a wrong port was silent for the whole 30 s); the failure at
/// the timeout names `--ready-timeout`.
#[test]
fn a_server_on_another_address_is_named_within_seconds() {
    privileged();
    const OTHER: &str = "127.0.0.1:8081";
    let dir = tempfile::tempdir().expect("tempdir");
    let mut instance = Instance::spawn_in(
        dir,
        &["--listen", ADDR, "--ready-timeout", "12s"],
        &[testserver(), "--listen", OTHER],
    );
    let started = std::time::Instant::now();
    let line = wait_for(
        "the log to name what generation 1 listens on",
        Duration::from_secs(10),
        || {
            let log = instance.log_text();
            log.lines()
                .find(|l| l.contains("generation 1 listens on"))
                .map(ToOwned::to_owned)
                .ok_or(log)
        },
    );
    let after = started.elapsed();
    assert!(
        line.contains(&format!(
            "listens on {OTHER} but not on {ADDR} after 3s: is --listen the address the server \
             listens on?"
        )),
        "{line}"
    );
    assert!(
        after < Duration::from_secs(8),
        "said after {after:?}, not within seconds"
    );
    let status = instance.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = instance.log_text();
    assert!(
        log.contains("not ready within 12s (--ready-timeout)"),
        "{log}"
    );
}

/// `reloader status` as another user finds no socket of its own and says
/// where root's instance of that name is and to use sudo (issue 29: it
/// only said /tmp/reloader-UID/NAME.sock did not exist).
#[test]
fn a_non_root_status_of_roots_instance_hints_at_sudo() {
    use std::os::unix::process::CommandExt;
    privileged();
    let name = format!("sudo-hint-{}", std::process::id());
    let _instance = Instance::start_named(
        &name,
        &["--listen", ADDR],
        &[testserver(), "--listen", ADDR],
    );
    let (dir, bin) = reloader_bin_for_any_user();
    let out = std::process::Command::new(&bin)
        .args(["status", "--name", &name])
        .current_dir(dir.path())
        .env_remove("XDG_RUNTIME_DIR")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run reloader status as uid 65534");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "An instance started by root has its socket at /run/reloader/{name}.sock, which \
             only root can reach: run this command with sudo"
        )),
        "{stderr}"
    );
}

/// `status` prints the `GODEBUG=multipathtcp=0` note for a Go server (the
/// generation's listener is held by a Go binary) and not for another one
/// (issue 29: every status printed it).
#[test]
fn the_godebug_note_is_printed_for_a_go_server_only() {
    privileged();
    let human = |instance: &Instance| {
        let out = instance.client(&["status"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rust = Instance::start(&["--listen", ADDR], &[testserver(), "--listen", ADDR]);
    assert!(!rust.status().go_server_seen);
    let text = human(&rust);
    assert!(!text.contains("GODEBUG"), "{text}");
    drop(rust);

    let go = reloader_tests::servers::go::build();
    let instance = Instance::start(&["--listen", ADDR], &[&go, "-listen", ADDR]);
    assert!(instance.status().go_server_seen);
    let text = human(&instance);
    assert!(
        text.contains("servers get GODEBUG=multipathtcp=0 (Go listens with plain TCP"),
        "{text}"
    );
}

/// A server command without `--` before it gets a tip with the command
/// line fixed (issue 29); nothing starts.
#[test]
fn a_forgotten_separator_gets_a_tip() {
    let out = std::process::Command::new(reloader_bin())
        .args(["run", "--listen", ADDR, "nginx", "-g", "daemon off;"])
        .output()
        .expect("run reloader");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "tip: the server command goes after `--` (what comes before it is reloader's): \
             reloader run --listen {ADDR} -- nginx -g 'daemon off;'"
        )),
        "{stderr}"
    );
}
