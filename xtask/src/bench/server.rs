//! The servers the bench reloads, and the process and namespace plumbing
//! the scenarios share.
//!
//! The test server and nginx run two worker processes, each with its own
//! `SO_REUSEPORT` listener; HAProxy (`-db`, `nbthread 2`) one process whose
//! two threads share one listener. Each answers `gen=N` (N from the
//! generation number) so the load client can tell which generation served
//! each connection or request.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use reloader_tests::nginx::Nginx;

pub const ADDR: &str = "127.0.0.1:8080";
const PORT: u16 = 8080;
pub const NGINX: &str = "/usr/sbin/nginx";
pub const HAPROXY: &str = "/usr/sbin/haproxy";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "`TestServer` is the test server binary's name, not a suffix"
)]
pub enum Server {
    /// This repository's test server (`tests/bin/testserver.rs`).
    TestServer,
    /// Debian's nginx.
    Nginx,
    /// Debian's HAProxy.
    Haproxy,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::TestServer => "testserver",
            Server::Nginx => "nginx",
            Server::Haproxy => "haproxy",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "testserver" => Ok(Server::TestServer),
            "nginx" => Ok(Server::Nginx),
            "haproxy" => Ok(Server::Haproxy),
            other => bail!("unknown server {other:?}: testserver, nginx or haproxy"),
        }
    }

    /// Fails, saying what to install, when the server's binary is missing.
    pub fn check_installed(self) -> Result<()> {
        let (binary, package) = match self {
            Server::TestServer => return Ok(()),
            Server::Nginx => (NGINX, "nginx-light"),
            Server::Haproxy => (HAPROXY, "haproxy"),
        };
        if !Path::new(binary).exists() {
            bail!(
                "{binary} is missing: `apt-get install {package}` (or leave {} out of --servers)",
                self.name()
            );
        }
        Ok(())
    }

    /// Its graceful stop (HAProxy: soft-stop).
    pub fn drain_signal(self) -> Signal {
        match self {
            Server::TestServer => Signal::SIGTERM,
            Server::Nginx => Signal::SIGQUIT,
            Server::Haproxy => Signal::SIGUSR1,
        }
    }

    /// The same, as `reloader run --drain-signal` takes it.
    pub fn drain_signal_name(self) -> &'static str {
        match self {
            Server::TestServer => "TERM",
            Server::Nginx => "QUIT",
            Server::Haproxy => "USR1",
        }
    }

    /// Listening sockets one generation opens.
    pub fn sockets_per_generation(self) -> usize {
        match self {
            // Two worker processes, one socket each.
            Server::TestServer | Server::Nginx => 2,
            // Two threads sharing one socket.
            Server::Haproxy => 1,
        }
    }
}

/// Configuration lines added to a server's own (the keep-alive remedies).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Extra {
    /// nginx: main context; HAProxy: `global` section.
    pub global: Vec<String>,
    /// nginx: every generation's `http` block; HAProxy: `defaults`.
    pub http: Vec<String>,
}

impl Extra {
    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.http.is_empty()
    }
}

/// What a server needs on disk for one scenario, and its command line.
pub struct Setup {
    pub server: Server,
    pub dir: tempfile::TempDir,
    testserver: PathBuf,
    /// The nginx configs, one per generation (the same as the tests').
    nginx: Option<Nginx>,
}

impl Setup {
    /// Prepares `server` for up to `generations` generations.
    pub fn new(server: Server, testserver: &Path, generations: u64) -> Result<Self> {
        Self::with_extra(server, testserver, generations, &Extra::default())
    }

    /// As [`Setup::new`], with `extra` lines in the server's configuration
    /// (nginx and HAProxy only).
    pub fn with_extra(
        server: Server,
        testserver: &Path,
        generations: u64,
        extra: &Extra,
    ) -> Result<Self> {
        let dir = tempfile::tempdir().context("failed to create a scratch directory")?;
        let lines = |lines: &[String], indent: &str| {
            lines
                .iter()
                .map(|l| format!("{indent}{l}\n"))
                .collect::<String>()
        };
        let nginx = match server {
            Server::Nginx => Some(Nginx::with_directives(
                ADDR,
                generations,
                &lines(&extra.global, ""),
                &lines(&extra.http, ""),
            )),
            Server::Haproxy => {
                write_haproxy_configs(dir.path(), generations, extra)?;
                None
            }
            Server::TestServer => {
                anyhow::ensure!(extra.is_empty(), "the test server takes no configuration");
                None
            }
        };
        Ok(Self {
            server,
            dir,
            testserver: testserver.to_path_buf(),
            nginx,
        })
    }

    /// The command line; `{generation}` stands for the generation number
    /// (reloader substitutes it; [`Setup::command_for`] does for the plain
    /// reloads).
    pub fn command(&self) -> Vec<String> {
        match (&self.nginx, self.server) {
            (Some(nginx), _) => nginx.command(),
            (None, Server::Haproxy) => vec![
                HAPROXY.into(),
                "-db".into(),
                "-f".into(),
                format!("{}/haproxy-{{generation}}.cfg", self.dir.path().display()),
            ],
            // Like nginx, its graceful stop closes accepted connections it
            // has not read a request from yet.
            (None, _) => reloader_tests::testserver_command(&self.testserver, ADDR),
        }
    }

    pub fn command_for(&self, generation: u64) -> Vec<String> {
        self.command()
            .into_iter()
            .map(|a| a.replace("{generation}", &generation.to_string()))
            .collect()
    }

    /// Where server output goes.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
}

/// One HAProxy config per generation, answering `gen=N pid=P`. HAProxy
/// sets `SO_REUSEPORT` by default; `-db` keeps it in the foreground, one
/// process, and `USR1` is its soft-stop.
fn write_haproxy_configs(dir: &Path, generations: u64, extra: &Extra) -> Result<()> {
    let indented = |lines: &[String]| {
        lines
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let (global, defaults) = (indented(&extra.global), indented(&extra.http));
    for g in 1..=generations {
        let path = dir.join(format!("haproxy-{g}.cfg"));
        std::fs::write(
            &path,
            format!(
                "global\n    nbthread 2\n{global}\
                 defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    \
                 timeout server 30s\n{defaults}\
                 frontend fe\n    bind {ADDR}\n    http-request return status 200 \
                 content-type text/plain lf-string \"gen={g} pid=%pid\\n\"\n"
            ),
        )
        .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

/// A process the bench started in its own process group; killed (the
/// whole group) when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub pid: u32,
}

impl Proc {
    /// Starts `argv` in a new process group, output appended to `log`.
    pub fn spawn(argv: &[String], envs: &[(&str, String)], log: &Path) -> Result<Self> {
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("failed to open {}", log.display()))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {argv:?}"))?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
        })
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
    }

    /// Waits up to `timeout` for the process to exit; then kills its group.
    /// Returns whether it exited by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                self.child = None;
                // Whatever it left in its group (it should have reaped it).
                let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                return Ok(true);
            }
            if Instant::now() > deadline {
                self.kill();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn kill(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Listening TCP sockets on the bench port in the calling *thread's*
/// network namespace, from `NETLINK_SOCK_DIAG` (reloader's own discovery:
/// `/proc/net/tcp` would list every TIME_WAIT socket of the run too, and
/// reading it takes longer than a reload).
pub fn listening_sockets() -> Result<usize> {
    let listeners = reloader::discovery::listeners().context("failed to list listening sockets")?;
    Ok(listeners.iter().filter(|l| l.addr.port() == PORT).count())
}

/// Waits until exactly `expected` sockets listen on the bench port, and
/// still do 20 ms later (the readiness rule reloader applies too: nginx
/// opens one socket per worker, one after another).
pub fn wait_listening(expected: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if listening_sockets()? == expected {
            std::thread::sleep(Duration::from_millis(20));
            if listening_sockets()? == expected {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} sockets listen on port {PORT} after {timeout:?}, expected {expected}",
                listening_sockets()?
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `f` on a new thread in a new network namespace with `lo` up; the
/// processes it starts inherit the namespace. Nothing reaches the host's
/// network, and per-namespace sysctls stay in the namespace.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        // Checks root and enters the namespace (as the privileged tests do).
        reloader_tests::privileged();
        f()
    })
    .join()
    .map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow::anyhow!("the scenario thread panicked: {msg}")
    })?
}

pub const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req` in the calling thread's network
/// namespace and puts the old value back when dropped.
pub struct MigrateReq {
    old: String,
}

impl MigrateReq {
    pub fn set(value: bool) -> Result<Self> {
        let old = std::fs::read_to_string(MIGRATE_SYSCTL)
            .with_context(|| format!("failed to read {MIGRATE_SYSCTL}"))?;
        write_sysctl(if value { "1" } else { "0" })?;
        Ok(Self { old })
    }
}

fn write_sysctl(value: &str) -> Result<()> {
    std::fs::write(MIGRATE_SYSCTL, value)
        .with_context(|| format!("failed to write {value} to {MIGRATE_SYSCTL}"))?;
    let now = std::fs::read_to_string(MIGRATE_SYSCTL)?;
    anyhow::ensure!(
        now.trim() == value,
        "{MIGRATE_SYSCTL} reads {now:?} after writing {value}"
    );
    Ok(())
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        if let Err(e) = write_sysctl(self.old.trim()) {
            eprintln!("bench: failed to restore {MIGRATE_SYSCTL}: {e:#}");
        }
    }
}

/// `net.ipv4.tcp_migrate_req` as the calling thread sees it.
pub fn migrate_req() -> Result<String> {
    Ok(std::fs::read_to_string(MIGRATE_SYSCTL)?.trim().to_owned())
}
