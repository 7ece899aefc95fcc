//! Runs the real `reloader` binary as a test would run it from a shell.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use reloader::{
    control::Response,
    status::{GenerationStatus, ReloadReport, ReloadResult, StatusReport},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::wait::wait_for;

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

    /// As [`Instance::start`], named `name` and with its control socket
    /// where `reloader run` puts it by default (`/run/reloader/NAME.sock`
    /// as root): where `reloader list` looks without being told.
    pub fn start_named(name: &str, args: &[&str], server: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = reloader::config::default_control_socket(name);
        let mut named = vec!["--name", name];
        named.extend_from_slice(args);
        let mut instance = Self::spawn_at(dir, Some(socket), &[], &named, server, &[], true);
        instance.remember_pids();
        instance.wait_active(Duration::from_secs(30));
        instance
    }

    fn spawn_wrapped_with(
        dir: tempfile::TempDir,
        wrapper: &[&str],
        args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
        start: bool,
    ) -> Self {
        Self::spawn_at(dir, None, wrapper, args, server, env, start)
    }

    /// Starts the controller with its control socket at `socket`, passed
    /// as `--control-socket`, or in `dir` when none is given.
    fn spawn_at(
        dir: tempfile::TempDir,
        default_socket: Option<PathBuf>,
        wrapper: &[&str],
        args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
        start: bool,
    ) -> Self {
        let pass_socket = default_socket.is_none();
        let socket = default_socket.unwrap_or_else(|| dir.path().join("control.sock"));
        let log = dir.path().join("reloader.log");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(reloader_bin());
                c
            }
            None => Command::new(reloader_bin()),
        };
        command.arg("run");
        if pass_socket {
            command.arg("--control-socket").arg(&socket);
        }
        command.args(args).arg("--").args(server);
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
    #[track_caller]
    pub fn status(&self) -> StatusReport {
        let out = self.client(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        decode("`status --json`", &out.stdout)
    }

    /// `reloader status --json`, or `None` while the controller does not
    /// answer (not yet listening on its socket, or gone).
    #[track_caller]
    pub fn try_status(&self) -> Option<StatusReport> {
        let out = self.client(&["status", "--json"]);
        if out.status.success() {
            Some(decode("`status --json`", &out.stdout))
        } else {
            None
        }
    }

    /// Polls `status --json` until `condition` holds (the controller may
    /// not answer meanwhile, e.g. while it restarts) and returns that
    /// status; panics naming `what`, with the last status, after `within`.
    #[track_caller]
    pub fn wait_status(
        &self,
        what: impl fmt::Display,
        within: Duration,
        condition: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        wait_for(what, within, || match self.try_status() {
            Some(status) if condition(&status) => Ok(status),
            Some(status) => Err(format!("{status:#?}")),
            None => Err("the controller does not answer".into()),
        })
    }

    /// `reloader reload --wait --json` (see [`reload_wait`]).
    /// `reload` without `--wait`, then waits until generation `number` is
    /// active (not for the previous one to exit: tests where it holds
    /// connections).
    #[track_caller]
    pub fn reload_to(&self, number: u64) {
        let out = self.client(&["reload"]);
        assert!(
            out.status.success(),
            "reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_status(
            format_args!("generation {number} active"),
            Duration::from_secs(30),
            |s| s.active_generation() == Some(number),
        );
    }

    pub fn reload_wait(&mut self) -> Reload {
        self.reload_wait_with(&[])
    }

    /// `reloader reload --wait --json ARGS` (see [`reload_wait`]).
    pub fn reload_wait_with(&mut self, args: &[&str]) -> Reload {
        let reload = reload_wait(&self.socket, args);
        self.remember_pids();
        reload
    }

    /// Generation `number` as `status --json` lists it.
    #[track_caller]
    pub fn generation(&self, number: u64) -> GenerationStatus {
        self.status().generation(number).clone()
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
    #[track_caller]
    pub fn active_generation(&self) -> Option<u64> {
        self.status().active_generation()
    }

    /// Whether the controller answers and every listener has an active
    /// generation.
    #[track_caller]
    pub fn serving(&self) -> bool {
        self.try_status().is_some_and(|status| {
            !status.listeners.is_empty()
                && status
                    .listeners
                    .iter()
                    .all(|l| l.active_generation.is_some())
        })
    }

    /// Waits until every listener has an active generation; panics at once
    /// if the controller exits first.
    #[track_caller]
    pub fn wait_active(&self, timeout: Duration) {
        wait_for("a generation active on every listener", timeout, || {
            assert!(
                crate::process::alive(self.pid()),
                "the controller exited before a generation was active on every listener"
            );
            self.serving()
        });
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
        // Leniently decoded: this runs in `drop`, also while a test
        // panics, and a controller that does not answer has no pids to add.
        let out = self.client(&["status", "--json"]);
        if let Ok(status) = serde_json::from_slice::<StatusReport>(&out.stdout) {
            for pid in status.generations.iter().filter_map(|g| g.pid) {
                if !self.pids.contains(&pid) {
                    self.pids.push(pid);
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
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("controller running");
        let status = wait_for("the controller to exit", timeout, || {
            child.try_wait().expect("try_wait")
        });
        self.child = None;
        status
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

/// Lookups in a [`StatusReport`] the tests make often.
pub trait StatusExt {
    /// The generation active on the first listener.
    fn active_generation(&self) -> Option<u64>;
    /// Generation `number`, if listed.
    fn find_generation(&self, number: u64) -> Option<&GenerationStatus>;
    /// Generation `number`; panics if it is not listed.
    fn generation(&self, number: u64) -> &GenerationStatus;
}

impl StatusExt for StatusReport {
    #[track_caller]
    fn active_generation(&self) -> Option<u64> {
        self.listeners
            .first()
            .expect("status lists the instance's listeners")
            .active_generation
    }

    fn find_generation(&self, number: u64) -> Option<&GenerationStatus> {
        self.generations.iter().find(|g| g.generation == number)
    }

    #[track_caller]
    fn generation(&self, number: u64) -> &GenerationStatus {
        self.find_generation(number).unwrap_or_else(|| {
            panic!(
                "generation {number} is not listed (generations {:?})",
                self.generations
                    .iter()
                    .map(|g| g.generation)
                    .collect::<Vec<_>>()
            )
        })
    }
}

/// Decodes what reloader printed (`what`, for messages) into the product's
/// own type, strictly: the JSON must be exactly what the type encodes to.
/// serde alone would fill a field the output lacks (renamed, say) with its
/// default when the type marks it `#[serde(default)]`, and a test reading
/// it would see 0 or `None` instead of failing.
#[track_caller]
pub fn decode<T: DeserializeOwned + Serialize>(what: &str, json: &[u8]) -> T {
    let text = String::from_utf8_lossy(json);
    let raw: Value = serde_json::from_slice(json)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {text:?}"));
    let typed: T = serde_json::from_value(raw.clone()).unwrap_or_else(|e| {
        panic!(
            "{what} does not decode as {} ({e}): {text}",
            std::any::type_name::<T>()
        )
    });
    let again = serde_json::to_value(&typed).expect("the product's types encode");
    let mut differences = Vec::new();
    differ(&raw, &again, "", &mut differences);
    assert!(
        differences.is_empty(),
        "{what} is not what {} encodes to: {}\n{text}",
        std::any::type_name::<T>(),
        differences.join("; ")
    );
    typed
}

/// Where `printed` and `typed` differ, as paths (`.listeners[0].bridged`).
fn differ(printed: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (printed, typed) {
        (Value::Object(p), Value::Object(t)) => {
            for (key, value) in p {
                match t.get(key) {
                    Some(other) => differ(value, other, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key} is printed but not in the type")),
                }
            }
            for key in t.keys().filter(|k| !p.contains_key(*k)) {
                out.push(format!("{path}.{key} is in the type but not printed"));
            }
        }
        (Value::Array(p), Value::Array(t)) if p.len() == t.len() => {
            for (i, (value, other)) in p.iter().zip(t).enumerate() {
                differ(value, other, &format!("{path}[{i}]"), out);
            }
        }
        _ if printed != typed => out.push(format!("{path}: printed {printed}, typed {typed}")),
        _ => {}
    }
}

/// What `reloader reload --wait --json` answered, and how it exited.
#[derive(Debug)]
pub struct Reload {
    /// The exit code: 0 when the reload completed, 3 when it was rolled
    /// back, 1 when it failed or was refused ([`reload_wait`] checks it
    /// agrees with the response).
    pub code: i32,
    pub response: Response,
}

impl Reload {
    /// Whether the reload completed (exit code 0).
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// The report, unless the controller refused the request.
    pub fn report(&self) -> Option<&ReloadReport> {
        match &self.response {
            Response::ReloadDone { report }
            | Response::ReloadFailed { report }
            | Response::ReloadRolledBack { report } => Some(report),
            _ => None,
        }
    }

    /// The report of a reload that completed; panics with the answer
    /// otherwise.
    #[track_caller]
    pub fn done(&self) -> &ReloadReport {
        self.expect(ReloadResult::Succeeded)
    }

    /// The report of a reload that failed; panics with the answer otherwise.
    #[track_caller]
    pub fn failed(&self) -> &ReloadReport {
        self.expect(ReloadResult::Failed)
    }

    /// The report of a reload rolled back; panics with the answer otherwise.
    #[track_caller]
    pub fn rolled_back(&self) -> &ReloadReport {
        self.expect(ReloadResult::RolledBack)
    }

    #[track_caller]
    fn expect(&self, result: ReloadResult) -> &ReloadReport {
        let report = match (&self.response, result) {
            (Response::ReloadDone { report }, ReloadResult::Succeeded)
            | (Response::ReloadFailed { report }, ReloadResult::Failed)
            | (Response::ReloadRolledBack { report }, ReloadResult::RolledBack) => report,
            _ => panic!("expected a reload that {}, got {self}", result.as_str()),
        };
        assert_eq!(
            report.result, result,
            "the report disagrees with the response: {self}"
        );
        report
    }

    /// Why it did not complete: the report's error and the new
    /// generation's last stderr lines, or the controller's refusal.
    pub fn why(&self) -> String {
        match &self.response {
            Response::Error { message } | Response::Busy { message } => message.clone(),
            _ => match self.report() {
                Some(report) => format!(
                    "{} {:?}",
                    report.error.as_deref().unwrap_or("(no error)"),
                    report.stderr_tail
                ),
                None => self.to_string(),
            },
        }
    }
}

impl fmt::Display for Reload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string_pretty(&self.response).map_err(|_| fmt::Error)?;
        write!(f, "exit code {}: {json}", self.code)
    }
}

/// Runs `reloader reload --wait --json ARGS` against the control socket
/// `socket` (with `--timeout 120s` unless ARGS give one), decodes its
/// answer and checks the exit code agrees with it. Callable from any
/// thread; [`Instance::reload_wait`] is the usual way.
#[track_caller]
pub fn reload_wait(socket: &Path, args: &[&str]) -> Reload {
    let mut command = Command::new(reloader_bin());
    command
        .args(["reload", "--wait", "--json", "--control-socket"])
        .arg(socket)
        .args(args);
    if !args.contains(&"--timeout") {
        command.args(["--timeout", "120s"]);
    }
    let out = command.output().expect("run reloader reload");
    let what = format!(
        "`reload --wait --json {}` (stderr: {})",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let response: Response = decode(&what, &out.stdout);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{what} was killed: {}", out.status));
    let expected = match &response {
        Response::ReloadDone { .. } => 0,
        Response::ReloadRolledBack { .. } => 3,
        Response::ReloadFailed { .. } | Response::Error { .. } | Response::Busy { .. } => 1,
        other => panic!("{what} answered {other:?}"),
    };
    let reload = Reload { code, response };
    assert_eq!(
        code, expected,
        "{what}: the exit code disagrees with {reload}"
    );
    reload
}

#[cfg(test)]
mod tests {
    use reloader::status::{RollbackReport, StatusReport};

    use super::decode;

    #[test]
    fn decode_reads_what_the_type_encodes_to() {
        let json = br#"{"from": 2, "to": 1, "map_update_us": 3.5, "from_exited_ms": null}"#;
        let report: RollbackReport = decode("rollback", json);
        assert_eq!((report.from, report.to, report.map_update_us), (2, 1, 3.5));
        let status = serde_json::to_vec(&StatusReport::default()).unwrap();
        let _: StatusReport = decode("status", &status);
    }

    /// serde alone reads a missing `Option` field as `None`.
    #[test]
    #[should_panic(expected = ".from_exited_ms is in the type but not printed")]
    fn decode_refuses_a_missing_field() {
        let _: RollbackReport =
            decode("rollback", br#"{"from": 2, "to": 1, "map_update_us": 3.5}"#);
    }

    /// A field renamed in the output: the old name is missing, the new one
    /// unknown to the type.
    #[test]
    #[should_panic(expected = ".from_exited is printed but not in the type")]
    fn decode_refuses_a_renamed_field() {
        let _: RollbackReport = decode(
            "rollback",
            br#"{"from": 2, "to": 1, "map_update_us": 3.5, "from_exited": 7.0}"#,
        );
    }

    /// `#[serde(default)]` fields (most of `StatusReport`'s) are filled in
    /// when missing.
    #[test]
    #[should_panic(expected = ".log_lines_dropped is in the type but not printed")]
    fn decode_refuses_a_defaulted_field() {
        let mut status = serde_json::to_value(StatusReport::default()).unwrap();
        status.as_object_mut().unwrap().remove("log_lines_dropped");
        let _: StatusReport = decode("status", &serde_json::to_vec(&status).unwrap());
    }
}
