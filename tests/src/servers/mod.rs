//! Real servers as a user would wrap them with `reloader run`: each module
//! writes the server's own config file (the binary is unmodified) and says
//! how to start it, how it drains, and which of its processes or threads
//! must answer. The servers are installed by `cargo xtask test` (Debian
//! packages, and PyPI packages in `target/venv`); a missing one is a test
//! failure that says so.
//!
//! Every server answers `gen=N` (the `RELOADER_GENERATION` the controller
//! gives each generation) and, where the server can say it, `pid=P` and
//! `thread=T`, so a test can tell which generation, worker process and
//! thread served a connection.
//!
//! What the tests check about a generation's sockets rests on sock_diag
//! (the listening sockets of the test's network namespace) and procfs
//! (which processes hold them), through reloader's own discovery.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

pub mod apache;
pub mod asyncio;
pub mod caddy;
pub mod go;
pub mod gunicorn;
pub mod haproxy;
pub mod nginx;

/// A server, configured for one test.
pub struct Server {
    /// What it is, for messages and the summary: "HAProxy 2.6 nbthread 2".
    pub name: String,
    /// The version the binary reports.
    pub version: String,
    /// The server command for `reloader run` (may contain `{generation}`).
    pub command: Vec<String>,
    /// `reloader run` options besides `--listen`: drain signal, probe.
    pub options: Vec<String>,
    /// Environment for the controller (the servers inherit it).
    pub env: Vec<(String, String)>,
    /// Which processes and threads of a generation must answer.
    pub answerers: Answerers,
    /// The `caddy=LABEL` generation N must answer with, where the command
    /// picks a binary per generation.
    pub label: Option<fn(u64) -> String>,
    /// The config files; also the instance's directory.
    pub dir: tempfile::TempDir,
}

/// Who serves connections in one generation's process tree.
#[derive(Clone, Copy, Debug)]
pub enum Answerers {
    /// The generation's own process (Go, Python, Caddy, HAProxy `-db`),
    /// with this many threads that each answer (`thread=T`), or 1.
    Process { threads: u32 },
    /// Every child of the generation's process (nginx and Apache workers,
    /// gunicorn workers, the HAProxy master's worker), each with this many
    /// answering threads.
    Children { threads: u32 },
}

pub use reloader::demo::load::Answer;

/// The workspace root (tests/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The venv `cargo xtask test` installs the PyPI servers into.
pub fn venv() -> PathBuf {
    workspace_root().join("target/venv")
}

/// `--drain-signal SIGNAL`, and a readiness probe (HTTP `GET /`, 2xx)
/// through the new generation's own listener.
pub fn probe_options(drain: &str, addr: &str) -> Vec<String> {
    vec![
        "--drain-signal".into(),
        drain.into(),
        "--ready-probe".into(),
        format!("http://{addr}/"),
    ]
}

/// Panics, saying how to install it, unless `path` exists.
pub fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} is not installed ({} is missing): run `cargo xtask test`, which installs \
         every server the tests wrap",
        path.display()
    );
}

/// A temporary directory every user can read: servers that drop privileges
/// (Apache's children, nginx's workers) read their files from it.
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    dir
}

/// Writes `contents` to `dir/name` (readable by everyone) and returns the
/// path as a string.
pub fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("chmod config file");
    path.display().to_string()
}

/// The first line `program args` prints (stdout or stderr), for versions.
pub fn version_of(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} {args:?}: {e}"));
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// One new connection: `GET /` with `Connection: close`, a complete `200`,
/// and the identity of whoever answered (which must name its generation).
pub fn request(addr: SocketAddr) -> Result<Answer, String> {
    let answer = crate::load::answer(addr)?;
    match answer.generation {
        Some(_) => Ok(answer),
        None => Err(format!("no gen=N in the answer {answer:?}")),
    }
}

pub use crate::process::{live_children as children, tree};

/// The listening TCP sockets on `addr`'s port (this network namespace,
/// from sock_diag): inode → the processes of `holders_among` that hold it.
pub fn listeners(addr: SocketAddr, holders_among: &BTreeSet<u32>) -> BTreeMap<u64, BTreeSet<u32>> {
    let listening = reloader::discovery::listeners().expect("sock_diag");
    let pids: Vec<u32> = holders_among.iter().copied().collect();
    let mut inodes: BTreeMap<u64, BTreeSet<u32>> = listening
        .iter()
        .filter(|l| l.addr.port() == addr.port())
        .map(|l| (l.inode, BTreeSet::new()))
        .collect();
    for pid in pids {
        for inode in reloader::discovery::socket_holders(&[pid]).into_keys() {
            if let Some(holders) = inodes.get_mut(&inode) {
                holders.insert(pid);
            }
        }
    }
    inodes.retain(|_, holders| !holders.is_empty());
    inodes
}
