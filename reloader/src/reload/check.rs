//! The pre-flight check (`--check CMD`): runs before a new generation is
//! spawned, so a configuration the server would refuse (`nginx -t`,
//! `haproxy -c`, `envoy --mode validate`) fails the reload at once, with
//! the server's own words, instead of after a spawn, a timeout or a crash
//! loop.
//!
//! The check is our child like a generation is, so its exit goes through
//! the instance's reaper: it is claimed ([`crate::supervisor::spawn_claimed`])
//! so the reaper hands its status here. Its stdout and stderr share one
//! pipe, so their lines keep their order; the last lines are kept for the
//! report, every line is logged at debug level. It gets
//! `RELOADER_GENERATION` (the number the new generation will get) and
//! `RELOADER_NAME` like a server, stdin from /dev/null, and is killed with
//! its process group when it does not finish in time or the reload is
//! cancelled. The drain command (`--drain-command`, [`super::drain`]) is
//! run the same way ([`execute`]).

use std::{
    collections::VecDeque,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::debug;

use crate::{
    config::{CheckCommand, substitute},
    error::ReloadError,
    generation::human_duration,
    supervisor,
};

/// Output lines kept for the report.
const TAIL_LINES: usize = 20;
/// Longest line kept; the rest is cut.
const MAX_LINE: usize = 4096;
/// How long output still in the pipe is read after the check exited (a
/// child that escaped its process group may hold the pipe open).
const DRAIN_OUTPUT: Duration = Duration::from_millis(500);

/// Runs `check` for generation `generation` of instance `name`; fails
/// unless it exits with status 0 within `timeout`.
pub async fn run(
    check: &CheckCommand,
    name: &str,
    generation: u64,
    timeout: Duration,
) -> Result<(), ReloadError> {
    let ran = execute(check, name, generation, None, timeout, "--ready-timeout")
        .await
        .map_err(|source| ReloadError::CheckSpawnError {
            command: check.text.clone(),
            source,
        })?;
    if ran.ok {
        return Ok(());
    }
    Err(ReloadError::CheckFailed {
        command: check.text.clone(),
        how: ran.how,
        output: ran.output,
    })
}

/// How a helper command ran.
#[derive(Clone, Debug)]
pub struct Ran {
    /// It exited with status 0.
    pub ok: bool,
    /// How it ended: `exited with status 0`, `killed by SIGSEGV`, `did not
    /// finish within 30s (--drain-timeout; killed)`.
    pub how: String,
    /// Its last lines of output (stdout and stderr, in order).
    pub output: Vec<String>,
    /// From its spawn to its exit (or to its kill).
    pub duration: Duration,
}

/// Runs `command` (`{generation}`, and `{pid}` when given, replaced) as a
/// claimed child of instance `name`, for at most `timeout` (named by
/// `limit` in the message when it is killed). Err: it could not be
/// started.
pub async fn execute(
    command: &CheckCommand,
    name: &str,
    generation: u64,
    pid: Option<u32>,
    timeout: Duration,
    limit: &'static str,
) -> std::io::Result<Ran> {
    let t0 = std::time::Instant::now();
    let argv = substitute(&command.argv, generation, pid);
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env("RELOADER_GENERATION", generation.to_string())
        .env("RELOADER_NAME", name)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write));
    // The fork and exec run on a blocking thread. The reaper owns its
    // exit; our copies of the pipe's write end go with the command, so the
    // pipe ends when the check's own copies close.
    let (child, mut claim) = tokio::task::spawn_blocking(move || {
        let spawned = supervisor::spawn_claimed(&mut command);
        drop(command);
        spawned
    })
    .await
    .map_err(std::io::Error::other)??;
    drop(child);
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(read)
        .map(|pipe| tokio::spawn(read_lines(pipe, tail.clone(), generation)))?;

    let exit = tokio::time::timeout(timeout, claim.exited()).await;
    let duration = t0.elapsed();
    let ok = matches!(&exit, Ok(Some(exit)) if exit.code == Some(0));
    let how = match exit {
        Ok(Some(exit)) => exit.how,
        Ok(None) => "was not reaped (the controller is stopping)".into(),
        Err(_) => {
            claim.kill();
            // Reaped by the instance's reaper; not waited for here.
            format!(
                "did not finish within {} ({limit}; killed)",
                human_duration(timeout)
            )
        }
    };
    let _ = tokio::time::timeout(DRAIN_OUTPUT, reader).await;
    let output: Vec<String> = tail.lock().expect("check output").iter().cloned().collect();
    Ok(Ran {
        ok,
        how,
        output,
        duration,
    })
}

/// Reads the check's output until the pipe closes, keeping the last lines.
async fn read_lines(
    pipe: tokio::net::unix::pipe::Receiver,
    tail: Arc<Mutex<VecDeque<String>>>,
    generation: u64,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        buf.truncate(MAX_LINE);
        let line = String::from_utf8_lossy(&buf).into_owned();
        debug!(generation, "check: {line}");
        let mut lines = tail.lock().expect("check output");
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::cli::parse_check;

    /// The instance's reaper, for the children of these tests only (other
    /// tests of this binary reap their own): claimed ones are delivered.
    fn reaper() -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {
            loop {
                let flags = nix::sys::wait::WaitPidFlag::WEXITED
                    | nix::sys::wait::WaitPidFlag::WNOHANG
                    | nix::sys::wait::WaitPidFlag::WNOWAIT;
                // Only our claimed children: look each up by pid.
                for pid in supervisor::claimed_pids() {
                    let id = nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid as i32));
                    if let Ok(status) = nix::sys::wait::waitid(id, flags)
                        && let Some(exit) = supervisor::describe(status)
                    {
                        supervisor::deliver_claimed(&exit);
                        supervisor::reap(exit.pid);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_passing_check_gets_the_generation_number() {
        let _reaping = supervisor::REAPING.lock().await;
        let reaper = reaper();
        let dir = tempfile::tempdir().unwrap();
        let check = parse_check(&format!(
            "sh -c 'echo $RELOADER_GENERATION {{generation}} > {}/out'",
            dir.path().display()
        ))
        .unwrap();
        run(&check, "t", 7, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "7 7\n"
        );
        reaper.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_check_reports_what_it_printed_in_order() {
        let _reaping = supervisor::REAPING.lock().await;
        let reaper = reaper();
        let check = parse_check("sh -c 'echo out; echo err >&2; echo last >&2; exit 3'").unwrap();
        let error = run(&check, "t", 2, Duration::from_secs(10))
            .await
            .unwrap_err();
        match &error {
            ReloadError::CheckFailed { how, output, .. } => {
                assert_eq!(how, "exited with status 3");
                assert_eq!(output, &["out", "err", "last"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(error.to_string().contains("nothing was started"), "{error}");
        reaper.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_hanging_check_is_killed_at_the_timeout() {
        let _reaping = supervisor::REAPING.lock().await;
        let reaper = reaper();
        let check = parse_check("sleep 60").unwrap();
        let t0 = Instant::now();
        let error = run(&check, "t", 2, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            error.to_string().contains("did not finish within"),
            "{error}"
        );
        reaper.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_missing_program_is_a_spawn_error() {
        let check = parse_check("/nonexistent/check -t").unwrap();
        let error = run(&check, "t", 2, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ReloadError::CheckSpawnError { .. }),
            "{error:?}"
        );
    }
}
