//! Starting an instance: its lock, its addresses, its control socket, the
//! steering maps, and what a previous controller of the same instance left
//! behind (a state file and pinned maps): adopt its running generations, or
//! clean up and say so.
//!
//! This file looks back (what was left, and whether each generation is
//! provably ours) and cleans up; what start-up then builds from it is in
//! `takeover`.

#![allow(clippy::disallowed_methods)] // start-up: runs on the blocking thread of `startup::prepare`

use std::path::PathBuf;

use anyhow::bail;
use tracing::{info, warn};

use crate::{
    config::RunConfig,
    discovery,
    state::saved::{self, Recovery, Saved, SavedGeneration, Verdict},
    steering::Steering,
    supervisor::Process,
};

pub use self::takeover::{
    Adopted, adopted_sockets, bridge_templates, check_addresses_free, generations, limits,
    load_steering, sweep_cgroups,
};

mod takeover;

/// Files and pins of an instance.
pub struct Paths {
    /// The runtime directory, open (every path below but `pins` goes
    /// through it).
    pub dir: std::sync::Arc<crate::rundir::RuntimeDir>,
    pub state: PathBuf,
    pub control: PathBuf,
    pub lock: PathBuf,
    pub keeper: PathBuf,
    pub pins: PathBuf,
}

impl Paths {
    pub fn of(config: &RunConfig, dir: crate::rundir::RuntimeDir) -> Self {
        let socket = &config.control_socket;
        let name = |path: PathBuf| path.file_name().map(ToOwned::to_owned).unwrap_or_default();
        Self {
            state: dir.path(name(saved::state_path(socket))),
            control: dir.path(name(socket.clone())),
            lock: dir.path(name(socket.with_extension("lock"))),
            keeper: dir.path(name(socket.with_extension("keeper"))),
            pins: saved::pin_dir(&config.name, socket),
            dir: std::sync::Arc::new(dir),
        }
    }
}

/// What was found from a previous controller.
pub struct Previous {
    pub saved: Option<Saved>,
    pub recovery: Recovery,
}

impl Previous {
    pub fn adopting(&self) -> bool {
        matches!(self.recovery, Recovery::Adopt { .. })
    }
}

/// Reads the state file and decides what to do with it.
pub fn look_back(
    config: &RunConfig,
    paths: &Paths,
    cgroups: Option<&crate::cgroup::Instance>,
) -> anyhow::Result<Previous> {
    let shown = saved::state_path(&config.control_socket);
    let saved = saved::load(&paths.state, &shown).map_err(|e| {
        if let saved::LoadError::Incompatible { .. } = e {
            // Another reloader's: nothing is removed or signalled, the
            // generations keep serving for the binary that wrote it.
            return anyhow::anyhow!(
                "{e}. This binary cannot adopt instance {:?}'s generations and changed nothing: \
                 they keep serving. Run the reloader that wrote the file again (`reloader run` \
                 with the same options adopts them), or stop the instance with it (`reloader \
                 stop`, the servers drain) and then start this one",
                config.name
            );
        }
        let running = instance_processes(&config.name);
        if running.is_empty() {
            anyhow::anyhow!(
                "{e}: no process of instance {:?} runs, so nothing would be lost: remove the file \
                 and start again",
                config.name
            )
        } else {
            let pids: Vec<String> = running.iter().map(|(p, _)| p.to_string()).collect();
            anyhow::anyhow!(
                "{e}, and processes of instance {:?} still run ({}), which this controller \
                 cannot prove are what the file recorded: stop them (`kill -TERM {}`), then \
                 remove the file and start again",
                config.name,
                list_processes(&running),
                pids.join(" ")
            )
        }
    })?;
    let recovery = saved::recovery(saved.as_ref(), |g| prove(config, g, cgroups));
    if let (Recovery::Adopt { live, .. }, Some(saved)) = (&recovery, &saved)
        && !same_listen(&saved.listen, &listen_texts(config))
    {
        bail!(
            "instance {:?} has running generations (pids {}) serving {:?}: restart it with the \
             same --listen addresses, or stop them first",
            config.name,
            list(live, |g| g.pid.to_string()),
            saved.listen
        );
    }
    Ok(Previous { saved, recovery })
}

/// Whether recorded generation `g` still runs and is proven ours: the same
/// pid and start time, and either its process tree still holds a socket
/// recorded for it (sock_diag cookies) or its environment names this
/// instance and generation (what the controller spawned it with; servers
/// that rewrite their environment area, like nginx's process title, lose
/// this proof, not the first).
fn prove(
    config: &RunConfig,
    g: &SavedGeneration,
    cgroups: Option<&crate::cgroup::Instance>,
) -> Verdict {
    if crate::supervisor::start_time(g.pid) != Some(g.start_time) {
        // Its processes are in its cgroup, which only root (or we) can
        // move processes into: membership is proof.
        if let Some(cgroups) = cgroups
            && crate::cgroup::populated(&cgroups.generation(g.number)).unwrap_or(false)
        {
            warn!(
                generation = g.number,
                leader = g.pid,
                "the generation's leader is gone but its cgroup still has processes: adopted \
                 through its cgroup"
            );
            return Verdict::InCgroup;
        }
        return orphaned_holder(config, g).map_or(Verdict::Gone, |(holder, start_time)| {
            warn!(
                generation = g.number,
                leader = g.pid,
                holder,
                "the generation's leader is gone but a process of it still holds its sockets: \
                 adopted by that process"
            );
            Verdict::Orphaned { holder, start_time }
        });
    }
    let name = discovery::process_name(g.pid).unwrap_or_else(|| "?".into());
    let holds_recorded = !g.sockets.is_empty()
        && discovery::find(g.pid, &config.listen_keys()).is_ok_and(|found| {
            found
                .per_address
                .iter()
                .flatten()
                .any(|(l, _)| g.sockets.contains(&l.cookie))
        });
    if holds_recorded {
        return Verdict::Ours;
    }
    // Only a process of the uid generations run as (the controller's) can
    // be proven by what its environment says: anyone can set a variable.
    let process = procfs::process::Process::new(g.pid as i32);
    let same_uid = process
        .as_ref()
        .ok()
        .and_then(|p| p.status().ok())
        .is_some_and(|s| s.euid == nix::unistd::geteuid().as_raw());
    let environment_names_it = same_uid
        && process.and_then(|p| p.environ()).is_ok_and(|env| {
            env.get(std::ffi::OsStr::new("RELOADER_NAME"))
                .is_some_and(|v| v == config.name.as_str())
                && env
                    .get(std::ffi::OsStr::new("RELOADER_GENERATION"))
                    .is_some_and(|v| *v == *g.number.to_string())
        });
    if environment_names_it {
        return Verdict::Ours;
    }
    Verdict::Unproven(format!(
        "pid {} ({name}) holds none of the sockets recorded for generation {} and its \
         environment does not name it",
        g.pid, g.number
    ))
}

/// A process that still holds a socket recorded for generation `g` (whose
/// leader is gone), with its start time: the lowest such pid. A socket's
/// cookie names one socket object for the kernel's life, so holding one we
/// registered proves the process is of that generation.
fn orphaned_holder(config: &RunConfig, g: &SavedGeneration) -> Option<(u32, u64)> {
    if g.sockets.is_empty() {
        return None;
    }
    let mut holders: Vec<u32> = config
        .listen
        .iter()
        .filter_map(|spec| discovery::holders_of(spec.transport, spec.addr).ok())
        .flatten()
        .filter(|(l, _)| g.sockets.contains(&l.cookie))
        .filter_map(|(_, holder)| holder.map(|h| h.pid))
        .collect();
    holders.sort_unstable();
    holders
        .into_iter()
        .find_map(|pid| Some((pid, crate::supervisor::start_time(pid)?)))
}

/// Process group leaders whose environment names instance `name` (what
/// the controller spawns its generations with), for messages.
fn instance_processes(name: &str) -> Vec<(u32, String)> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| {
            let stat = p.stat().ok()?;
            if stat.pgrp != stat.pid || stat.state == 'Z' {
                return None;
            }
            // Only processes of the uid generations run as are named: any
            // user can set the variable.
            if p.status().ok()?.euid != nix::unistd::geteuid().as_raw() {
                return None;
            }
            let env = p.environ().ok()?;
            (env.get(std::ffi::OsStr::new("RELOADER_NAME"))? == name)
                .then_some((stat.pid as u32, stat.comm))
        })
        .collect()
}

fn list_processes(processes: &[(u32, String)]) -> String {
    processes
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cleans up what cannot be adopted; returns the text `status` shows.
pub fn clean_up(previous: &Previous, paths: &Paths) -> Option<String> {
    match &previous.recovery {
        Recovery::Fresh => {
            // Pins without a state file: nothing to adopt.
            Steering::unpin(&paths.pins);
            None
        }
        Recovery::Stale {
            ours,
            gone,
            unproven,
        } => {
            for g in ours {
                // Proven ours, but it cannot be adopted (no active
                // generation to keep serving): not ours to keep.
                // Waited for: the addresses are checked free next, and a
                // dying worker still holds its listener.
                if let Ok(process) = Process::adopt(g.pid, g.start_time) {
                    process.kill_group_and_wait(std::time::Duration::from_secs(2));
                }
            }
            Steering::unpin(&paths.pins);
            let _ = std::fs::remove_file(&paths.state);
            let ended = list(&ours.iter().chain(gone).cloned().collect::<Vec<_>>(), |g| {
                g.number.to_string()
            });
            let mut text = format!(
                "a previous controller (pid {}) left state behind, but none of its generations \
                 serves any more{}: cleaned up, starting fresh",
                previous.saved.as_ref().map_or(0, |s| s.controller_pid),
                if ended.is_empty() {
                    String::new()
                } else {
                    format!(" (generations {ended})")
                }
            );
            text.push_str(&unproven_text(unproven));
            warn!("{text}");
            Some(text)
        }
        Recovery::Adopt {
            live,
            gone,
            unproven,
        } => {
            let saved = previous.saved.as_ref().expect("adoption has a state file");
            let text = format!(
                "adopted generations {} from a previous controller (pid {}){}",
                list(live, |g| format!(
                    "{} ({}, pid {})",
                    g.number, g.state, g.pid
                )),
                saved.controller_pid,
                if gone.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; generations {} had exited meanwhile",
                        list(gone, |g| g.number.to_string())
                    )
                },
            ) + &unproven_text(unproven);
            info!("{text}");
            Some(text)
        }
    }
}

/// What a message says about recorded generations not proven ours.
fn unproven_text(unproven: &[(SavedGeneration, String)]) -> String {
    if unproven.is_empty() {
        return String::new();
    }
    let what: Vec<&str> = unproven.iter().map(|(_, w)| w.as_str()).collect();
    format!(
        "; not adopted and never signalled, as nothing proves they are this instance's: {} \
         (stop them yourself if they are)",
        what.join("; ")
    )
}

/// The `--listen` values as the state file records them.
fn listen_texts(config: &RunConfig) -> Vec<String> {
    config.listen.iter().map(ToString::to_string).collect()
}

/// Whether the `--listen` values a state file recorded are `current`'s. A
/// UDP address with flow affinity was written `udp://ADDR` before its mode
/// had to be named (issue 29): a controller started by a newer binary with
/// `udp://ADDR?mode=flows` adopts what an older one recorded so.
fn same_listen(recorded: &[String], current: &[String]) -> bool {
    recorded.len() == current.len()
        && recorded.iter().zip(current).all(|(old, new)| {
            old == new
                || (old.starts_with("udp://")
                    && !old.contains('?')
                    && *new == format!("{old}?mode=flows"))
        })
}

/// `items` as a comma-separated list, each written by `f` (for messages).
fn list(items: &[SavedGeneration], f: impl Fn(&SavedGeneration) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::same_listen;

    fn texts(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    /// A hand-over from a binary that recorded flows as `udp://ADDR` to one
    /// that writes `udp://ADDR?mode=flows` adopts; any other difference
    /// (another mode, another address) does not.
    #[test]
    fn a_state_file_from_before_udp_modes_were_named_is_the_same_listen() {
        let current = texts(&["127.0.0.1:80", "udp://127.0.0.1:443?mode=flows"]);
        assert!(same_listen(&current, &current));
        assert!(same_listen(
            &texts(&["127.0.0.1:80", "udp://127.0.0.1:443"]),
            &current
        ));
        assert!(!same_listen(
            &texts(&["127.0.0.1:80", "udp://127.0.0.1:443"]),
            &texts(&["127.0.0.1:80", "udp://127.0.0.1:443?mode=stateless"])
        ));
        assert!(!same_listen(
            &texts(&["127.0.0.1:80", "udp://127.0.0.1:444"]),
            &current
        ));
        assert!(!same_listen(&texts(&["127.0.0.1:80"]), &current));
    }
}
