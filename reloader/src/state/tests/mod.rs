//! The state's rules, against the fake steering and real (unprivileged)
//! `sleep` processes standing in for servers: the helpers every area's
//! tests share, and the tests by area: generations starting, cutting over,
//! crashing and draining (`generations`), holds, canaries and rollbacks
//! (`rollout`).

use std::{
    net::TcpListener,
    os::fd::OwnedFd,
    process::{Child, Command},
    sync::Arc,
    time::Instant,
};

use super::*;
use crate::steering::fake::FakeSteering;

mod generations;
mod rollout;

/// A state with `listen` addresses and a fake steering to look into.
fn state(listen: &[&str]) -> (InstanceState, FakeSteering) {
    state_with(RunConfig::for_tests(listen))
}

/// A state for `config`.
fn state_with(config: RunConfig) -> (InstanceState, FakeSteering) {
    let fake = FakeSteering::default();
    let limits = config.limits();
    let state = InstanceState::new(
        Arc::new(config),
        limits,
        Box::new(fake.clone()),
        Generations::new(
            RunConfig::for_tests(&["127.0.0.1:1"]).limits().slots,
            HISTORY,
        ),
        HashMap::new(),
        None,
    );
    (state, fake)
}

/// A server stand-in in its own process group.
fn server() -> (Child, (Process, StderrTail)) {
    use std::os::unix::process::CommandExt;
    let child = Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .expect("spawn sleep");
    let process = Process::child(child.id()).expect("pidfd");
    (child, (process, StderrTail::default()))
}

/// One socket per address, as discovery would find them.
fn sockets(n: usize, pid: u32) -> Vec<Vec<FoundSocket>> {
    (0..n)
        .map(|i| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            vec![FoundSocket {
                socket: Listener {
                    transport: crate::net::Transport::Tcp,
                    inode: 1000 + i as u64,
                    cookie: 0,
                    addr,
                    accept_queue: 0,
                    backlog: 128,
                },
                holder: Holder {
                    pid,
                    fd: 3 + i as i32,
                },
                process: "sleep".into(),
                go: false,
                copy: OwnedFd::from(listener),
            }]
        })
        .collect()
}

/// Starts a generation up to active; returns its number, slot and child.
fn activate(state: &mut InstanceState) -> (u64, u32, Child) {
    let begun = state.begin(Instant::now()).expect("a slot");
    let (child, spawned) = server();
    let pid = spawned.0.pid();
    state.spawned(begun.number, spawned.0, spawned.1).unwrap();
    let n = state.config().listen.len();
    state.register(begun.number, sockets(n, pid)).unwrap();
    state.cut_over(begun.number, Instant::now()).unwrap();
    (begun.number, begun.slot, child)
}

/// What the reaper does when `child` exits: record it, then reap.
fn exit(state: &mut InstanceState, child: &mut Child, how: &str) -> ExitEffect {
    let _ = child.kill();
    let effect = state.exited(child.id(), how);
    let _ = child.wait();
    effect
}
