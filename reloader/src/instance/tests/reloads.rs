//! Reloads from start to exit: cutovers and drains one after another, a
//! candidate that never listens, a failed cutover, a stop during a start,
//! a crashed active generation restarted, and a reload whose generation a
//! later one replaced.

use std::{
    collections::HashMap,
    net::TcpListener,
    os::{fd::OwnedFd, unix::process::CommandExt},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::wait::waitpid;

use super::harness::{FakeHost, Harness, report};
use crate::{
    config::RunConfig,
    discovery::{Holder, Listener},
    error::FailureKind,
    generation::{Generations, State},
    state::{FoundSocket, HISTORY, InstanceState},
    status::ReloadResult,
    steering::fake::FakeSteering,
    supervisor::{Process, StderrTail},
};

#[tokio::test(flavor = "current_thread")]
async fn reloads_cut_over_and_drain_one_generation_after_another() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080", "[::1]:8443"]);
    let h = Harness::start(config, FakeHost::new(2, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    for n in 2..=7u64 {
        let report = report(h.reload(None).await);
        assert_eq!(report.result, ReloadResult::Succeeded, "{report:?}");
        assert_eq!(report.generation, n);
        assert_eq!(report.previous, Some(n - 1));
        let snapshot = h.client.snapshot();
        assert_eq!(snapshot.active, Some(n));
        assert!(snapshot.ended(n - 1), "the barrier waits for the old one");
        let slot = h.status().await.generations[0].slot;
        assert_eq!(h.fake.maps().active.get(&0), Some(&slot));
        assert_eq!(h.fake.maps().active.get(&1), Some(&slot));
    }
    let status = h.status().await;
    assert_eq!(
        status.reloads_succeeded, 6,
        "the first start is not a reload"
    );
    assert_eq!(status.listeners[0].active_generation, Some(7));
    let (clean, first_failure) = h.stop().await;
    assert!(clean);
    assert!(first_failure.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_candidate_that_never_listens_is_killed_and_the_old_one_stays_active() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let h = Harness::start(config, FakeHost::new(1, |n| n == 1));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let old_slot = h.fake.maps().active[&0];

    let report = report(h.reload(None).await);
    assert_eq!(report.result, ReloadResult::Failed);
    assert_eq!(report.generation, 2);
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("no listening socket for 127.0.0.1:8080"),
        "{error}"
    );
    let failure = report.failure.expect("a failure kind");
    assert_eq!(failure.kind, FailureKind::NotReady);
    assert_eq!(failure.active, Some(1));
    assert_eq!(h.client.snapshot().active, Some(1));
    assert_eq!(h.fake.maps().active.get(&0), Some(&old_slot));
    assert!(h.client.snapshot().is(2, State::Failed));
    h.until("the candidate's process was reaped", |_| {
        h.host.pids.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(h.status().await.reloads_failed, 1);
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_cutover_is_a_failed_reload_with_the_old_generation_active() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080", "127.0.0.1:8443"]);
    let h = Harness::start(config, FakeHost::new(2, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let old_slot = h.fake.maps().active[&0];
    h.fake.maps().fail_set_active.insert(1);
    let report = report(h.reload(None).await);
    assert!(
        report
            .error
            .as_deref()
            .unwrap()
            .contains("127.0.0.1:8443: cutover failed"),
        "{report:?}"
    );
    assert_eq!(report.failure.unwrap().kind, FailureKind::SteeringFailed);
    assert_eq!(h.fake.maps().active.get(&0), Some(&old_slot));
    assert_eq!(h.client.snapshot().active, Some(1));
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_stop_during_a_start_kills_the_candidate() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let h = Harness::start(config, FakeHost::new(1, |_| false));
    h.until("the first generation runs", |s| {
        s.generation(1).is_some_and(|g| g.pid.is_some())
    })
    .await;
    let pids = h.host.pids.lock().unwrap().clone();
    let (clean, first_failure) = h.stop().await;
    assert!(clean);
    assert!(
        first_failure.is_none(),
        "a stop is not a failed first start"
    );
    // Killed (the real instance then reaps it with whatever else is left).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|pid| FakeHost::waitid(*pid).is_some()) {
        assert!(Instant::now() < deadline, "the candidate was not killed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for pid in pids {
        let _ = waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_crashed_active_generation_is_restarted_by_the_owner() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let h = Harness::start(config, FakeHost::new(1, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let pid = h.client.snapshot().generation(1).unwrap().pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    h.until("generation 2 replaced the crashed one", |s| {
        s.active == Some(2)
    })
    .await;
    assert_eq!(h.status().await.restarts, 1);
    h.stop().await;
}

#[test]
fn a_reload_of_a_generation_replaced_by_a_later_one_succeeded() {
    // The case two overlapping `reload --wait` hit: 32 cut over, 33 cut
    // over and drained 32 before 31 had exited, so 32 ended before its own
    // barrier. Its reload succeeded.
    use crate::status::ReloadReport;
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let fake = FakeSteering::default();
    let config = Arc::new(config);
    let mut state = InstanceState::new(
        config.clone(),
        config.limits(),
        Box::new(fake),
        Generations::new(config.limits().slots, HISTORY),
        HashMap::new(),
        None,
    );
    let mut children = Vec::new();
    for _ in 0..3 {
        let begun = state.begin(Instant::now()).unwrap();
        let child = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        state
            .spawned(
                begun.number,
                Process::child(child.id()).unwrap(),
                StderrTail::default(),
            )
            .unwrap();
        let found = vec![vec![FoundSocket {
            socket: Listener {
                transport: crate::net::Transport::Tcp,
                inode: begun.number,
                cookie: 0,
                addr: listener.local_addr().unwrap(),
                accept_queue: 0,
                backlog: 128,
            },
            holder: Holder {
                pid: child.id(),
                fd: 3,
            },
            process: "sleep".into(),
            go: false,
            copy: OwnedFd::from(listener.try_clone().unwrap()),
        }]];
        state.register(begun.number, found).unwrap();
        state.cut_over(begun.number, Instant::now()).unwrap();
        children.push((child, listener));
    }
    // Generation 2 was replaced by 3 and has exited; 1 still drains.
    let pid = children[1].0.id();
    state.exited(pid, "exited with status 0");
    let mut report = ReloadReport {
        generation: 2,
        previous: Some(1),
        ..ReloadReport::default()
    };
    state.conclude(&mut report, false);
    assert_eq!(report.result, ReloadResult::Succeeded, "{report:?}");
    assert!(report.failure.is_none());
    for (mut child, _) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}
