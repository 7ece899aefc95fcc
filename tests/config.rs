//! Config-aware reloads (issue 17): the pre-flight `--check`, reload on
//! change (`--watch`) and the config identity (`--config`). Real binary,
//! real kernel, real nginx, each test in its own network namespace.

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use reloader_tests::{
    instance::Instance,
    load::{self, Load},
    nginx::Nginx,
    privileged, process,
    wait::wait_for,
};

const ADDR: &str = "127.0.0.1:8080";
const METRICS: &str = "127.0.0.1:9100";

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn testserver() -> &'static str {
    env!("CARGO_BIN_EXE_testserver")
}

/// `name{labels} value` of an OpenMetrics scrape.
fn scrape() -> HashMap<String, f64> {
    let mut stream = TcpStream::connect(METRICS).expect("metrics endpoint listens");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// The digest as docs/config-aware-reloads.md tells a user to compute it, run by `sh` with
/// coreutils' `sha256sum` and findutils' `find`.
fn shell_digest(paths: &[&Path]) -> String {
    let script = r#"{ for p in "$@"; do
          if [ -d "$p" ]; then find -L "$p" -name '..?*' -prune -o -type f -print0
          else printf '%s\0' "$p"; fi
        done; } | LC_ALL=C sort -zu | xargs -0 sha256sum | sha256sum | cut -d' ' -f1"#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(paths)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(digest.len(), 64, "{digest:?}");
    digest
}

fn reloads_succeeded(instance: &Instance) -> u64 {
    instance.status().reloads_succeeded
}

/// Generation numbers `status` lists.
fn generation_numbers(instance: &Instance) -> BTreeSet<u64> {
    instance
        .status()
        .generations
        .iter()
        .map(|g| g.generation)
        .collect()
}

/// `nginx -t` for the generation being started, as `--check`.
fn nginx_check(nginx: &Nginx) -> String {
    let d = nginx.dir.path().display();
    format!(
        "/usr/sbin/nginx -t -q -c {d}/nginx.conf -g 'pid {d}/check-{{generation}}.pid; \
         include {d}/gen-{{generation}}.conf;'"
    )
}

/// A config broken the way a typo breaks it: nginx's own error names it.
const TYPO: &str = "bogus_directive on;\n";
const NGINX_SAYS: &str = "unknown directive \"bogus_directive\"";

#[test]
fn a_failing_check_starts_nothing_and_the_old_generation_keeps_serving() {
    privileged();
    let nginx = Nginx::new(ADDR, 4);
    let conf = nginx.dir.path().join("nginx.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    let check = nginx_check(&nginx);
    let command = nginx.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance = Instance::start_in(
        nginx.dir,
        &[
            "--listen",
            ADDR,
            "--drain-signal",
            "QUIT",
            "--drain-timeout",
            "10s",
            "--metrics",
            METRICS,
            "--check",
            &check,
        ],
        &command,
    );
    let controller = instance.pid();
    let load = Load::start(addr(), 4);
    wait_for("load answered", Duration::from_secs(5), || {
        load::request(addr()) == Ok(1)
    });
    let children = process::live_children(controller);
    let generations = generation_numbers(&instance);

    std::fs::write(&conf, format!("{good}{TYPO}")).unwrap();
    // `reload --wait` as a person runs it: non-zero, nginx's own words.
    let out = instance.client(&["reload", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the reload must fail: {stderr}");
    assert!(stderr.contains(NGINX_SAYS), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
    assert!(stderr.contains("generation 1 is still active"), "{stderr}");
    // And for scripts.
    let reload = instance.reload_wait();
    let report = reload.failed();
    assert!(report.check_failed, "{reload}");
    let tail = &report.stderr_tail;
    assert!(tail.iter().any(|l| l.contains(NGINX_SAYS)), "{tail:?}");

    // Nothing was started: the controller has the same children, no new
    // generation is listed, no number was used, generation 1 is active.
    assert_eq!(process::live_children(controller), children);
    assert_eq!(generation_numbers(&instance), generations);
    assert_eq!(instance.active_generation(), Some(1));
    let status = instance.status();
    assert_eq!(status.reloads_failed, 2);
    assert_eq!(status.reloads_succeeded, 0);
    let metrics = scrape();
    assert_eq!(metrics["reloader_reload_check_failures_total"], 2.0);
    assert_eq!(metrics["reloader_reloads_total{result=\"failed\"}"], 2.0);
    assert_eq!(metrics["reloader_config_last_reload_successful"], 0.0);

    // Fixed: the next reload passes the check and takes the next number.
    std::fs::write(&conf, &good).unwrap();
    let reload = instance.reload_wait();
    assert!(reload.ok(), "{reload}\n{}", instance.log_text());
    assert_eq!(reload.done().generation, 2, "a failed check used no number");
    assert_eq!(scrape()["reloader_config_last_reload_successful"], 1.0);
    wait_for("generation 2 answers", Duration::from_secs(5), || {
        load::request(addr()) == Ok(2)
    });
    let report = load.finish();
    report.assert_no_failures();
    let served = report.by_generation();
    assert!(
        served.contains_key(&1) && served.contains_key(&2),
        "{served:?}"
    );
    println!(
        "check: {} connections under 2 refused reloads and 1 reload, 0 failed; {served:?}",
        report.total()
    );
    assert!(instance.stop().success());
}

#[test]
fn a_failing_check_at_first_start_makes_run_fail_with_its_output() {
    privileged();
    let nginx = Nginx::new(ADDR, 1);
    let dir = nginx.dir.path().to_owned();
    let conf = dir.join("nginx.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}{TYPO}")).unwrap();
    let check = nginx_check(&nginx);
    let command = nginx.command();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut instance =
        Instance::spawn_in(nginx.dir, &["--listen", ADDR, "--check", &check], &command);
    let status = instance.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = instance.log_text();
    assert!(
        log.contains("reloader: the first generation did not start: --check")
            && log.contains(NGINX_SAYS),
        "{log}"
    );
    // nginx never ran (it writes its pid file when it starts).
    assert!(!dir.join("nginx-1.pid").exists(), "nginx was started");
}

/// Asserts that `change` triggers exactly one reload, within a second (its
/// generation spawned); returns how long the trigger took.
fn exactly_one_reload(instance: &Instance, change: impl FnOnce()) -> Duration {
    let before = reloads_succeeded(instance);
    let next = generation_numbers(instance).last().copied().unwrap_or(0) + 1;
    change();
    // Triggered within a second: the new generation has been spawned (it
    // is in `status` from its spawn on). How long it then takes to become
    // ready is the server's start, slower in a TCG guest than here.
    let changed = Instant::now();
    wait_for("a reload after the change", Duration::from_secs(1), || {
        generation_numbers(instance).contains(&next)
    });
    let took = changed.elapsed();
    wait_for("the reload to complete", Duration::from_secs(30), || {
        reloads_succeeded(instance) > before
    });
    // No second one: nothing more happens for another second.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(1) {
        assert_eq!(reloads_succeeded(instance), before + 1, "a second reload");
        assert!(
            !generation_numbers(instance).contains(&(next + 1)),
            "a second reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    took
}

#[test]
fn watch_reloads_once_after_an_atomic_rename() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let file = conf.join("app.conf");
    std::fs::write(&file, "v1\n").unwrap();
    let watch = file.display().to_string();
    let mut instance = Instance::start_in(
        dir,
        &["--listen", ADDR, "--settle", "50ms", "--watch", &watch],
        &[testserver(), "--listen", ADDR],
    );
    // Reading the file (the server, a backup) is not a change.
    let _ = std::fs::read(&file).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reloads_succeeded(&instance), 0);
    let took = exactly_one_reload(&instance, || {
        let tmp = conf.join(".app.conf.swp");
        std::fs::write(&tmp, "v2\n").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    });
    assert_eq!(instance.active_generation(), Some(2));
    println!("atomic rename: 1 reload, spawned {took:?} after the rename");
    assert!(instance.stop().success());
}

/// The layout kubelet's atomic writer keeps in a ConfigMap volume.
struct ConfigMap {
    dir: PathBuf,
    version: u32,
}

impl ConfigMap {
    fn new(dir: PathBuf, content: &str) -> Self {
        std::fs::create_dir(&dir).unwrap();
        let mut map = Self { dir, version: 0 };
        map.update(content);
        symlink("..data/nginx.conf", map.dir.join("nginx.conf")).unwrap();
        map
    }

    /// A new timestamped directory, `..data` swapped to it by renaming a
    /// new symlink over it, the old directory removed.
    fn update(&mut self, content: &str) {
        self.version += 1;
        let ts = format!(
            "..2026_11_23_10_00_{:02}.{}",
            self.version,
            1000 + self.version
        );
        std::fs::create_dir(self.dir.join(&ts)).unwrap();
        std::fs::write(self.dir.join(&ts).join("nginx.conf"), content).unwrap();
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&ts, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

#[test]
fn watch_reloads_once_after_a_configmap_symlink_swap() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let mut map = ConfigMap::new(dir.path().join("config"), "v1\n");
    let file = map.dir.join("nginx.conf");
    let (watch, config) = (file.display().to_string(), map.dir.display().to_string());
    let mut instance = Instance::start_in(
        dir,
        &[
            "--listen", ADDR, "--settle", "50ms", "--watch", &watch, "--config", &config,
        ],
        &[testserver(), "--listen", ADDR],
    );
    let v1 = shell_digest(&[&map.dir]);
    assert_eq!(instance.status().active_config_sha256, Some(v1.clone()));
    let took = exactly_one_reload(&instance, || map.update("v2\n"));
    let v2 = shell_digest(&[&map.dir]);
    assert_ne!(v1, v2);
    assert_eq!(instance.generation(2).config_sha256, Some(v2.clone()));
    assert_eq!(instance.status().active_config_sha256, Some(v2.clone()));
    // Same content under a new timestamp: same identity.
    exactly_one_reload(&instance, || map.update("v2\n"));
    assert_eq!(instance.status().active_config_sha256, Some(v2));
    println!("ConfigMap swap: 1 reload, spawned {took:?} after the swap");
    assert!(instance.stop().success());
}

#[test]
fn a_burst_of_writes_is_one_or_two_reloads() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let file = conf.join("app.conf");
    std::fs::write(&file, "0\n").unwrap();
    let watch = conf.display().to_string();
    let mut instance = Instance::start_in(
        dir,
        &["--listen", ADDR, "--settle", "50ms", "--watch", &watch],
        &[testserver(), "--listen", ADDR],
    );
    // 20 writes 5 ms apart (100 ms). What makes them one burst is that no
    // two are 200 ms apart (the debounce) and all fit in 2 s (its cap): a
    // loaded machine may stretch the sleeps, which changes neither, so
    // only those are checked (CI once saw the 20 writes take 513 ms).
    let t0 = Instant::now();
    let (mut last, mut widest) = (t0, Duration::ZERO);
    for i in 1..=20 {
        std::fs::write(&file, format!("{i}\n")).unwrap();
        let now = Instant::now();
        widest = widest.max(now - last);
        last = now;
        std::thread::sleep(Duration::from_millis(5));
    }
    let writing = t0.elapsed();
    assert!(
        widest < Duration::from_millis(150) && writing < Duration::from_millis(1500),
        "not one burst: writes up to {widest:?} apart, {writing:?} in all (the machine is too \
         loaded for this test)"
    );
    wait_for("a reload after the burst", Duration::from_secs(3), || {
        reloads_succeeded(&instance) >= 1
    });
    std::thread::sleep(Duration::from_secs(1));
    let reloads = reloads_succeeded(&instance);
    assert!(
        (1..=2).contains(&reloads),
        "{reloads} reloads for one burst"
    );
    println!("20 writes in {writing:?}: {reloads} reload(s)");
    assert!(instance.stop().success());
}

#[test]
fn the_digest_is_the_shell_recipe_everywhere_it_is_shown() {
    privileged();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(conf.join("sites")).unwrap();
    std::fs::write(conf.join("main.conf"), "main\n").unwrap();
    std::fs::write(conf.join("sites/a.conf"), "a\n").unwrap();
    std::fs::write(conf.join("sites/a-b.conf"), "ab\n").unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "cert\n").unwrap();
    let (conf_arg, cert_arg) = (conf.display().to_string(), cert.display().to_string());
    let mut instance = Instance::start_in(
        dir,
        &[
            "--listen",
            ADDR,
            "--metrics",
            METRICS,
            "--config",
            &conf_arg,
            "--config",
            &cert_arg,
        ],
        &[testserver(), "--listen", ADDR],
    );
    let expected = shell_digest(&[&conf, &cert]);
    let status = instance.status();
    assert_eq!(status.active_config_sha256, Some(expected.clone()));
    assert_eq!(instance.generation(1).config_sha256, Some(expected.clone()));
    let human = String::from_utf8(instance.client(&["status"]).stdout).unwrap();
    assert!(
        human.contains(&format!("active config sha256 {expected}")),
        "{human}"
    );
    let metrics = scrape();
    assert_eq!(
        metrics[&format!("reloader_active_config_info{{config_sha256=\"{expected}\"}}")],
        1.0
    );
    assert_eq!(
        metrics
            [&format!("reloader_generation_info{{generation=\"1\",config_sha256=\"{expected}\"}}")],
        1.0
    );
    assert_eq!(metrics["reloader_config_last_reload_successful"], 1.0);
    assert!(metrics["reloader_config_last_reload_success_timestamp_seconds"] > 1.7e9);

    // A change: reload --wait prints the new digest.
    std::fs::write(conf.join("sites/a.conf"), "a2\n").unwrap();
    let changed = shell_digest(&[&conf, &cert]);
    assert_ne!(changed, expected);
    let out = instance.client(&["reload", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("config sha256 {changed}")), "{text}");
    let reload = instance.reload_wait();
    assert_eq!(reload.done().config_sha256, Some(changed.clone()));
    let metrics = scrape();
    assert_eq!(
        metrics[&format!("reloader_active_config_info{{config_sha256=\"{changed}\"}}")],
        1.0
    );
    assert!(
        !metrics.contains_key(&format!(
            "reloader_active_config_info{{config_sha256=\"{expected}\"}}"
        )),
        "only the active config"
    );

    // A restarted controller still knows which config its adopted
    // generation serves (the state file records it).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    instance.wait_exit(Duration::from_secs(10));
    instance.respawn();
    instance.wait_active(Duration::from_secs(30));
    assert_eq!(instance.status().active_config_sha256, Some(changed));
    assert!(instance.stop().success());
}
