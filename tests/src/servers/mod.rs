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
//! What the tests check about a generation's sockets rests on procfs:
//! `/proc/PID/net/tcp{,6}` lists the listening sockets of PID's network
//! namespace with their inodes, `/proc/PID/fd` says which processes hold
//! them.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
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

/// One response's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answer {
    pub generation: u64,
    pub pid: Option<u32>,
    pub thread: Option<u32>,
    /// `caddy=2.6`: which binary answered, where a generation's command picks one.
    pub label: Option<String>,
}

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
/// and the identity of whoever answered.
pub fn request(addr: SocketAddr) -> Result<Answer, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read ({} bytes so far): {e}", response.len()))?;
    let text = String::from_utf8_lossy(&response);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("short or bad response: {text:?}"));
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    parse_answer(body).ok_or_else(|| format!("no gen=N in {body:?}"))
}

/// `gen=N pid=P thread=T caddy=L` (only `gen` required).
pub fn parse_answer(body: &str) -> Option<Answer> {
    let mut answer = Answer {
        generation: 0,
        pid: None,
        thread: None,
        label: None,
    };
    let mut generation = None;
    for word in body.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "gen" => generation = value.parse().ok(),
            "pid" => answer.pid = value.parse().ok(),
            "thread" => answer.thread = value.parse().ok(),
            "caddy" if !value.is_empty() => answer.label = Some(value.to_owned()),
            _ => {}
        }
    }
    answer.generation = generation?;
    Some(answer)
}

/// `ppid` of every process.
fn parents() -> BTreeMap<u32, u32> {
    let mut map = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: fields start
        // after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        if state == Some("Z") {
            continue;
        }
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// The live children of `pid`.
pub fn children(pid: u32) -> BTreeSet<u32> {
    parents()
        .into_iter()
        .filter(|(_, ppid)| *ppid == pid)
        .map(|(p, _)| p)
        .collect()
}

/// `pid` and all its live descendants.
pub fn tree(pid: u32) -> BTreeSet<u32> {
    let parents = parents();
    let mut tree = BTreeSet::from([pid]);
    loop {
        let before = tree.len();
        for (p, ppid) in &parents {
            if tree.contains(ppid) {
                tree.insert(*p);
            }
        }
        if tree.len() == before {
            return tree;
        }
    }
}

/// The listening TCP sockets on `addr`'s port in `pid`'s network namespace:
/// inode → the processes of `holders_among` that hold it.
pub fn listeners(
    pid: u32,
    addr: SocketAddr,
    holders_among: &BTreeSet<u32>,
) -> BTreeMap<u64, BTreeSet<u32>> {
    let mut inodes = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // 0A: TCP_LISTEN.
            if *state == "0A"
                && port == Some(addr.port())
                && let Ok(inode) = inode.parse::<u64>()
            {
                inodes.insert(inode, BTreeSet::new());
            }
        }
    }
    for holder in holders_among {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|i| i.parse::<u64>().ok());
            if let Some(set) = inode.and_then(|i| inodes.get_mut(&i)) {
                set.insert(*holder);
            }
        }
    }
    inodes.retain(|_, holders| !holders.is_empty());
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_generation_pid_thread_and_label() {
        assert_eq!(
            parse_answer("gen=3 pid=42 thread=1\n"),
            Some(Answer {
                generation: 3,
                pid: Some(42),
                thread: Some(1),
                label: None
            })
        );
        assert_eq!(
            parse_answer("gen=2 caddy=2.11\n").map(|a| (a.pid, a.label)),
            Some((None, Some("2.11".to_owned())))
        );
        // Caddy with an unset label answers `caddy=`.
        assert_eq!(parse_answer("gen=1 caddy=").unwrap().label, None);
        assert_eq!(parse_answer("pid=42"), None);
        assert_eq!(parse_answer(""), None);
    }
}
