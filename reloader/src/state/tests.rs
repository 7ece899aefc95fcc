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
use crate::{
    status::{ReloadResult, RollbackReason},
    steering::fake::FakeSteering,
};

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

// ---- Rollback and canary.

/// Two listeners, `--keep-previous 1m`.
fn held_state() -> (InstanceState, FakeSteering) {
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080", "127.0.0.1:8081"]);
    config.rollout.keep_previous = Duration::from_secs(60);
    state_with(config)
}

/// Starts a generation up to ready (registered, not cut over).
fn ready(state: &mut InstanceState) -> (u64, u32, Child) {
    let begun = state.begin(Instant::now()).expect("a slot");
    let (child, spawned) = server();
    let pid = spawned.0.pid();
    state.spawned(begun.number, spawned.0, spawned.1).unwrap();
    let n = state.config().listen.len();
    state.register(begun.number, sockets(n, pid)).unwrap();
    (begun.number, begun.slot, child)
}

fn canary_plan(percent: &[u32]) -> crate::config::CanaryPlan {
    crate::config::CanaryPlan {
        steps: percent.iter().map(|p| p * 100).collect(),
        dwell_ms: None,
    }
}

#[test]
fn a_held_generation_comes_back_with_one_update_per_listener() {
    let (mut state, fake) = held_state();
    let (one, slot_one, mut c1) = activate(&mut state);
    let (two, slot_two, mut c2) = activate(&mut state);
    assert_eq!(
        state.hold().map(|h| (h.held, h.successor)),
        Some((one, two))
    );
    assert!(state.hold_until(one).is_some(), "held, not told to drain");
    let before = fake.maps().cutovers.len();

    let done = state.rollback(RollbackReason::Manual).unwrap();
    assert_eq!((done.from, done.to), (two, one));
    assert_eq!(
        fake.maps().cutovers.len() - before,
        2,
        "one update per listener"
    );
    assert_eq!(fake.maps().active.get(&0), Some(&slot_one));
    assert_eq!(fake.maps().active.get(&1), Some(&slot_one));
    assert_eq!(state.active(), Some(one));
    assert_eq!(state.generation(two).unwrap().state, State::Draining);
    assert!(state.hold().is_none());
    assert_eq!(state.stats.rollbacks.manual, 1);
    let _ = slot_two;
    // What was rolled back from never comes back: not even when the
    // generation now active crashes.
    assert!(
        state.rollback(RollbackReason::Manual).is_err(),
        "nothing held now"
    );
    let effect = exit(&mut state, &mut c1, "exited with status 1");
    assert_eq!(
        effect,
        ExitEffect::Crashed {
            generation: one,
            reinstated: None
        }
    );
    let _ = c2.kill();
}

#[test]
fn a_rollback_without_a_hold_says_how_to_get_one() {
    let (mut state, _fake) = state(&["127.0.0.1:8080"]);
    let (_one, _, mut c1) = activate(&mut state);
    let (two, _, mut c2) = activate(&mut state);
    let error = state.rollback(RollbackReason::Manual).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains(&format!("generation {two} is active")),
        "{text}"
    );
    assert!(text.contains("--keep-previous"), "{text}");
    let _ = (c1.kill(), c2.kill());
}

#[test]
fn a_crash_during_the_hold_reinstates_the_held_generation() {
    let (mut state, fake) = held_state();
    let (one, slot_one, mut c1) = activate(&mut state);
    let (two, _, mut c2) = activate(&mut state);
    let effect = exit(&mut state, &mut c2, "killed by signal 9");
    assert_eq!(
        effect,
        ExitEffect::Crashed {
            generation: two,
            reinstated: Some(one)
        }
    );
    assert_eq!(state.active(), Some(one));
    assert_eq!(fake.maps().active.get(&0), Some(&slot_one));
    assert_eq!(state.stats.rollbacks.crash, 1);
    let (result, _, why) = state.failed_after_cutover(two).unwrap();
    assert_eq!(
        result,
        ReloadResult::Failed,
        "a crash fails the reload: {why}"
    );
    let _ = c1.kill();
}

#[test]
fn a_canary_gets_its_share_until_promoted() {
    let (mut state, fake) = state(&["127.0.0.1:8080", "127.0.0.1:8081"]);
    let (one, slot_one, mut c1) = activate(&mut state);
    let (two, slot_two, mut c2) = ready(&mut state);
    state
        .start_canary(two, Instant::now(), &canary_plan(&[20]))
        .unwrap();
    assert_eq!(state.generation(two).unwrap().state, State::Canary);
    for listener in 0..2 {
        assert_eq!(fake.maps().active.get(&listener), Some(&slot_one));
        assert_eq!(fake.maps().canary.get(&listener), Some(&(slot_two, 2000)));
    }
    assert_eq!(state.weight_percent(two), Some(20.0));
    assert_eq!(state.weight_percent(one), Some(80.0));
    assert!(
        matches!(state.begin(Instant::now()), Err(NotNow::Canary { generation }) if generation == two),
        "no reload while a canary runs"
    );
    assert_eq!(state.promote().unwrap(), (two, one));
    assert_eq!(fake.maps().active.get(&0), Some(&slot_two));
    assert!(fake.maps().canary.is_empty(), "no canary share left");
    assert_eq!(state.active(), Some(two));
    assert_eq!(state.generation(one).unwrap().state, State::Draining);
    assert_eq!(
        state.canary_phase(two),
        CanaryPhase::Ended(CanaryVerdict::Promoted)
    );
    assert!(state.promote().is_err(), "nothing to promote");
    let _ = (c1.kill(), c2.kill());
}

#[test]
fn a_rolled_back_canary_drains_and_everything_goes_to_the_active_one() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (one, slot_one, mut c1) = activate(&mut state);
    let (two, _, mut c2) = ready(&mut state);
    state
        .start_canary(two, Instant::now(), &canary_plan(&[10]))
        .unwrap();
    let done = state.rollback(RollbackReason::Health).unwrap();
    assert_eq!((done.from, done.to), (two, one));
    assert_eq!(fake.maps().active.get(&0), Some(&slot_one));
    assert!(fake.maps().canary.is_empty());
    assert_eq!(state.generation(two).unwrap().state, State::Draining);
    assert!(state.generation(two).unwrap().rolled_back);
    assert_eq!(state.stats.rollbacks.health, 1);
    assert!(matches!(
        state.canary_phase(two),
        CanaryPhase::Ended(CanaryVerdict::RolledBack {
            reason: RollbackReason::Health,
            ..
        })
    ));
    // Reloads may go on.
    assert!(state.begin(Instant::now()).is_ok());
    let _ = (c1.kill(), c2.kill());
}

#[test]
fn a_crashed_canary_is_rolled_back_and_a_crashed_active_promotes_the_canary() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (one, slot_one, mut c1) = activate(&mut state);
    let (two, _, mut c2) = ready(&mut state);
    state
        .start_canary(two, Instant::now(), &canary_plan(&[10]))
        .unwrap();
    let effect = exit(&mut state, &mut c2, "exited with status 2");
    assert_eq!(effect, ExitEffect::Ended { generation: two });
    assert!(fake.maps().canary.is_empty());
    assert_eq!(fake.maps().active.get(&0), Some(&slot_one));
    assert_eq!(state.stats.rollbacks.crash, 1);

    let (three, slot_three, mut c3) = ready(&mut state);
    state
        .start_canary(three, Instant::now(), &canary_plan(&[10]))
        .unwrap();
    let effect = exit(&mut state, &mut c1, "killed by signal 9");
    assert_eq!(
        effect,
        ExitEffect::Crashed {
            generation: one,
            reinstated: Some(three)
        },
        "the ready canary takes over"
    );
    assert_eq!(fake.maps().active.get(&0), Some(&slot_three));
    assert_eq!(state.active(), Some(three));
    let _ = c3.kill();
}

#[test]
fn timed_steps_wait_for_health_and_end_in_a_promotion() {
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    config.rollout.health = Some(crate::config::Health {
        probe: crate::config::Probe::Tcp {
            addr: "127.0.0.1:8080".parse().unwrap(),
            listener: 0,
        },
        interval: Duration::from_secs(1),
        failures: 2,
    });
    let (mut state, fake) = state_with(config);
    let (one, _, mut c1) = activate(&mut state);
    let (two, slot_two, mut c2) = ready(&mut state);
    let mut plan = canary_plan(&[1, 50]);
    plan.dwell_ms = Some(1000);
    let t0 = Instant::now();
    state.start_canary(two, t0, &plan).unwrap();
    let later = Instant::now() + Duration::from_secs(2);
    assert_eq!(
        state.advance_canary(two, later),
        Advanced::Waiting,
        "never checked yet"
    );
    assert!(!state.health_checked(two, Err("refused".into())));
    assert_eq!(
        state.advance_canary(two, later),
        Advanced::Waiting,
        "failing"
    );
    assert!(
        !state.health_checked(one, Err("refused".into())),
        "the old one failing decides nothing"
    );
    assert!(!state.health_checked(two, Ok(())));
    assert_eq!(
        state.advance_canary(two, later),
        Advanced::Step { weight: 5000 }
    );
    assert_eq!(fake.maps().canary.get(&0), Some(&(slot_two, 5000)));
    let even_later = later + Duration::from_secs(2);
    assert_eq!(state.advance_canary(two, even_later), Advanced::Promoted);
    assert_eq!(state.active(), Some(two));
    // Health decides a rollback at exactly the N-th failure in a row.
    let (three, _, mut c3) = ready(&mut state);
    state
        .start_canary(three, Instant::now(), &canary_plan(&[10]))
        .unwrap();
    assert!(!state.health_checked(three, Err("503".into())));
    assert!(
        state.health_checked(three, Err("503".into())),
        "second failure in a row"
    );
    assert!(!state.health_checked(three, Err("503".into())), "said once");
    let _ = (c1.kill(), c2.kill(), c3.kill());
}

#[test]
fn a_hold_is_saved_for_a_successor_controller() {
    let (mut state, _fake) = held_state();
    let (one, _, mut c1) = activate(&mut state);
    let (two, _, mut c2) = activate(&mut state);
    let saved = state.saved();
    let hold = saved.hold.expect("the hold is in the state file");
    assert_eq!((hold.held, hold.successor), (one, two));
    assert_eq!(
        state.saved(),
        saved,
        "the saved form is stable (no rewrite per update)"
    );
    let _ = (c1.kill(), c2.kill());
}

#[test]
fn a_generation_that_loses_its_listeners_keeps_its_slot_when_none_can_take_over() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (number, slot, mut child) = activate(&mut state);
    // Every worker closed its listener at once (gunicorn recycling them):
    // the tree holds none for the address for a moment.
    let refreshed = state
        .refresh(number, vec![Vec::new()], &BTreeSet::new())
        .unwrap();
    assert!(
        matches!(refreshed, Refreshed::LostListener { .. }),
        "{refreshed:?}"
    );
    assert_eq!(state.active(), Some(number));
    assert_eq!(
        fake.maps().active.get(&0),
        Some(&slot),
        "the slot stays active: the bridge holds connections until it listens again"
    );
    exit(&mut state, &mut child, "killed by SIGKILL");
}

#[test]
fn only_a_predecessor_still_listening_is_reinstated() {
    let (mut state, fake) = state(&["127.0.0.1:8080"]);
    let (old, old_slot, mut old_child) = activate(&mut state);
    let (new, new_slot, mut new_child) = activate(&mut state);
    assert_eq!(state.active(), Some(new));
    // The predecessor's registered socket (inode 1000) is no longer
    // listening: it closed its listeners when it began to drain.
    let refreshed = state
        .refresh(new, vec![Vec::new()], &BTreeSet::new())
        .unwrap();
    assert!(
        matches!(refreshed, Refreshed::LostListener { .. }),
        "{refreshed:?}"
    );
    assert_eq!(state.active(), Some(new));
    assert_eq!(fake.maps().active.get(&0), Some(&new_slot));
    // Still listening: it takes over.
    let refreshed = state
        .refresh(new, vec![Vec::new()], &BTreeSet::from([1000]))
        .unwrap();
    assert_eq!(
        refreshed,
        Refreshed::Demoted {
            lost: state.config().listen[0],
            reinstated: old
        }
    );
    assert_eq!(state.active(), Some(old));
    assert_eq!(fake.maps().active.get(&0), Some(&old_slot));
    exit(&mut state, &mut new_child, "killed by SIGKILL");
    exit(&mut state, &mut old_child, "killed by SIGKILL");
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
