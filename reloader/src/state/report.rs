//! What the state reports: `status`, the counters of each generation,
//! and the state file's content; and the records of adopted generations.

use std::time::Instant;

use super::{InstanceState, RegisteredSocket, saved};
use crate::{
    generation::State,
    status::{
        CounterStatus, FlowTableStatus, GenerationStatus, ListenerStatus, SocketStatus,
        StatusReport,
    },
    steering::ListenerMode,
    supervisor::Process,
};

impl InstanceState {
    /// Counters of generation `number` summed over listeners: live from the
    /// maps, or as frozen when it ended.
    pub(super) fn counters(&self, number: u64) -> CounterStatus {
        if let Some(done) = self.ended_counters.get(&number) {
            return *done;
        }
        let Some(generation) = self.generations.get(number) else {
            return CounterStatus::default();
        };
        let mut sum = CounterStatus::default();
        for listener in self.listeners() {
            if let Ok(c) = self.steering.counters(listener, generation.slot) {
                sum += c.into();
            }
        }
        sum
    }

    /// What `status` reports, without accept-queue lengths (those need a
    /// netlink dump: [`super::Client::status`] adds them on a blocking
    /// thread).
    pub fn status(&self) -> StatusReport {
        let now = Instant::now();
        // UDP flows per listener and slot (one walk of the flow table).
        let flows: std::collections::BTreeMap<u32, std::collections::BTreeMap<u32, u64>> = self
            .config
            .listen
            .iter()
            .enumerate()
            .filter(|(_, spec)| spec.mode == ListenerMode::UdpFlows)
            .filter_map(|(i, _)| Some((i as u32, self.steering.flows(i as u32).ok()?)))
            .collect();
        let listeners = self
            .config
            .listen
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let slot = self.steering.active(i as u32).ok().flatten();
                let (bridge, bridged) = self.bridge_status(i);
                let flow_table = (spec.mode == ListenerMode::UdpFlows).then(|| FlowTableStatus {
                    flows: flows
                        .get(&(i as u32))
                        .map_or(0, |per_slot| per_slot.values().sum()),
                    capacity: self.steering.flow_capacity(),
                });
                ListenerStatus {
                    addr: spec.to_string(),
                    active_generation: self
                        .generations
                        .active()
                        .filter(|g| Some(g.slot) == slot)
                        .map(|g| g.number),
                    transport: spec.transport,
                    flow_table,
                    bridge,
                    bridged,
                }
            })
            .collect();
        let generations = self
            .generations
            .all()
            .iter()
            .rev()
            .map(|g| {
                let sockets = self
                    .sockets
                    .get(&g.number)
                    .map(|v| {
                        v.iter()
                            .map(|s| SocketStatus {
                                addr: s.socket.addr.to_string(),
                                inode: s.socket.inode,
                                cookie: s.socket.cookie,
                                accept_queue: None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let spawned = g.timeline.spawned.unwrap_or(now);
                let end = g.timeline.ended.unwrap_or(now);
                GenerationStatus {
                    generation: g.number,
                    // A leader that is gone (daemonized, or died while the
                    // generation lives on in its cgroup) is no pid to show.
                    pid: if self.is_leaderless(g.number) {
                        None
                    } else {
                        g.pid
                    },
                    state: g.state,
                    age_ms: end.saturating_duration_since(spawned).as_millis() as u64,
                    slot: g.slot,
                    outcome: g.outcome.clone(),
                    sockets,
                    counters: self.counters(g.number),
                    udp_flows: if g.state.is_live() {
                        flows
                            .values()
                            .filter_map(|per_slot| per_slot.get(&g.slot))
                            .sum()
                    } else {
                        0
                    },
                    config_sha256: g.config_sha256.clone(),
                    weight_percent: self.weight_percent(g.number),
                    steered_per_second: self.steered_per_second(g.number),
                    health: self.health_status(g.number),
                    cgroup: self.cgroup(g.number).map(|d| d.display().to_string()),
                    connections: None,
                    memory_bytes: None,
                    cpu_seconds: None,
                    processes: None,
                    unavailable: std::collections::BTreeMap::new(),
                    evicted: self.evicting(g.number).map(|r| r.as_str().to_owned()),
                }
            })
            .collect();
        StatusReport {
            name: self.config.name.clone(),
            pid: std::process::id(),
            steering: self.steering.mode(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            listeners,
            generations,
            last_reload: self.last_reload.clone(),
            reloads_succeeded: self.stats.reloads_succeeded,
            reloads_failed: self.stats.reloads_failed,
            restarts: self.stats.restarts,
            restarts_stopped_listening: self.stats.restarts_stopped_listening,
            drain_kills: self.stats.drain_kills,
            drain_evictions: self
                .stats
                .drain_evictions
                .iter()
                .map(|(reason, n)| (reason.as_str().to_owned(), *n))
                .collect(),
            rollout: self.rollout_status(now),
            reloads_rolled_back: self.stats.reloads_rolled_back,
            rollbacks: self.stats.rollbacks,
            unmanaged_fallback: self
                .steering
                .unmanaged_counters()
                .map(|c| c.fallback)
                .unwrap_or_default(),
            map_entries: self.steering.entry_counts().unwrap_or_default(),
            recovered: self.recovered.clone(),
            log_lines_dropped: crate::logging::dropped_lines(),
            cgroup_unavailable: self.cgroup_unavailable().map(ToOwned::to_owned),
            server_environment: vec![
                "RELOADER_GENERATION=<generation>".into(),
                format!("RELOADER_NAME={}", self.config.name),
                format!(
                    "GODEBUG={}",
                    crate::supervisor::godebug(std::env::var("GODEBUG").ok().as_deref())
                ),
            ],
            active_config_sha256: self.active_config_sha256(),
            go_server_seen: self.go_server_seen,
        }
    }

    /// What the state file records: the live generations with a process.
    pub fn saved(&self) -> saved::Saved {
        let generations = self
            .generations
            .live()
            .filter_map(|g| {
                let process = self.processes.get(&g.number)?;
                Some(saved::SavedGeneration {
                    number: g.number,
                    slot: g.slot,
                    pid: process.pid(),
                    start_time: process.start_time(),
                    state: g.state,
                    sockets: self
                        .sockets(g.number)
                        .iter()
                        .map(|s| s.socket.cookie)
                        .collect(),
                    config_sha256: g.config_sha256.clone(),
                })
            })
            .collect();
        saved::Saved {
            hold: self.hold.map(|h| saved::SavedHold {
                held: h.held,
                successor: h.successor,
                until_unix_ms: h.until_unix_ms,
            }),
            ..saved::Saved::new(
                self.config.listen.iter().map(ToString::to_string).collect(),
                self.limits,
                self.generations.next_number(),
                generations,
            )
        }
    }

    /// The sockets registered for generation `number`.
    pub fn sockets(&self, number: u64) -> &[RegisteredSocket] {
        self.sockets.get(&number).map_or(&[], Vec::as_slice)
    }

    /// Records sockets found for an adopted generation (already in its
    /// slot, registered by the previous controller).
    pub fn adopted_sockets(&mut self, number: u64, sockets: Vec<RegisteredSocket>) {
        self.sockets.insert(number, sockets);
    }

    /// An adopted generation's stderr is forwarded again (the log keeper
    /// held it while no controller ran).
    pub fn resume_stderr(&mut self, number: u64, tail: crate::supervisor::StderrTail) {
        self.stderr.insert(number, tail);
    }

    /// Processes of live generations that are not our children (adopted):
    /// their exits must be watched by pidfd.
    pub fn adopted(&self) -> Vec<(u64, &Process)> {
        self.processes
            .iter()
            .filter(|(_, p)| !p.is_child())
            .map(|(n, p)| (*n, p))
            .collect()
    }

    /// Ends an adopted generation that was starting when the previous
    /// controller died (that reload is lost).
    pub fn kill_orphaned_candidate(&mut self, number: u64) {
        self.kill_group(number);
        self.end(
            number,
            State::Failed,
            "killed: it was starting when the previous controller died".into(),
        );
    }
}
