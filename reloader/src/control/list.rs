//! `reloader list`: the instances on this host the caller can reach. Their
//! control sockets are found where `reloader run` puts them by default
//! (`/run/reloader` as root, `$XDG_RUNTIME_DIR/reloader`,
//! `/tmp/reloader-UID`; as root also every user's) and in the directories
//! given; each is asked for its status with a short timeout. A socket
//! nothing answers on (a controller that was killed left it behind) is
//! stale and skipped; one the caller may not talk to (another user's) is
//! counted apart.

// The CLI (no runtime): directory reads and the blocking control client.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::BTreeSet,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ClientError, Request, Response, client};
use crate::status::{Column, StatusReport, render};

/// One instance that answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedInstance {
    pub name: String,
    /// The controller's pid.
    pub pid: u32,
    pub socket: PathBuf,
    /// As given to `--listen`.
    pub listeners: Vec<String>,
    /// The generation active on the first listener.
    pub active_generation: Option<u64>,
    /// Generations that run now (active, canary, held, draining, starting).
    pub live_generations: usize,
    /// The active generation's config digest (`--config`).
    pub active_config_sha256: Option<String>,
}

/// What `list` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub instances: Vec<ListedInstance>,
    /// Sockets nothing answers on.
    pub stale: Vec<PathBuf>,
    /// Sockets that could not be asked, and why (another user's instance,
    /// or one too busy to answer in time).
    pub unreachable: Vec<Unreachable>,
}

/// A socket that could not be asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreachable {
    pub socket: PathBuf,
    pub why: String,
}

/// Where `reloader run` puts control sockets by default, for the caller:
/// its own default directory, and as root every user's too.
pub fn default_directories() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/run/reloader")];
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR") {
        dirs.push(PathBuf::from(xdg).join("reloader"));
    }
    let uid = nix::unistd::geteuid();
    dirs.push(std::env::temp_dir().join(format!("reloader-{uid}")));
    if uid.is_root() {
        let users = std::fs::read_dir("/run/user")
            .into_iter()
            .flatten()
            .flatten();
        dirs.extend(users.map(|user| user.path().join("reloader")));
        let temp = std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten();
        dirs.extend(
            temp.filter(|e| e.file_name().to_string_lossy().starts_with("reloader-"))
                .map(|e| e.path()),
        );
    }
    dirs
}

/// The control sockets (`*.sock` that are sockets) in `dirs`, each once.
pub fn sockets(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
            if is_socket && path.extension().is_some_and(|e| e == "sock") {
                seen.insert(std::fs::canonicalize(&path).unwrap_or(path));
            }
        }
    }
    seen.into_iter().collect()
}

/// Asks the controller on each of `sockets` for its status, `timeout`
/// each.
pub fn list(sockets: &[PathBuf], timeout: Duration) -> Listing {
    let mut listing = Listing::default();
    for socket in sockets {
        match client::ask(socket, &Request::Status {}, timeout) {
            Ok(Response::Status { status }) => {
                listing.instances.push(listed(socket, &status));
            }
            Ok(other) => listing.unreachable.push(Unreachable {
                socket: socket.clone(),
                why: format!("answered {other:?}"),
            }),
            Err(ClientError::Unreachable { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                listing.stale.push(socket.clone());
            }
            Err(ClientError::Unreachable { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                listing.unreachable.push(Unreachable {
                    socket: socket.clone(),
                    why: "permission denied: another user's instance (root's: `sudo reloader \
                          list`)"
                        .into(),
                });
            }
            Err(error) => listing.unreachable.push(Unreachable {
                socket: socket.clone(),
                why: crate::error_chain(&error),
            }),
        }
    }
    listing
        .instances
        .sort_by(|a, b| (&a.name, &a.socket).cmp(&(&b.name, &b.socket)));
    listing
}

fn listed(socket: &Path, status: &StatusReport) -> ListedInstance {
    ListedInstance {
        name: status.name.clone(),
        pid: status.pid,
        socket: socket.to_path_buf(),
        listeners: status.listeners.iter().map(|l| l.addr.clone()).collect(),
        active_generation: status.listeners.first().and_then(|l| l.active_generation),
        live_generations: status
            .generations
            .iter()
            .filter(|g| g.state.is_live())
            .count(),
        active_config_sha256: status.active_config_sha256.clone(),
    }
}

impl Listing {
    /// The table of instances, then a line per socket skipped.
    pub fn human(&self) -> String {
        const COLUMNS: [Column; 6] = [
            Column::left("NAME"),
            Column::right("PID"),
            Column::right("ACTIVE"),
            Column::right("LIVE"),
            Column::left("LISTENERS"),
            Column::left("SOCKET"),
        ];
        let mut text = if self.instances.is_empty() {
            "no instance answered\n".to_owned()
        } else {
            let rows = self.instances.iter().map(|i| {
                [
                    i.name.clone(),
                    i.pid.to_string(),
                    i.active_generation.map_or("-".into(), |g| g.to_string()),
                    i.live_generations.to_string(),
                    i.listeners.join(", "),
                    i.socket.display().to_string(),
                ]
            });
            render(&COLUMNS, rows) + "\n"
        };
        for socket in &self.stale {
            text.push_str(&format!(
                "skipped {}: stale (nothing answers; a controller that was killed left it)\n",
                socket.display()
            ));
        }
        for u in &self.unreachable {
            text.push_str(&format!("skipped {}: {}\n", u.socket.display(), u.why));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// Only sockets named `*.sock` count; a socket whose listener is gone
    /// is stale.
    #[test]
    fn finds_control_sockets_and_skips_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("gone.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let _other = UnixListener::bind(dir.path().join("web.keeper")).unwrap();
        std::fs::write(dir.path().join("plain.sock"), "not a socket").unwrap();
        let found = sockets(&[dir.path().to_path_buf(), dir.path().join("missing")]);
        let canonical = std::fs::canonicalize(&stale).unwrap();
        assert_eq!(found, vec![canonical.clone()]);
        let listing = list(&found, Duration::from_millis(200));
        assert_eq!(listing.stale, vec![canonical]);
        assert!(listing.instances.is_empty() && listing.unreachable.is_empty());
        assert!(
            listing.human().contains("gone.sock: stale"),
            "{}",
            listing.human()
        );
    }
}
