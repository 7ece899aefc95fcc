//! Processes, as the tests look at them (from procfs, never by parsing
//! `/proc` by hand or running `ps`).

use std::collections::BTreeSet;

use procfs::process::{Process, all_processes};

/// (pid, ppid, state) of every process now.
fn table() -> Vec<(u32, u32, char)> {
    all_processes()
        .expect("/proc")
        .flatten()
        .filter_map(|p| p.stat().ok())
        .map(|s| (s.pid as u32, s.ppid as u32, s.state))
        .collect()
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z')
}

/// Whether `pid` exists as a zombie (exited, not reaped).
pub fn zombie(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state == 'Z')
}

/// The children of `pid` (zombies included).
pub fn children(pid: u32) -> BTreeSet<u32> {
    table()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == pid)
        .map(|(p, _, _)| p)
        .collect()
}

/// The live children of `pid`.
pub fn live_children(pid: u32) -> BTreeSet<u32> {
    table()
        .into_iter()
        .filter(|(_, ppid, state)| *ppid == pid && *state != 'Z')
        .map(|(p, _, _)| p)
        .collect()
}

/// `pid` and all its live descendants.
pub fn tree(pid: u32) -> BTreeSet<u32> {
    reloader::discovery::process_tree(pid)
        .expect("/proc")
        .into_iter()
        .filter(|p| *p == pid || alive(*p))
        .collect()
}

/// The live descendants of `pid`, without `pid` itself.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut tree = tree(pid);
    tree.remove(&pid);
    tree
}
