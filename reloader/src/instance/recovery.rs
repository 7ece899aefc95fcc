//! Starting an instance: its lock, its addresses, its control socket, the
//! steering maps, and what a previous controller of the same instance left
//! behind (a state file and pinned maps): adopt its running generations, or
//! clean up and say so.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::{
    config::RunConfig,
    discovery,
    generation::Generations,
    state::{
        HISTORY, RegisteredSocket,
        saved::{self, Recovery, Saved, SavedGeneration},
    },
    steering::{self, Limits, Options, Steering},
    supervisor::Process,
};

/// Files and pins of an instance.
pub struct Paths {
    pub state: PathBuf,
    pub pins: PathBuf,
}

impl Paths {
    pub fn of(config: &RunConfig) -> Self {
        Self {
            state: saved::state_path(&config.control_socket),
            pins: saved::pin_dir(&config.name, &config.control_socket),
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
pub fn look_back(config: &RunConfig, paths: &Paths) -> anyhow::Result<Previous> {
    let saved = saved::load(&paths.state).map_err(|e| {
        anyhow::anyhow!(
            "{e}: remove it if no generation of instance {:?} runs",
            config.name
        )
    })?;
    let recovery = saved::recovery(saved.as_ref(), |pid, start| {
        crate::supervisor::start_time(pid) == Some(start)
    });
    if let (Recovery::Adopt { live, .. }, Some(saved)) = (&recovery, &saved)
        && saved.listen != config.listen
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

/// Cleans up what cannot be adopted; returns the text `status` shows.
pub fn clean_up(previous: &Previous, paths: &Paths) -> Option<String> {
    match &previous.recovery {
        Recovery::Fresh => {
            // Pins without a state file: nothing to adopt.
            Steering::unpin(&paths.pins);
            None
        }
        Recovery::Stale { gone } => {
            for g in gone {
                // A generation whose leader runs but that cannot be adopted
                // (no active generation to keep serving): not ours to keep.
                if let Ok(process) = Process::adopt(g.pid, g.start_time) {
                    process.signal_group(nix::sys::signal::Signal::SIGKILL);
                }
            }
            Steering::unpin(&paths.pins);
            let _ = std::fs::remove_file(&paths.state);
            let text = format!(
                "a previous controller (pid {}) left state behind, but none of its generations \
                 ({}) serves any more: cleaned up, starting fresh",
                previous.saved.as_ref().map_or(0, |s| s.controller_pid),
                list(gone, |g| g.number.to_string())
            );
            warn!("{text}");
            Some(text)
        }
        Recovery::Adopt { live, gone } => {
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
                }
            );
            info!("{text}");
            Some(text)
        }
    }
}

/// Loads the steering program with the instance's pinned maps (reusing a
/// previous controller's when adopting) and adds or adopts its listeners.
pub fn load_steering(
    config: &RunConfig,
    paths: &Paths,
    limits: Limits,
    adopting: bool,
) -> anyhow::Result<Steering> {
    let options = Options {
        force_select_only: config.force_select_only,
        ebpf_debug_logs: tracing::enabled!(target: "reloader::ebpf", tracing::Level::DEBUG),
        pin_dir: Some(paths.pins.clone()),
        limits,
        udp_flows: 1,
    };
    let mut steering = match Steering::load(&options) {
        Err(
            error @ (steering::SteeringError::BpffsUnavailable { .. }
            | steering::SteeringError::PinDirError { .. }),
        ) if !adopting => {
            warn!(error = %crate::error_chain(&error), "running without pinned maps: a restarted controller cannot adopt");
            Steering::load(&Options {
                pin_dir: None,
                ..options
            })?
        }
        other => other?,
    };
    if adopting && !steering.reused_maps() {
        bail!(
            "generations of instance {:?} still run, but the steering maps pinned in {} are gone: \
             stop those generations, then start again",
            config.name,
            paths.pins.display()
        );
    }
    for (i, addr) in config.listen.iter().enumerate() {
        if adopting {
            steering.adopt_listener(i as u32, *addr)?;
        } else {
            steering.add_listener(i as u32, *addr)?;
        }
    }
    Ok(steering)
}

/// The steering maps' sizes: a previous controller's when its maps are
/// adopted (they exist already), else those the configuration needs.
pub fn limits(config: &RunConfig, previous: &Previous) -> Limits {
    match (&previous.recovery, &previous.saved) {
        (Recovery::Adopt { .. }, Some(saved)) => {
            let limits = Limits::from(saved.limits);
            if limits != config.limits() {
                warn!(
                    ?limits,
                    wanted = ?config.limits(),
                    "adopting maps sized by the previous controller; restart the instance to \
                     resize them"
                );
            }
            limits
        }
        _ => config.limits(),
    }
}

/// The generations to start with: adopted ones (with their processes, held
/// by pidfd), numbering continued after the previous controller's.
pub fn generations(previous: &Previous, limits: Limits) -> (Generations, HashMap<u64, Process>) {
    let next = previous.saved.as_ref().map_or(1, |s| s.next_generation);
    let mut processes = HashMap::new();
    let mut live = Vec::new();
    if let Recovery::Adopt { live: found, .. } = &previous.recovery {
        for g in found {
            match Process::adopt(g.pid, g.start_time) {
                Ok(process) => {
                    processes.insert(g.number, process);
                    live.push((g.number, g.slot, g.pid, g.state));
                }
                Err(error) => warn!(generation = g.number, %error, "not adopted"),
            }
        }
    }
    (
        Generations::restore(limits.slots, HISTORY, next, live, Instant::now()),
        processes,
    )
}

/// The sockets an adopted active generation holds (for `status`).
pub fn adopted_sockets(pid: u32, listen: &[SocketAddr]) -> Vec<RegisteredSocket> {
    match discovery::find(pid, listen) {
        Ok(found) => found
            .per_address
            .into_iter()
            .enumerate()
            .flat_map(|(i, sockets)| {
                sockets
                    .into_iter()
                    .map(move |(socket, holder)| RegisteredSocket {
                        listener: i,
                        socket,
                        holder,
                    })
            })
            .collect(),
        Err(error) => {
            warn!(error = %crate::error_chain(&error), "cannot list an adopted generation's sockets");
            Vec::new()
        }
    }
}

/// Takes the instance's lock (`NAME.lock` beside its control socket) for
/// the controller's lifetime, so two controllers never run one instance.
pub fn lock_instance(
    socket: &Path,
    name: &str,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open the instance lock {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            write!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "instance {name:?} is already running (controller pid {}): stop it with \
                 `reloader stop --name {name}`, or choose another --name",
                pid.trim()
            )
        }
        Err((_, errno)) => Err(errno).with_context(|| format!("failed to lock {}", path.display())),
    }
}

/// Refuses addresses that some socket already listens on: another reloader
/// instance, or a server started outside reloader. Sharing a reuseport
/// group with them would either fail or steer their connections.
pub fn check_addresses_free(listen: &[SocketAddr]) -> anyhow::Result<()> {
    let existing = discovery::listeners()?;
    for addr in listen {
        let overlapping = existing.iter().any(|l| {
            l.addr.port() == addr.port()
                && l.addr.is_ipv4() == addr.is_ipv4()
                && (l.addr.ip() == addr.ip()
                    || l.addr.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if !overlapping {
            continue;
        }
        let holders: Vec<String> = discovery::holders_of(*addr)?
            .into_iter()
            .map(|(l, holder)| match holder {
                Some(h) => format!(
                    "pid {} ({}) on {}",
                    h.pid,
                    discovery::process_name(h.pid).unwrap_or_else(|| "?".into()),
                    l.addr
                ),
                None => format!("a socket on {} (inode {})", l.addr, l.inode),
            })
            .collect();
        bail!(
            "{addr} is already served by {}: another reloader instance or a server started \
             outside reloader holds it; stop it first (reloader must own the addresses it \
             steers)",
            holders.join(", ")
        );
    }
    Ok(())
}

/// Binds the control socket: refuses when another controller answers on
/// it, replaces a stale file otherwise. Mode 0600.
pub async fn bind_control_socket(path: &Path, name: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "instance {name:?} is already running (its control socket {} answers): stop it \
                 with `reloader stop --name {name}`, or choose another --name",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("failed to bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to chmod {}", path.display()))?;
    Ok(listener)
}

/// `items` as a comma-separated list, each written by `f` (for messages).
fn list(items: &[SavedGeneration], f: impl Fn(&SavedGeneration) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}
