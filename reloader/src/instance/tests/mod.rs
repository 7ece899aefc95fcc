//! The run loop end to end, unprivileged: the [`Owner`] with real `sleep`
//! processes as servers, loopback sockets as their listeners, and the fake
//! steering. Requests arrive as the control server sends them ([`Event`]s
//! with a reply), and exits as `SIGCHLD` does (a small reaper task of the
//! test watches only the fake host's own children and says when one
//! exited).

mod harness;

use std::{
    collections::HashMap,
    net::TcpListener,
    os::{fd::OwnedFd, unix::process::CommandExt},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use harness::{FakeHost, Harness, report};
use nix::sys::wait::waitpid;
use tokio::sync::oneshot;

use super::{Ended, Event};
use crate::{
    config::{CanaryPlan, RunConfig},
    control::Response,
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
async fn reload_promote_and_rollback_are_decided_in_one_place() {
    let mut config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    config.rollout.keep_previous = Duration::from_secs(60);
    let h = Harness::start(config, FakeHost::new(1, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;

    // Nothing to promote; a rollback during the hold brings 1 back.
    match h.ask(|reply| Event::Promote { wait: true, reply }).await {
        Response::Error { message } => assert!(message.contains("no canary runs"), "{message}"),
        other => panic!("{other:?}"),
    }
    let held = report(h.reload(None).await);
    assert_eq!(held.result, ReloadResult::Succeeded);
    assert!(held.held_ms.is_some(), "answered at the cutover: 1 is held");
    match h.ask(|reply| Event::Rollback { wait: true, reply }).await {
        Response::RolledBack { report } => {
            assert_eq!((report.from, report.to), (2, 1));
            assert!(report.from_exited_ms.is_some(), "waited for 2 to exit");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.client.snapshot().active, Some(1));
    let last = h.status().await.last_reload.expect("a last reload");
    assert_eq!(last.result, ReloadResult::RolledBack);
    assert_eq!(last.failure.unwrap().kind, FailureKind::RolledBack);

    // A canary: while it runs, a reload is refused in the same step that
    // sees it, and a second canary too; promote makes it active.
    let plan = CanaryPlan {
        steps: vec![1000],
        dwell_ms: None,
    };
    let canary = {
        let events = h.events.clone();
        let plan = plan.clone();
        tokio::spawn(async move {
            let (reply, answer) = oneshot::channel();
            events
                .send(Event::Reload {
                    wait: true,
                    canary: Some(plan),
                    reply: Some(reply),
                })
                .await
                .unwrap();
            answer.await.unwrap()
        })
    };
    h.until("generation 3 is a canary", |s| s.canary == Some(3))
        .await;
    for canary in [None, Some(plan)] {
        match h.reload(canary).await {
            Response::Error { message } => {
                assert!(message.contains("generation 3 is a canary"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
    // With `wait`, a held generation is not waited for (it is kept for
    // a rollback): the answer says for how long instead.
    match h.ask(|reply| Event::Promote { wait: true, reply }).await {
        Response::Promoted {
            generation,
            previous,
            previous_exited_ms,
            held_ms,
        } => {
            assert_eq!((generation, previous), (3, 1));
            assert!(previous_exited_ms.is_none() && held_ms.is_some_and(|ms| ms > 50_000.0));
        }
        other => panic!("{other:?}"),
    }
    let promoted = report(canary.await.unwrap());
    assert_eq!(promoted.result, ReloadResult::Succeeded, "{promoted:?}");
    assert_eq!(h.client.snapshot().active, Some(3));
    h.stop().await;
}

/// `promote --wait` answers once the generation beside the canary has
/// exited, as `rollback --wait` does for the one rolled back from.
#[tokio::test(flavor = "current_thread")]
async fn promote_with_wait_answers_once_the_previous_generation_exited() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let h = Harness::start(config, FakeHost::new(1, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let plan = CanaryPlan {
        steps: vec![500],
        dwell_ms: None,
    };
    let canary = {
        let events = h.events.clone();
        tokio::spawn(async move {
            let (reply, answer) = oneshot::channel();
            let reload = Event::Reload {
                wait: true,
                canary: Some(plan),
                reply: Some(reply),
            };
            events.send(reload).await.unwrap();
            answer.await.unwrap()
        })
    };
    h.until("generation 2 is a canary", |s| s.canary == Some(2))
        .await;
    match h.ask(|reply| Event::Promote { wait: true, reply }).await {
        Response::Promoted {
            generation,
            previous,
            previous_exited_ms,
            held_ms,
        } => {
            assert_eq!((generation, previous), (2, 1));
            assert!(previous_exited_ms.is_some() && held_ms.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        h.client.snapshot().ended(1),
        "answered before generation 1 exited"
    );
    let promoted = report(canary.await.unwrap());
    assert_eq!(promoted.result, ReloadResult::Succeeded, "{promoted:?}");
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn status_and_metrics_answer_while_a_process_walk_is_slow() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let mut host = FakeHost::new(1, |_| true);
    host.scan_takes = Duration::from_secs(2);
    let h = Harness::start(config, host);
    h.until("the first generation runs", |s| {
        s.generation(1).is_some_and(|g| g.pid.is_some())
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = tokio::spawn(crate::metrics::serve(
        h.client.clone(),
        listener,
        crate::metrics::Endpoints::MetricsAndProbes,
    ));
    // The candidate's first scan takes 2 s; meanwhile the owner answers.
    for _ in 0..3 {
        let t0 = Instant::now();
        let status = h.status().await;
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "status took {:?}",
            t0.elapsed()
        );
        assert_eq!(status.generations[0].state, State::Starting);
        let t0 = Instant::now();
        let body = scrape(addr).await;
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "a scrape took {:?}",
            t0.elapsed()
        );
        assert!(
            body.contains("reloader_generations{state=\"starting\"} 1"),
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(h.client.snapshot().active.is_none(), "still scanning");
    metrics.abort();
    h.stop().await;
}

/// `GET /metrics` from `addr`.
async fn scrape(addr: std::net::SocketAddr) -> String {
    get(addr, "/metrics").await
}

/// `GET path` from `addr`: the whole response, head and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// The probes: `/readyz` is 503 while the first generation starts (its
/// scan is slow here) and once the stop began, 200 while it is active;
/// `/healthz` is 200 throughout, each answered at once; the probes'
/// own address serves no metrics.
#[tokio::test(flavor = "current_thread")]
async fn probes_follow_the_first_start_and_the_stop_without_waiting() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let mut host = FakeHost::new(1, |_| true);
    host.scan_takes = Duration::from_secs(1);
    let h = Harness::start(config, host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probes = tokio::spawn(crate::metrics::serve(
        h.client.clone(),
        listener,
        crate::metrics::Endpoints::Probes,
    ));
    let quick = |t0: Instant, what: &str| {
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{what} took {:?}",
            t0.elapsed()
        )
    };
    let t0 = Instant::now();
    let ready = get(addr, "/readyz").await;
    quick(t0, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("no generation is active"),
        "{ready}"
    );
    let t0 = Instant::now();
    let healthy = get(addr, "/healthz").await;
    quick(t0, "/healthz");
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    let metrics = get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 404"), "{metrics}");

    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let ready = get(addr, "/readyz?verbose").await;
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("generation 1 is active"),
        "{ready}"
    );

    h.events.send(Event::Stop).await.unwrap();
    h.until("the stop began", |s| s.stopping).await;
    let ready = get(addr, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("stopping"),
        "{ready}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), h.owner)
        .await
        .expect("stopped in time")
        .expect("no panic");
    assert!(matches!(ended, Ended::Stopped { clean: true, .. }));
    // The owner is gone: it cannot answer.
    let healthy = get(addr, "/healthz").await;
    assert!(healthy.starts_with("HTTP/1.1 503"), "{healthy}");
    h.reaper.abort();
    probes.abort();
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

/// Whether `pid` (a child of the test, unreaped) still runs.
fn runs(pid: u32) -> bool {
    FakeHost::waitid(pid).is_none()
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Kills and reaps what a test left running on purpose.
fn kill_and_reap(pids: &[u32]) {
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(*pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_handover_ends_the_loop_without_signalling_any_generation() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let h = Harness::start(config, FakeHost::new(1, |_| true));
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let report = report(h.reload(None).await);
    assert_eq!(report.result, ReloadResult::Succeeded, "{report:?}");
    let pid = h.client.snapshot().generation(2).unwrap().pid.unwrap();
    match h.ask(|reply| Event::Handover { reply }).await {
        Response::HandingOver { controller_pid } => {
            assert_eq!(controller_pid, std::process::id())
        }
        other => panic!("{other:?}"),
    }
    let client = h.client.clone();
    let pids = h.host.pids.lock().unwrap().clone();
    assert!(matches!(h.ended().await, Ended::HandedOver));
    // What the successor adopts by: generation 2 active, in the state
    // file's content as last published.
    let snapshot = client.snapshot();
    assert_eq!(snapshot.active, Some(2));
    assert!(
        snapshot
            .saved
            .generations
            .iter()
            .any(|g| g.number == 2 && g.pid == pid && g.state == State::Active)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(runs(pid), "the active generation was signalled");
    kill_and_reap(&pids);
}

#[tokio::test(flavor = "current_thread")]
async fn a_handover_waits_for_the_reload_under_way_and_refuses_new_ones() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let mut host = FakeHost::new(1, |_| true);
    // Each look at a process tree takes a while: the reload is still under
    // way when the hand-over arrives.
    host.scan_takes = Duration::from_millis(150);
    let h = Harness::start(config, host);
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    let (reply, waited) = oneshot::channel();
    h.events
        .send(Event::Reload {
            wait: true,
            canary: None,
            reply: Some(reply),
        })
        .await
        .unwrap();
    h.until("generation 2 starts", |s| s.generation(2).is_some())
        .await;
    assert!(matches!(
        h.ask(|reply| Event::Handover { reply }).await,
        Response::HandingOver { .. }
    ));
    match h
        .ask(|reply| Event::Reload {
            wait: true,
            canary: None,
            reply: Some(reply),
        })
        .await
    {
        Response::Error { message } => assert!(message.contains("handing over"), "{message}"),
        other => panic!("a reload was taken during a hand-over: {other:?}"),
    }
    let client = h.client.clone();
    let pids = h.host.pids.lock().unwrap().clone();
    assert!(matches!(h.ended().await, Ended::HandedOver));
    // The reload reached its cut-over before the loop ended: no candidate
    // is left half-started for the successor (it would kill it).
    let snapshot = client.snapshot();
    assert_eq!(snapshot.active, Some(2), "{:?}", snapshot.live());
    assert!(
        snapshot
            .live()
            .iter()
            .all(|(_, s)| !matches!(s, State::Starting | State::Ready))
    );
    // Its waiter learns the controller went away before the barrier.
    let _ = waited.await;
    kill_and_reap(&pids);
}

#[tokio::test(flavor = "current_thread")]
async fn a_stop_during_a_handover_wins() {
    let config = RunConfig::for_tests(&["127.0.0.1:8080"]);
    let mut host = FakeHost::new(1, |_| true);
    host.scan_takes = Duration::from_millis(150);
    let h = Harness::start(config, host);
    h.until("generation 1 is active", |s| s.active == Some(1))
        .await;
    h.events
        .send(Event::Reload {
            wait: false,
            canary: None,
            reply: None,
        })
        .await
        .unwrap();
    h.until("generation 2 starts", |s| s.generation(2).is_some())
        .await;
    assert!(matches!(
        h.ask(|reply| Event::Handover { reply }).await,
        Response::HandingOver { .. }
    ));
    let (clean, _) = h.stop().await;
    assert!(clean, "every generation drained");
}
