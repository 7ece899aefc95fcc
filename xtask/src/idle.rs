//! `cargo xtask idle`: an idle controller's wake-ups per second, without
//! and with `--watch` (issue 17: nothing may poll while nothing changes).
//!
//! Each case starts `reloader run` around the test server in a network
//! namespace of its own, lets start-up settle, and counts the context
//! switches of every thread of the controller over `--seconds` (each is a
//! wake-up, or a preemption) from `/proc/PID/task/*/status`, the way the
//! benchmark's idle measurement does. Then it changes a watched file once
//! and checks that exactly that one reload happened, so the watch measured
//! is a working one. As root; three cases of `--seconds` each.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Not the tests' 8080: the `sock_ops` listen notifier sees listens in
/// every network namespace of the controller's cgroup (it filters by
/// address only), so tests or benches listening on the same address
/// elsewhere on the host would wake this controller and be measured too.
const ADDR: &str = "127.0.0.1:18120";

/// One measured case.
struct Case {
    name: &'static str,
    wakeups_per_s: f64,
    voluntary: u64,
    nonvoluntary: u64,
    threads: usize,
    rss_kib: u64,
}

pub fn run(seconds: f64) -> Result<()> {
    let root = crate::workspace_root();
    crate::run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "reloader",
        "-p",
        "reloader-tests",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release");
    let (reloader, testserver) = (target.join("reloader"), target.join("testserver"));
    let mut cases = Vec::new();
    for (name, watch) in [
        ("no --watch", None),
        ("--watch FILE", Some(false)),
        ("--watch DIR", Some(true)),
    ] {
        let (reloader, testserver) = (reloader.clone(), testserver.clone());
        let case = std::thread::spawn(move || {
            reloader_tests::privileged();
            measure(name, &reloader, &testserver, watch, seconds)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;
        cases.push(case);
    }
    println!(
        "\n| idle controller ({seconds:.0} s each) | wake-ups/s | voluntary | nonvoluntary | threads | RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for c in &cases {
        println!(
            "| {} | {:.2} | {} | {} | {} | {:.1} MiB |",
            c.name,
            c.wakeups_per_s,
            c.voluntary,
            c.nonvoluntary,
            c.threads,
            c.rss_kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// One controller, idle for `seconds`; `watch`: none, a file, or its
/// directory.
fn measure(
    name: &'static str,
    reloader: &Path,
    testserver: &Path,
    watch: Option<bool>,
    seconds: f64,
) -> Result<Case> {
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf)?;
    let file = conf.join("app.conf");
    std::fs::write(&file, "1\n")?;
    let socket = dir.path().join("control.sock");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--control-socket".into(),
        socket.display().to_string(),
        "--listen".into(),
        ADDR.into(),
    ];
    match watch {
        Some(false) => args.extend(["--watch".into(), file.display().to_string()]),
        Some(true) => args.extend(["--watch".into(), conf.display().to_string()]),
        None => {}
    }
    args.extend([
        "--".into(),
        testserver.display().to_string(),
        "--listen".into(),
        ADDR.into(),
    ]);
    let mut controller = Controller(
        Command::new(reloader)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start reloader run")?,
    );
    let status = || -> Result<Value> {
        let out = Command::new(reloader)
            .args(["status", "--json", "--control-socket"])
            .arg(&socket)
            .output()?;
        ensure!(out.status.success(), "status failed");
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status().is_ok_and(|s| s["listeners"][0]["active_generation"].is_u64()) {
        if Instant::now() > deadline {
            bail!("{name}: no active generation within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let start-up settle before counting (the generation's start, the
    // blocking threads it used going idle).
    std::thread::sleep(Duration::from_secs(15));
    let pid = controller.0.id();
    let before = per_thread(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (voluntary, nonvoluntary, threads) = switches_between(&before, &per_thread(pid)?);
    let elapsed = t0.elapsed().as_secs_f64();
    let rss_kib = procfs::process::Process::new(pid as i32)?
        .status()?
        .vmrss
        .unwrap_or(0);
    if watch.is_some() {
        // The watch measured works: one change, one reload.
        std::fs::write(&file, "2\n")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while status()?["reloads_succeeded"] != 1 {
            if Instant::now() > deadline {
                bail!("{name}: the change made no reload within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let stopped = Command::new(reloader)
        .args(["stop", "--control-socket"])
        .arg(&socket)
        .output()?;
    ensure!(stopped.status.success(), "{name}: stop failed");
    let _ = controller.0.wait();
    Ok(Case {
        name,
        wakeups_per_s: (voluntary + nonvoluntary) as f64 / elapsed,
        voluntary,
        nonvoluntary,
        threads,
        rss_kib,
    })
}

/// Each thread of `pid` with its (voluntary, nonvoluntary) context switches.
pub fn per_thread(pid: u32) -> Result<BTreeMap<i32, (u64, u64)>> {
    let mut threads = BTreeMap::new();
    for task in procfs::process::Process::new(pid as i32)?.tasks()? {
        let task = task?;
        let status = task.status()?;
        threads.insert(
            task.tid,
            (
                status.voluntary_ctxt_switches.unwrap_or(0),
                status.nonvoluntary_ctxt_switches.unwrap_or(0),
            ),
        );
    }
    Ok(threads)
}

/// Context switches between two [`per_thread`] samples: (voluntary,
/// nonvoluntary, threads at the end). A thread born in between counts from
/// zero; one that exited in between (tokio's blocking pool lets an idle
/// thread go after 10 s) is not counted, so threads are matched by id
/// rather than summed (a sum can shrink).
pub fn switches_between(
    before: &BTreeMap<i32, (u64, u64)>,
    after: &BTreeMap<i32, (u64, u64)>,
) -> (u64, u64, usize) {
    let (mut voluntary, mut nonvoluntary) = (0, 0);
    for (tid, &(v, n)) in after {
        let (v0, n0) = before.get(tid).copied().unwrap_or((0, 0));
        voluntary += v.saturating_sub(v0);
        nonvoluntary += n.saturating_sub(n0);
    }
    (voluntary, nonvoluntary, after.len())
}

/// The controller, killed with what it runs if a measurement fails.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_matched_by_thread_and_an_exited_thread_does_not_subtract() {
        let before = BTreeMap::from([(1, (100, 10)), (2, (50, 5))]);
        // Thread 2 exited, thread 3 was born.
        let after = BTreeMap::from([(1, (103, 11)), (3, (2, 1))]);
        assert_eq!(switches_between(&before, &after), (5, 2, 2));
    }
}
