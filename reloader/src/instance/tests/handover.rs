//! Hand-overs: the loop ends without signalling any generation, waits for
//! the reload under way, refuses new ones, and loses to a stop.

use std::time::Duration;

use nix::sys::wait::waitpid;
use tokio::sync::oneshot;

use super::{
    super::{Ended, Event},
    harness::{FakeHost, Harness, report},
};
use crate::{config::RunConfig, control::Response, generation::State, status::ReloadResult};

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
