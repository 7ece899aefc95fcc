//! What start-up builds from what [`super::look_back`] found: the steering
//! maps' sizes and the program (a previous controller's pinned maps reused
//! when adopting), the generations to start with and their sockets, the
//! adopted generations' bridge templates, the cgroups swept; and, when
//! nothing is adopted, the check that no other socket listens on the
//! addresses.

use std::{collections::HashMap, time::Instant};

use anyhow::bail;
use tracing::warn;

use super::{Paths, Previous};
use crate::{
    config::RunConfig,
    discovery,
    generation::Generations,
    state::{HISTORY, RegisteredSocket, saved::Recovery},
    steering::{self, Limits, ListenerSpec, Options, Steering},
    supervisor::Process,
};

/// Loads the steering program with the instance's pinned maps (reusing a
/// previous controller's when adopting) and adds or adopts its listeners.
pub fn load_steering(
    config: &RunConfig,
    paths: &Paths,
    limits: Limits,
    adopting: bool,
) -> anyhow::Result<Steering> {
    let options = Options {
        force_select_only: config.steering.force_select_only,
        ebpf_debug_logs: tracing::enabled!(target: "reloader::ebpf", tracing::Level::DEBUG),
        pin_dir: Some(paths.pins.clone()),
        limits,
        udp_flows: if config
            .listen
            .iter()
            .any(|l| l.transport == steering::Transport::Udp)
        {
            config.udp.flows
        } else {
            1
        },
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
/// Adopted generations: their records, the processes of those whose
/// leader runs, and those adopted through their cgroup alone (leader gone).
pub struct Adopted {
    pub generations: Generations,
    pub processes: HashMap<u64, Process>,
    pub leaderless: Vec<u64>,
}

pub fn generations(
    previous: &Previous,
    limits: Limits,
    cgroups: Option<&crate::cgroup::Instance>,
) -> Adopted {
    let next = previous.saved.as_ref().map_or(1, |s| s.next_generation);
    let mut processes = HashMap::new();
    let mut leaderless = Vec::new();
    let mut live = Vec::new();
    let mut digests = Vec::new();
    if let Recovery::Adopt { live: found, .. } = &previous.recovery {
        for g in found {
            match Process::adopt(g.pid, g.start_time) {
                Ok(process) => {
                    processes.insert(g.number, process);
                }
                Err(error) => {
                    let in_cgroup = cgroups.is_some_and(|c| {
                        crate::cgroup::populated(&c.generation(g.number)).unwrap_or(false)
                    });
                    if !in_cgroup {
                        warn!(generation = g.number, %error, "not adopted");
                        continue;
                    }
                    leaderless.push(g.number);
                }
            }
            live.push((g.number, g.slot, g.pid, g.state));
            digests.push((g.number, g.config_sha256.clone()));
        }
    }
    let mut generations = Generations::restore(limits.slots, HISTORY, next, live, Instant::now());
    for (number, digest) in digests {
        let _ = generations.set_config_sha256(number, digest);
    }
    Adopted {
        generations,
        processes,
        leaderless,
    }
}

/// A copy of one socket per managed address an adopted generation holds
/// (`None` where none could be copied): the template of each address's
/// bridge listener, which a restarted controller opens at once.
pub fn bridge_templates(
    sockets: &[RegisteredSocket],
    addresses: usize,
) -> Vec<Option<std::os::fd::OwnedFd>> {
    (0..addresses)
        .map(|i| {
            sockets
                .iter()
                .filter(|s| s.listener == i)
                .find_map(|s| discovery::copy_fd(s.holder.pid, s.holder.fd).ok())
        })
        .collect()
}

/// Empties and removes the cgroups of generations not in `keep`.
pub fn sweep_cgroups(cgroups: &crate::cgroup::Instance, keep: &std::collections::BTreeSet<u64>) {
    for (number, dir) in cgroups.existing() {
        if keep.contains(&number) {
            continue;
        }
        if crate::cgroup::populated(&dir).unwrap_or(false) {
            warn!(
                generation = number,
                cgroup = %dir.display(),
                "a cgroup of this instance has processes no recorded generation accounts for: \
                 killing them"
            );
            crate::cgroup::kill(&dir, cgroups.mount());
            let deadline = Instant::now() + std::time::Duration::from_secs(2);
            while crate::cgroup::populated(&dir).unwrap_or(false) && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        if let Err(error) = crate::cgroup::remove(&dir) {
            warn!(cgroup = %dir.display(), %error, "cannot remove a stale cgroup");
        }
    }
}

/// The sockets an adopted generation's processes `pids` hold.
pub fn adopted_sockets(pids: &[u32], listen: &[ListenerSpec]) -> Vec<RegisteredSocket> {
    let keys: Vec<_> = listen.iter().map(ListenerSpec::key).collect();
    match discovery::find_among(pids, &keys) {
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

/// Refuses addresses that some socket already listens on: another reloader
/// instance, or a server started outside reloader. Sharing a reuseport
/// group with them would either fail or steer their connections.
pub fn check_addresses_free(listen: &[ListenerSpec]) -> anyhow::Result<()> {
    let existing = discovery::listeners()?;
    for spec in listen {
        let addr = &spec.addr;
        let overlapping = existing.iter().any(|l| {
            l.transport == spec.transport
                && l.addr.port() == addr.port()
                && l.addr.is_ipv4() == addr.is_ipv4()
                && (l.addr.ip() == addr.ip()
                    || l.addr.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if !overlapping {
            continue;
        }
        let holders: Vec<String> = discovery::holders_of(spec.transport, *addr)?
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
            "{spec} is already served by {}: another reloader instance or a server started \
             outside reloader holds it; stop it first (reloader must own the addresses it \
             steers)",
            holders.join(", ")
        );
    }
    Ok(())
}
