//! What each generation holds now — its established connections, memory,
//! CPU time and processes — read from the kernel when `status` or a scrape
//! asks (on a blocking thread; nothing is sampled while nobody asks).
//!
//! Connections are counted exactly, from one `sock_diag` dump of the
//! established TCP sockets on the managed ports, each attributed by
//! [`attribute`]:
//!
//! 1. A connection the steering program migrated — from a closing
//!    listener's queue, or from the bridge — is the generation the program
//!    sent it to: the program records each migrated socket's cookie and
//!    the slot's epoch (`MIGRATED`, see `reloader-ebpf`), and sock_diag
//!    reports the same cookie.
//! 2. Any other connection is the generation whose cgroup its socket
//!    records (`INET_DIAG_CGROUP_ID`). An accepted socket records the cgroup
//!    of the *listener* it was created from, not of the process that
//!    accepts it (verified on 6.18: a listener made in cgroup A, its
//!    process moved to B, then `accept`: the socket is in A); a connection
//!    that was never migrated was accepted from the listener of the
//!    generation that holds it.
//! 3. A connection in the controller's cgroup that was not migrated waits
//!    on the bridge (no generation listened when it arrived): it is no
//!    generation's yet.
//!
//! A record outlives its connection until the next count forgets it (the
//! map is read before the dump, so a connection migrated in between is
//! never forgotten while it lives); the map forgets its least recently
//! written records when full.
//!
//! Memory (`memory.current`), CPU time (`cpu.stat`) and processes
//! (`cgroup.procs`, the whole subtree) come from each generation's cgroup.
//! What cannot be known is `None`, with the reason in `unavailable`.

#![allow(clippy::disallowed_methods)] // cgroupfs reads and a netlink dump: on blocking threads only

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::debug;

mod dump;
mod held;

#[cfg(test)]
pub use dump::Activity;
pub use dump::{Connection, TCP_CLOSE_WAIT, TCP_ESTABLISHED};

use crate::{
    net::Transport,
    status::StatusReport,
    steering::{BRIDGE_EPOCH, MigrationLog},
};

/// What [`attribute`] needs to know about the instance.
#[derive(Debug, Default)]
pub struct Owners {
    /// cgroup id (the directory's inode) → generation.
    pub cgroups: HashMap<u64, u64>,
    /// Slot epoch (the generation number, truncated) → generation, for the
    /// live generations.
    pub epochs: HashMap<u32, u64>,
    /// The controller's own cgroup id: where bridge listeners are made.
    pub controller: Option<u64>,
}

/// Connections counted per generation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub generations: BTreeMap<u64, u64>,
    /// Waiting on a bridge.
    pub bridged: u64,
    /// Neither migrated nor in a live generation's cgroup (another
    /// process's on the same port, or a record the map forgot).
    pub unknown: u64,
}

/// Whose a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Generation(u64),
    /// Waiting on a bridge.
    Bridged,
    Unknown,
}

/// Whose connection `c` is (module comment).
pub fn owner(c: &Connection, migrated: &HashMap<u64, u32>, owners: &Owners) -> Owner {
    let record = migrated.get(&c.cookie);
    let generation = match record {
        Some(&BRIDGE_EPOCH) => None,
        Some(epoch) => owners.epochs.get(epoch).copied(),
        None => c.cgroup_id.and_then(|id| owners.cgroups.get(&id).copied()),
    };
    match generation {
        Some(generation) => Owner::Generation(generation),
        None if record == Some(&BRIDGE_EPOCH)
            || (c.cgroup_id.is_some() && c.cgroup_id == owners.controller) =>
        {
            Owner::Bridged
        }
        None => Owner::Unknown,
    }
}

/// Attributes each connection (module comment).
pub fn attribute(
    connections: &[Connection],
    migrated: &HashMap<u64, u32>,
    owners: &Owners,
) -> Counted {
    let mut counted = Counted::default();
    for c in connections {
        match owner(c, migrated, owners) {
            Owner::Generation(generation) => {
                *counted.generations.entry(generation).or_default() += 1;
            }
            Owner::Bridged => counted.bridged += 1,
            Owner::Unknown => counted.unknown += 1,
        }
    }
    counted
}

/// A generation a settle looks at (`reload::settle`).
#[derive(Clone, Debug)]
pub struct Subject {
    pub generation: u64,
    /// Its cgroup: its connections are found by [`owner`]. Without one,
    /// by the sockets its process tree holds (slower: every descriptor).
    pub cgroup: Option<PathBuf>,
    pub pid: Option<u32>,
    /// Its TCP listeners' inodes.
    pub listeners: BTreeSet<u64>,
    /// The managed TCP addresses.
    pub managed: Vec<SocketAddr>,
}

/// What one look at a settling generation found.
#[derive(Clone, Debug, Default)]
pub struct Look {
    /// Connections waiting in its listeners' accept queues.
    pub queued: u64,
    /// Cookies of the handshakes in progress on the managed ports (whose
    /// listener sock_diag does not say).
    pub handshakes: HashSet<u64>,
    /// Its established and close-wait connections, with their `tcp_info`.
    pub connections: Vec<Connection>,
}

/// Looks at what `subject` still holds (blocking: a sock_diag dump per
/// address family, a map read, and without a cgroup a walk of its
/// processes' descriptors).
pub fn look(subject: &Subject, migrations: Option<&MigrationLog>) -> Result<Look, String> {
    let mut look = Look::default();
    if subject.managed.is_empty() {
        return Ok(look);
    }
    let mine = mine(subject, migrations)?;
    let sockets = dump::sockets(&subject.managed, dump::Query::SETTLING)
        .map_err(|e| crate::error_chain(&e))?
        .into_iter()
        .filter(|c| is_managed(&subject.managed, c.local));
    for c in sockets {
        match c.state {
            dump::TCP_LISTEN if subject.listeners.contains(&u64::from(c.inode)) => {
                look.queued += u64::from(c.unread);
            }
            dump::TCP_LISTEN => {}
            dump::TCP_NEW_SYN_RECV | dump::TCP_SYN_RECV => {
                look.handshakes.insert(c.cookie);
            }
            _ if mine(&c) => look.connections.push(c),
            _ => {}
        }
    }
    Ok(look)
}

/// Looks at `subject` through its processes' descriptors ([`held`]): its
/// accept queues from a dump of listeners only (which skips the
/// established hash), taken first, then the connections its processes
/// hold. `None` where descriptors cannot be read or are too many. It
/// shows no handshakes: for kernels that migrate them.
pub fn look_held(subject: &Subject) -> Result<Option<Look>, String> {
    let mut look = Look::default();
    if subject.managed.is_empty() {
        return Ok(Some(look));
    }
    let error = |e: crate::discovery::DiscoveryError| crate::error_chain(&e);
    for c in dump::sockets(&subject.managed, dump::Query::LISTENERS).map_err(error)? {
        if c.state == dump::TCP_LISTEN && subject.listeners.contains(&u64::from(c.inode)) {
            look.queued += u64::from(c.unread);
        }
    }
    let pids = match (&subject.cgroup, subject.pid) {
        (Some(dir), _) => crate::cgroup::members(dir),
        (None, Some(pid)) => crate::discovery::process_tree(pid).map_err(error)?,
        (None, None) => Vec::new(),
    };
    let Some(connections) = held::connections(&pids, &subject.managed, &subject.listeners) else {
        return Ok(None);
    };
    look.connections = connections
        .into_iter()
        .filter(|c| matches!(c.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
        .collect();
    Ok(Some(look))
}

/// [`mine`]'s answer.
type Mine = Box<dyn Fn(&Connection) -> bool>;

/// Whether a connection is `subject`'s: by its listener's cgroup and the
/// migration records, or without a cgroup by the descriptors its
/// processes hold.
fn mine(subject: &Subject, migrations: Option<&MigrationLog>) -> Result<Mine, String> {
    let migrated = match (&subject.cgroup, migrations.map(MigrationLog::read)) {
        (Some(_), Some(Ok(records))) => records,
        (Some(_), Some(Err(error))) => return Err(crate::error_chain(&error)),
        _ => HashMap::new(),
    };
    Ok(match &subject.cgroup {
        Some(dir) => {
            let id = std::fs::metadata(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .ino();
            let owners = Owners {
                cgroups: HashMap::from([(id, subject.generation)]),
                epochs: HashMap::from([(subject.generation as u32, subject.generation)]),
                controller: None,
            };
            let generation = subject.generation;
            Box::new(move |c| owner(c, &migrated, &owners) == Owner::Generation(generation))
        }
        None => {
            let pids = match subject.pid {
                Some(pid) => crate::discovery::process_tree(pid).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            let held = crate::discovery::socket_holders(&pids);
            Box::new(move |c| c.inode != 0 && held.contains_key(&u64::from(c.inode)))
        }
    })
}

/// Whether `local` is one of the `managed` addresses (a wildcard one
/// covers every address of its port).
fn is_managed(managed: &[SocketAddr], local: SocketAddr) -> bool {
    managed
        .iter()
        .any(|m| m.port() == local.port() && (m.ip() == local.ip() || m.ip().is_unspecified()))
}

/// Fills in what each generation of `report` holds now.
pub fn observe(report: &mut StatusReport, migrations: Option<&MigrationLog>) {
    let managed: Vec<SocketAddr> = report
        .listeners
        .iter()
        .filter(|l| l.transport == Transport::Tcp)
        .filter_map(|l| l.addr.parse().ok())
        .collect();
    let connections = count_connections(report, &managed, migrations);
    let no_cgroups = report
        .cgroup_unavailable
        .clone()
        .unwrap_or_else(|| "it has no cgroup".into());
    for g in &mut report.generations {
        if !g.state.is_live() {
            continue;
        }
        let Some(dir) = g.cgroup.clone() else {
            for field in ["connections", "memory_bytes", "cpu_seconds", "processes"] {
                g.unavailable.insert(field.into(), no_cgroups.clone());
            }
            continue;
        };
        let dir = Path::new(&dir);
        match &connections {
            Ok(counted) => {
                g.connections = Some(counted.generations.get(&g.generation).copied().unwrap_or(0));
            }
            Err(why) => {
                g.unavailable.insert("connections".into(), why.clone());
            }
        }
        match std::fs::read_to_string(dir.join("memory.current")) {
            Ok(text) => g.memory_bytes = text.trim().parse().ok(),
            Err(_) => {
                g.unavailable
                    .insert("memory_bytes".into(), MEMORY_UNAVAILABLE.into());
            }
        }
        match std::fs::read_to_string(dir.join("cpu.stat")) {
            Ok(text) => g.cpu_seconds = usage_seconds(&text),
            Err(error) => {
                g.unavailable
                    .insert("cpu_seconds".into(), format!("cpu.stat: {error}"));
            }
        }
        g.processes = Some(crate::cgroup::members(dir).len() as u64);
    }
}

/// Why a generation's memory is not known, where its cgroup has no
/// `memory.current`.
pub const MEMORY_UNAVAILABLE: &str = "the memory controller is not enabled in the generations' \
                                      cgroup v2 (a hybrid host keeps it in cgroup v1; under \
                                      systemd the unit's cgroup enables none for them)";

/// `usage_usec` of a `cpu.stat`, in seconds.
fn usage_seconds(cpu_stat: &str) -> Option<f64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|usec| usec as f64 / 1e6)
}

/// The connections of each generation, and forgets the migration records
/// of connections that closed.
fn count_connections(
    report: &StatusReport,
    managed: &[SocketAddr],
    migrations: Option<&MigrationLog>,
) -> Result<Counted, String> {
    if managed.is_empty() {
        return Ok(Counted::default());
    }
    // Read before the dump: see the module comment.
    let migrated = match migrations.map(MigrationLog::read) {
        Some(Ok(records)) => records,
        Some(Err(error)) => return Err(crate::error_chain(&error)),
        None => HashMap::new(),
    };
    let connections: Vec<Connection> = dump::established(managed)
        .map_err(|e| crate::error_chain(&e))?
        .into_iter()
        .filter(|c| is_managed(managed, c.local))
        .collect();
    let mut owners = Owners {
        controller: crate::cgroup::own()
            .ok()
            .and_then(|(dir, _)| std::fs::metadata(dir).ok())
            .map(|m| m.ino()),
        ..Owners::default()
    };
    for g in report.generations.iter().filter(|g| g.state.is_live()) {
        owners.epochs.insert(g.generation as u32, g.generation);
        if let Some(id) = g
            .cgroup
            .as_deref()
            .and_then(|dir| std::fs::metadata(dir).ok())
        {
            owners.cgroups.insert(id.ino(), g.generation);
        }
    }
    let counted = attribute(&connections, &migrated, &owners);
    if counted.unknown > 0 {
        debug!(
            connections = counted.unknown,
            "connections on managed ports that are no generation's"
        );
    }
    if let Some(log) = migrations {
        let open: HashSet<u64> = connections.iter().map(|c| c.cookie).collect();
        let closed = migrated.keys().copied().filter(|c| !open.contains(c));
        if let Err(error) = log.forget(closed) {
            debug!(error = %crate::error_chain(&error), "forgetting migration records");
        }
    }
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(cookie: u64, cgroup: u64) -> Connection {
        Connection {
            cookie,
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:40000".parse().unwrap(),
            cgroup_id: Some(cgroup),
            state: TCP_ESTABLISHED,
            inode: 0,
            unread: 0,
            unsent: 0,
            activity: None,
        }
    }

    /// Generations 1 (cgroup 100) and 2 (cgroup 200), the controller in 50.
    fn owners() -> Owners {
        Owners {
            cgroups: HashMap::from([(100, 1), (200, 2)]),
            epochs: HashMap::from([(1, 1), (2, 2)]),
            controller: Some(50),
        }
    }

    #[test]
    fn connections_are_counted_by_their_listeners_cgroup() {
        let connections: Vec<_> = (0..7)
            .map(|i| connection(i, 100))
            .chain((7..10).map(|i| connection(i, 200)))
            .collect();
        let counted = attribute(&connections, &HashMap::new(), &owners());
        assert_eq!(counted.generations, BTreeMap::from([(1, 7), (2, 3)]));
        assert_eq!((counted.bridged, counted.unknown), (0, 0));
    }

    #[test]
    fn a_migrated_connection_is_the_generation_it_went_to_not_its_cgroups() {
        // Queued in generation 1's closing listener (its cgroup), migrated
        // to generation 2; another went from the bridge to generation 2.
        let connections = [connection(1, 100), connection(2, 100), connection(3, 50)];
        let migrated = HashMap::from([(2, 2), (3, 2)]);
        let counted = attribute(&connections, &migrated, &owners());
        assert_eq!(counted.generations, BTreeMap::from([(1, 1), (2, 2)]));
    }

    #[test]
    fn connections_on_the_bridge_and_strangers_are_no_generations() {
        let connections = [
            connection(1, 50),
            connection(2, 100),
            connection(3, 999),
            Connection {
                cgroup_id: None,
                ..connection(4, 0)
            },
        ];
        // 2 was migrated onto the bridge.
        let migrated = HashMap::from([(2, BRIDGE_EPOCH)]);
        let counted = attribute(&connections, &migrated, &owners());
        assert!(counted.generations.is_empty(), "{counted:?}");
        assert_eq!((counted.bridged, counted.unknown), (2, 2));
    }

    #[test]
    fn a_record_of_an_ended_generation_counts_nowhere() {
        let counted = attribute(&[connection(1, 100)], &HashMap::from([(1, 9)]), &owners());
        assert_eq!(counted.unknown, 1, "{counted:?}");
    }

    #[test]
    fn cpu_usage_is_read_in_seconds() {
        let stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(usage_seconds(stat), Some(2.5));
        assert_eq!(usage_seconds("nr_periods 0\n"), None);
    }
}
