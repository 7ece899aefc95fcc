//! Generations from start to exit: per-generation counters, cutovers
//! that fail halfway, candidates and active generations that exit, the
//! draining limits (count, eviction, memory) and what registration
//! records (a Go server seen).

use std::{process::Child, time::Instant};

use super::*;

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

#[test]
fn with_drain_evict_a_reload_beyond_max_draining_evicts_the_oldest_at_once() {
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    config.drain.max_draining = 2;
    config.drain.evict = true;
    let (mut state, _fake) = state_with(config);
    // Generation 3 active, 1 and 2 draining (not yet signalled: settling).
    let mut children: Vec<Child> = (0..3).map(|_| activate(&mut state).2).collect();
    let begun = state.begin(Instant::now()).expect("no waiting for a slot");
    assert_eq!((begun.number, begun.evicted), (4, Some(1)));
    assert_eq!(state.evicting(1), Some(EvictReason::Count));
    assert_eq!(state.evicting(2), None);
    let one = state.generations.get(1).unwrap();
    assert!(one.timeline.signalled.is_some(), "signalled at once");
    // Its drain task's later signal is not a second one.
    assert!(state.drain_signal(1));
    let status = state.status();
    assert_eq!(status.drain_evictions.get("count"), Some(&1));
    let one = status
        .generations
        .iter()
        .find(|g| g.generation == 1)
        .unwrap();
    assert_eq!(one.evicted.as_deref(), Some("count"));
    // Without --drain-evict the same reload would have waited.
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    config.drain.max_draining = 2;
    let (mut waiting, _fake) = state_with(config);
    let mut others: Vec<Child> = (0..3).map(|_| activate(&mut waiting).2).collect();
    assert_eq!(
        waiting.begin(Instant::now()),
        Err(NotNow::Busy { draining: 2 })
    );
    for child in children.iter_mut().chain(others.iter_mut()) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn over_the_memory_budget_the_oldest_draining_generation_is_evicted_one_at_a_time() {
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    config.drain.max_memory = Some(100 << 20);
    let (mut state, _fake) = state_with(config);
    let mut children: Vec<Child> = (0..3).map(|_| activate(&mut state).2).collect();
    // 1 and 2 drain: 60 MiB together is within the budget.
    assert_eq!(state.over_memory(&[(1, 30 << 20), (2, 30 << 20)]), None);
    // 120 MiB is over: the oldest goes; the active one's memory never counts.
    assert_eq!(
        state.over_memory(&[(1, 60 << 20), (2, 60 << 20), (3, 500 << 20)]),
        Some(1)
    );
    assert_eq!(state.evicting(1), Some(EvictReason::Memory));
    // Still over while 1 has not exited: nothing more until it has.
    assert_eq!(state.over_memory(&[(2, 120 << 20)]), None);
    let mut one = children.remove(0);
    exit(&mut state, &mut one, "killed by SIGKILL");
    assert_eq!(state.over_memory(&[(2, 120 << 20)]), Some(2));
    assert_eq!(state.status().drain_evictions.get("memory"), Some(&2));
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Status says a Go server was seen once a generation registers a socket
/// a Go program holds (discovery reads that from its executable), and
/// keeps saying it; before that, no generation was Go.
#[test]
fn a_go_server_is_seen_when_its_socket_is_registered() {
    let (mut state, _fake) = state(&["127.0.0.1:8080"]);
    let (_, _, _first) = activate(&mut state);
    assert!(!state.status().go_server_seen);
    let begun = state.begin(Instant::now()).expect("a slot");
    let (_second, spawned) = server();
    let pid = spawned.0.pid();
    state.spawned(begun.number, spawned.0, spawned.1).unwrap();
    let mut found = sockets(1, pid);
    found[0][0].go = true;
    state.register(begun.number, found).unwrap();
    assert!(state.status().go_server_seen);
}
