//! Runs the real `reloader` binary as a test would run it from a shell.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The `reloader` binary: `$RELOADER_BIN`, or the one next to the test
/// executable (`cargo xtask test` builds it before the tests).
pub fn reloader_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("RELOADER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("reloader");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p reloader`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// A copy of the `reloader` binary in a fresh directory every user can
/// enter, for tests that run it as another user: the checkout (and so
/// `target/`) may sit where others cannot (a clone under /root, mode 0700).
/// The copy lives as long as the returned directory; run it with that
/// directory as its working directory.
pub fn reloader_bin_for_any_user() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    let bin = dir.path().join("reloader");
    // Copied by `cp`, not by this process: a test thread that forks while
    // this process holds the copy open for writing would keep it open in
    // its child, and executing the copy would fail with ETXTBSY.
    let copied = Command::new("cp")
        .arg(reloader_bin())
        .arg(&bin)
        .status()
        .expect("run cp");
    assert!(copied.success(), "copy the reloader binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .expect("chmod reloader copy");
    (dir, bin)
}

/// A `reloader run` controller started by a test.
pub struct Instance {
    child: Option<Child>,
    /// How the controller was started, for [`Instance::respawn`].
    command: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Every generation pid seen, for cleanup and leak checks.
    pub pids: Vec<u32>,
    /// The controller's stderr is a pipe nobody reads (it stays open in
    /// `child.stderr`).
    unread_stderr: bool,
}

impl Instance {
    /// Starts `reloader run ARGS -- SERVER` and waits until its first
    /// generation is active.
    pub fn start(args: &[&str], server: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, args, server)
    }

    /// As [`Instance::start`], in a directory the test prepared.
    pub fn start_in(dir: tempfile::TempDir, args: &[&str], server: &[&str]) -> Self {
        let instance = Self::spawn_in(dir, args, server);
        instance.wait_active(Duration::from_secs(30));
        instance
    }

    /// Starts the controller without waiting for anything.
    pub fn spawn_in(dir: tempfile::TempDir, args: &[&str], server: &[&str]) -> Self {
        Self::spawn_with_env(dir, args, server, &[])
    }

    /// As [`Instance::spawn_in`], with extra environment for the controller.
    pub fn spawn_with_env(
        dir: tempfile::TempDir,
        args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_wrapped(dir, &[], args, server, env)
    }

    /// As [`Instance::spawn_with_env`], with the controller started through
    /// `wrapper` (e.g. `unshare --pid --fork`).
    pub fn spawn_wrapped(
        dir: tempfile::TempDir,
        wrapper: &[&str],
        args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_wrapped_with(dir, wrapper, args, server, env, true)
    }

    fn spawn_wrapped_with(
        dir: tempfile::TempDir,
        wrapper: &[&str],
        args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
        start: bool,
    ) -> Self {
        let socket = dir.path().join("control.sock");
        let log = dir.path().join("reloader.log");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(reloader_bin());
                c
            }
            None => Command::new(reloader_bin()),
        };
        command
            .arg("run")
            .arg("--control-socket")
            .arg(&socket)
            .args(args)
            .arg("--")
            .args(server);
        let mut instance = Self {
            child: None,
            command: std::iter::once(command.get_program().to_owned())
                .chain(command.get_args().map(ToOwned::to_owned))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
            socket,
            log,
            pids: Vec::new(),
            unread_stderr: false,
        };
        if start {
            instance.respawn();
        }
        instance
    }

    /// As [`Instance::start`], with the controller's stderr a pipe that is
    /// never read (it fills after 64 KiB).
    pub fn start_with_unread_stderr(args: &[&str], server: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut instance = Self::spawn_wrapped_with(dir, &[], args, server, &[], false);
        instance.unread_stderr = true;
        instance.respawn();
        instance.wait_active(Duration::from_secs(30));
        instance
    }

    /// Starts the controller (again, after the previous one exited or was
    /// killed) with the same command line, appending to the same log.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "the previous controller still runs");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let stderr = if self.unread_stderr {
            Stdio::piped()
        } else {
            Stdio::from(log.try_clone().expect("log"))
        };
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("RELOADER_LOG", "info,reloader=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .expect("spawn reloader run");
        self.child = Some(child);
    }

    /// Runs a `reloader` client subcommand against this instance.
    pub fn client(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(reloader_bin());
        cmd.arg(args[0])
            .arg("--control-socket")
            .arg(&self.socket)
            .args(&args[1..]);
        cmd.output().expect("run reloader client")
    }

    /// `reloader status --json`.
    pub fn status(&self) -> Value {
        let out = self.client(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// `reloader reload --wait --json`: (succeeded, response).
    pub fn reload_wait(&mut self) -> (bool, Value) {
        let out = self.client(&["reload", "--wait", "--json", "--timeout", "120s"]);
        let value: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "reload answer is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        self.remember_pids();
        (out.status.success(), value)
    }

    /// Generation `number` as `status --json` lists it.
    pub fn generation(&self, number: u64) -> Value {
        self.status()["generations"]
            .as_array()
            .expect("generations")
            .iter()
            .find(|g| g["generation"] == number)
            .cloned()
            .unwrap_or_else(|| panic!("generation {number} is not listed"))
    }

    /// Starts `server` (the test server) under reloader with `--mode-file`:
    /// `initial` (if any) are extra server flags for generation 1, removed
    /// once it started; a test writes the file to change how later
    /// generations start. Returns the mode file's path.
    pub fn with_mode_file(
        server: &str,
        addr: &str,
        args: &[&str],
        initial: Option<&str>,
    ) -> (Self, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mode_file = dir.path().join("mode");
        if let Some(mode) = initial {
            std::fs::write(&mode_file, mode).expect("mode file");
        }
        let mode_arg = mode_file.display().to_string();
        let instance = Self::start_in(
            dir,
            args,
            &[server, "--listen", addr, "--mode-file", &mode_arg],
        );
        if initial.is_some() {
            std::fs::remove_file(&mode_file).expect("mode file");
        }
        (instance, mode_file)
    }

    /// The generation active on the first listener.
    pub fn active_generation(&self) -> Option<u64> {
        self.status()["listeners"][0]["active_generation"].as_u64()
    }

    /// Waits until some generation is active.
    pub fn wait_active(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.client(&["status", "--json"]);
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
                if status["listeners"][0]["active_generation"]
                    .as_u64()
                    .is_some()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no active generation within {timeout:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records the pids of the generations `status` lists.
    pub fn remember_pids(&mut self) {
        // The controller's children from procfs first: a hung or killed
        // controller cannot name them, and a generation orphaned by a
        // failed test must not outlive it.
        if let Some(child) = &self.child {
            for pid in crate::process::children(child.id()) {
                if !self.pids.contains(&pid) {
                    self.pids.push(pid);
                }
            }
        }
        let out = self.client(&["status", "--json"]);
        if let Ok(status) = serde_json::from_slice::<Value>(&out.stdout) {
            for g in status["generations"].as_array().into_iter().flatten() {
                if let Some(pid) = g["pid"].as_u64()
                    && !self.pids.contains(&(pid as u32))
                {
                    self.pids.push(pid as u32);
                }
            }
        }
    }

    /// `reloader stop`, then waits for the controller; returns its exit
    /// status.
    pub fn stop(&mut self) -> ExitStatus {
        self.remember_pids();
        let out = self.client(&["stop", "--timeout", "60s"]);
        assert!(
            out.status.success(),
            "stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_exit(Duration::from_secs(60))
    }

    /// Waits for the controller to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("controller running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "controller did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The controller's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The controller's log so far (server stderr included).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Stop the controller if it still runs, then kill whatever it ran
        // (it may already be gone, e.g. killed by the test), so nothing
        // outlives the test.
        if let Some(mut child) = self.child.take() {
            self.remember_pids();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A controller killed by the test leaves its pinned maps behind (by
        // design: a successor adopts them); remove them with the test.
        let args: Vec<&str> = self.command.iter().filter_map(|a| a.to_str()).collect();
        let name = args
            .windows(2)
            .find(|w| w[0] == "--name")
            .map_or("default", |w| w[1]);
        reloader::steering::Steering::unpin(&reloader::state::saved::pin_dir(name, &self.socket));
        for pid in &self.pids {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::thread::panicking() {
            eprintln!("--- reloader log ---\n{}", self.log_text());
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub use crate::process::alive as process_alive;
