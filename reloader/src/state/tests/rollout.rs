//! Rollback and canary: a held previous generation coming back, canary
//! shares until promoted or rolled back, timed steps, holds saved for a
//! successor, and which predecessor may be reinstated.

use std::{process::Child, time::Instant};

use super::*;
use crate::{
    status::{ReloadResult, RollbackReason},
    steering::fake::FakeSteering,
};

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
