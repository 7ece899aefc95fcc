//! Rollback and promotion, decided by the owner in one place, and their
//! `--wait` answers.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{
    super::Event,
    harness::{FakeHost, Harness, report},
};
use crate::{
    config::{CanaryPlan, RunConfig},
    control::Response,
    error::FailureKind,
    status::ReloadResult,
};

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
