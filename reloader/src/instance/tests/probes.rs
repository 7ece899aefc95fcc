//! Status, metrics and the `/healthz` and `/readyz` probes answering
//! while the owner is busy: a slow process walk, the first start, the
//! stop.

use std::time::{Duration, Instant};

use super::{
    super::{Ended, Event},
    harness::{FakeHost, Harness},
};
use crate::{config::RunConfig, generation::State};

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
