//! The state's rules, against the fake steering and real (unprivileged)
//! `sleep` processes standing in for servers.

use std::{
    net::TcpListener,
    os::fd::OwnedFd,
    process::{Child, Command},
    sync::Arc,
    time::Instant,
};

use super::*;
use crate::steering::fake::FakeSteering;

/// A state with `listen` addresses and a fake steering to look into.
fn state(listen: &[&str]) -> (InstanceState, FakeSteering) {
    let fake = FakeSteering::default();
    let state = InstanceState::new(
        Arc::new(RunConfig::for_tests(listen)),
        RunConfig::for_tests(listen).limits(),
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

#[test]
fn counters_are_per_generation_across_slot_reuse() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let mut children = Vec::new();
    // Eight generations through the slots: each gets `n` connections.
    for n in 1..=8u64 {
        let (number, slot, child) = activate(&mut state);
        assert_eq!(number, n);
        fake.maps().steer(0, slot, n);
        children.push(child);
        // The previous generation drains and exits: its slot is free again.
        if n > 1 {
            let mut old = children.remove(0);
            assert!(matches!(
                exit(&mut state, &mut old, "exited with status 0"),
                ExitEffect::Ended { generation } if generation == n - 1
            ));
        }
    }
    let status = state.status();
    for g in &status.generations {
        assert_eq!(
            g.counters.steered, g.generation,
            "generation {} shows only its own connections",
            g.generation
        );
    }
    for mut child in children {
        exit(&mut state, &mut child, "killed by SIGKILL");
    }
}

#[test]
fn a_cutover_that_fails_on_the_second_listener_leaves_the_first_on_the_old_slot() {
    let (mut state, fake) = state(&["127.0.0.1:8080", "127.0.0.1:8443"]);
    let (old, old_slot, mut old_child) = activate(&mut state);
    let begun = state.begin(Instant::now()).unwrap();
    let (mut child, spawned) = server();
    let pid = spawned.0.pid();
    state.spawned(begun.number, spawned.0, spawned.1).unwrap();
    state.register(begun.number, sockets(2, pid)).unwrap();
    fake.maps().fail_set_active.insert(1);
    fake.maps().cutovers.clear();

    let error = state.cut_over(begun.number, Instant::now()).unwrap_err();
    assert!(
        matches!(&error, ReloadError::SteeringError { addr, .. } if addr.addr.port() == 8443),
        "{error}"
    );
    {
        let maps = fake.maps();
        assert_eq!(
            maps.cutovers,
            vec![(0, Some(begun.slot)), (0, Some(old_slot))],
            "the first listener was switched, then switched back"
        );
        assert_eq!(maps.active.get(&0), Some(&old_slot));
    }
    state.fail(begun.number, &error);
    assert_eq!(state.active(), Some(old), "the old generation stays active");
    assert_eq!(state.generation(begun.number).unwrap().state, State::Failed);
    assert!(
        !fake.maps().slots.contains_key(&(0, begun.slot)),
        "the candidate's slot is emptied"
    );
    let _ = child.wait();
    exit(&mut state, &mut old_child, "killed by SIGKILL");
}

#[test]
fn a_candidate_that_exits_before_it_is_ready_fails_and_says_how() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (old, old_slot, mut old_child) = activate(&mut state);
    let begun = state.begin(Instant::now()).unwrap();
    let (mut child, spawned) = server();
    state.spawned(begun.number, spawned.0, spawned.1).unwrap();
    assert_eq!(
        exit(&mut state, &mut child, "exited with status 0"),
        ExitEffect::Ended {
            generation: begun.number
        }
    );
    let error = state.check_alive(begun.number).unwrap_err();
    assert!(
        error.to_string().contains("probably daemonized"),
        "status 0 before ready hints at daemonizing: {error}"
    );
    assert_eq!(state.active(), Some(old));
    assert_eq!(fake.maps().active.get(&0), Some(&old_slot));
    exit(&mut state, &mut old_child, "killed by SIGKILL");
}

#[test]
fn a_crash_of_the_active_generation_leaves_selection_to_the_kernel() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (number, slot, mut child) = activate(&mut state);
    assert_eq!(
        exit(&mut state, &mut child, "killed by SIGSEGV"),
        ExitEffect::Crashed {
            generation: number,
            reinstated: None
        }
    );
    assert_eq!(fake.maps().active.get(&0), None);
    assert!(!fake.maps().slots.contains_key(&(0, slot)));
    assert_eq!(state.status().restarts, 1);
    assert_eq!(state.next_restart_delay(), RESTART_BACKOFF_MIN);
    assert_eq!(state.next_restart_delay(), RESTART_BACKOFF_MIN * 2);
}

#[test]
fn no_generation_begins_beyond_max_draining_or_while_stopping() {
    let (mut state, _fake) = state(&["127.0.0.1:8080"]);
    let mut children = Vec::new();
    // One active and max_draining (4) draining generations.
    for _ in 0..5 {
        children.push(activate(&mut state).2);
    }
    assert_eq!(
        state.begin(Instant::now()),
        Err(NotNow::Busy { draining: 4 })
    );
    let mut oldest = children.remove(0);
    exit(&mut state, &mut oldest, "exited with status 0");
    assert!(
        state.begin(Instant::now()).is_ok(),
        "a drained one frees a place"
    );
    let live = state.begin_stop();
    assert!(live.iter().any(|(_, s)| *s == State::Starting));
    assert_eq!(state.begin(Instant::now()), Err(NotNow::Stopping));
    assert!(
        state.live().iter().all(|(_, s)| *s == State::Draining),
        "the candidate was killed, the rest drain: {:?}",
        state.live()
    );
    for mut child in children {
        exit(&mut state, &mut child, "killed by SIGTERM");
    }
}
