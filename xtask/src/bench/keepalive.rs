//! `cargo xtask bench --keepalive`: reloads under HTTP keep-alive load.
//!
//! The load is `kaload` (see `reloader_tests::keepalive`): persistent
//! HTTP/1.1 connections sending requests back to back; a request fails when
//! it gets no complete `200` (the server closed or reset the connection
//! with the request on its way, or before the whole response). For nginx
//! and HAProxy, each reload method (naive, sysctl, reloader) with the
//! server's default configuration, then with each server's own remedies
//! and with longer `reloader run --settle` values.
//!
//! What is counted per request comes from one run with the client's retry
//! on: a request that failed on a reused connection before any byte of its
//! response is sent once more on a new connection. "failed" counts first
//! attempts (what a client without that retry sees); "after retry" counts
//! what still failed with it.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Instant};

use anyhow::{Context, Result};
use reloader_tests::keepalive::{Event, Flags, Outcome};
use serde::Serialize;
use serde_json::json;

use super::{
    report::{self, PhaseStats, Reload, Stat},
    scenario::{self, Bins, Client, Events, Method, Params, Variant},
    server::{Extra, Server},
};

/// One keep-alive scenario: a server, its configuration, a reload method.
#[derive(Clone, Debug)]
pub struct Case {
    pub server: Server,
    /// The server configuration's name in the table ("default", or the
    /// remedy's lines).
    pub config: String,
    pub method: Method,
    pub variant: Variant,
    /// The client's pause between a response and the next request on a
    /// connection, ms (0: back to back).
    pub pause_ms: u64,
}

/// The pause of the paced cases: 100 requests/s per connection.
pub const PACED_MS: u64 = 10;
/// `--settle idle` where clients keep their connections: the bound ends it.
const IDLE_DEFAULT: &str = "idle --settle-max 3s";
/// `--settle idle` where the server recycles connections (closes each
/// after a while with `Connection: close`): it ends when they are gone.
const IDLE_RECYCLED: &str = "idle --settle-max 10s";

impl Case {
    fn new(
        server: Server,
        method: Method,
        config: &str,
        extra: Extra,
        settle: Option<&str>,
    ) -> Self {
        let mut variant = Variant {
            extra,
            reloader_args: Vec::new(),
        };
        // "1s", or "idle --settle-max 10s": --settle's value, then flags.
        if let Some(settle) = settle {
            variant.reloader_args = std::iter::once("--settle")
                .chain(settle.split_whitespace())
                .map(str::to_owned)
                .collect();
        }
        Self {
            server,
            config: config.into(),
            method,
            variant,
            pause_ms: 0,
        }
    }

    fn paced(mut self) -> Self {
        self.pause_ms = PACED_MS;
        self
    }

    /// "back to back" or "pause 10 ms".
    pub fn client_label(&self) -> String {
        if self.pause_ms == 0 {
            "back to back".into()
        } else {
            format!("pause {} ms", self.pause_ms)
        }
    }

    /// "reloader" or "reloader --settle 1s".
    pub fn method_label(&self) -> String {
        if self.variant.reloader_args.is_empty() {
            self.method.name().to_owned()
        } else {
            format!(
                "{} {}",
                self.method.name(),
                self.variant.reloader_args.join(" ")
            )
        }
    }
}

fn lines(global: &[&str], http: &[&str]) -> Extra {
    Extra {
        global: global.iter().map(|l| l.to_string()).collect(),
        http: http.iter().map(|l| l.to_string()).collect(),
    }
}

/// Every case, per server: the three methods on the default configuration,
/// longer settles, then each remedy with a naive reload and with reloader,
/// all with the client sending back to back; then a few with a client that
/// pauses between requests (connections mostly idle, and a per-connection
/// rate far from nginx's `keepalive_requests`).
pub fn cases(servers: &[Server]) -> Vec<Case> {
    use Method::{Naive, Reloader, Sysctl};
    let mut cases = Vec::new();
    for &server in servers {
        let default = || Extra::default();
        for method in [Naive, Sysctl, Reloader] {
            cases.push(Case::new(server, method, "default", default(), None));
        }
        // `auto` is reloader's default; `idle` waits for the clients, which
        // never close here, so its bound ends each settle.
        for settle in [IDLE_DEFAULT, "1s"] {
            cases.push(Case::new(
                server,
                Reloader,
                "default",
                default(),
                Some(settle),
            ));
        }
        // (name, lines, settles to try with reloader besides the default)
        let remedies: Vec<(&str, Extra, &[&str])> = match server {
            Server::Nginx => vec![
                // Ends each connection after 1 s with `Connection: close`
                // on a response: a client reconnects, and the new connection
                // is steered to the new generation.
                (
                    "keepalive_time 1s",
                    lines(&[], &["keepalive_time 1s;"]),
                    &[IDLE_RECYCLED],
                ),
                (
                    "keepalive_requests 100",
                    lines(&[], &["keepalive_requests 100;"]),
                    &[],
                ),
                (
                    "worker_shutdown_timeout 1s",
                    lines(&["worker_shutdown_timeout 1s;"], &[]),
                    &[],
                ),
                // Keep-alive off: every request on a new connection.
                (
                    "keepalive_timeout 0",
                    lines(&[], &["keepalive_timeout 0;"]),
                    &[],
                ),
            ],
            Server::Haproxy => vec![
                (
                    "option idle-close-on-response",
                    lines(&[], &["option idle-close-on-response"]),
                    &[IDLE_RECYCLED],
                ),
                (
                    "close-spread-time 1s",
                    lines(&["close-spread-time 1s"], &[]),
                    &[],
                ),
                (
                    "idle-close-on-response + close-spread-time 1s",
                    lines(
                        &["close-spread-time 1s"],
                        &["option idle-close-on-response"],
                    ),
                    &[],
                ),
            ],
            Server::TestServer => Vec::new(),
        };
        for (name, extra, settles) in &remedies {
            cases.push(Case::new(server, Naive, name, extra.clone(), None));
            cases.push(Case::new(server, Reloader, name, extra.clone(), None));
            for &settle in *settles {
                cases.push(Case::new(
                    server,
                    Reloader,
                    name,
                    extra.clone(),
                    Some(settle),
                ));
            }
        }
        cases.push(Case::new(server, Naive, "default", default(), None).paced());
        cases.push(Case::new(server, Reloader, "default", default(), None).paced());
        cases.push(Case::new(server, Reloader, "default", default(), Some(IDLE_DEFAULT)).paced());
        // The remedy that worked back to back, paced.
        let (name, extra, settles) = match server {
            Server::Nginx => &remedies[0],
            Server::Haproxy => &remedies[0],
            Server::TestServer => continue,
        };
        cases.push(Case::new(server, Naive, name, extra.clone(), None).paced());
        cases.push(Case::new(server, Reloader, name, extra.clone(), None).paced());
        for &settle in *settles {
            cases.push(Case::new(server, Reloader, name, extra.clone(), Some(settle)).paced());
        }
    }
    cases
}

/// What one keep-alive scenario measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// First attempts (a retry is not a new request).
    pub requests: u64,
    pub ok: u64,
    /// First attempts that failed: what a client without retries sees.
    pub failed: u64,
    /// Every failure kind, zero or not (first attempts).
    pub failed_by_kind: BTreeMap<&'static str, u64>,
    /// Of `failed`: on a connection that had carried a request before.
    pub failed_on_reused_connection: u64,
    /// Of `failed`: sent on a reused connection the server had already
    /// closed before the request was written (a client that checks a
    /// connection before reusing it would have avoided these).
    pub failed_closed_before_send: u64,
    /// Of `failed`: on a connection whose previous response came from a
    /// generation already replaced (by the last reload that began before
    /// the failure, or an earlier one).
    pub failed_on_replaced_generation: u64,
    pub retried: u64,
    pub retries_failed: u64,
    /// Requests that failed even with one retry.
    pub failed_after_retry: u64,
    pub reloads: usize,
    pub reloads_failed: usize,
    pub failed_per_reload: f64,
    pub failed_after_retry_per_reload: f64,
    /// Responses that said `Connection: close` (the client then opened a
    /// new connection; nothing failed).
    pub server_closed: u64,
    /// Connections the client opened (first requests on a connection,
    /// retries included).
    pub connections_opened: u64,
    /// From the first to the last request's start.
    pub duration_s: f64,
    /// Successful requests (first attempts and retries) per second.
    pub requests_per_s: f64,
    /// When failures happened: ms after the start of the last reload
    /// that began before each.
    pub failure_after_reload_start: Stat,
    pub phases: PhaseStats,
}

/// Summarises a keep-alive scenario; `reloads` sorted by start. Reload `k`
/// (0-based) starts generation `k + 2` and replaces generation `k + 1`
/// (numbering the first generation 1), for every method: after it began,
/// generations up to `k + 1` are replaced ones.
pub fn summarize(events: &[Event], reloads: &[Reload]) -> Summary {
    let mut s = Summary {
        failed_by_kind: Outcome::ALL
            .iter()
            .filter(|o| o.is_failure())
            .map(|o| (o.name(), 0))
            .collect(),
        reloads: reloads.len(),
        reloads_failed: reloads.iter().filter(|r| !r.succeeded).count(),
        phases: report::phase_stats(reloads),
        ..Summary::default()
    };
    let mut since_reload = Vec::new();
    let mut successes = 0u64;
    for e in events {
        let retry = e.flags.has(Flags::RETRY);
        if !e.flags.has(Flags::REUSED) {
            s.connections_opened += 1;
        }
        if e.flags.has(Flags::SERVER_CLOSED) {
            s.server_closed += 1;
        }
        if !e.outcome.is_failure() {
            successes += 1;
        }
        if retry {
            s.retried += 1;
            if e.outcome.is_failure() {
                s.retries_failed += 1;
            }
            continue;
        }
        s.requests += 1;
        if !e.outcome.is_failure() {
            s.ok += 1;
            continue;
        }
        s.failed += 1;
        *s.failed_by_kind.entry(e.outcome.name()).or_default() += 1;
        if e.flags.has(Flags::REUSED) {
            s.failed_on_reused_connection += 1;
        }
        if e.flags.has(Flags::CLOSED_BEFORE_SEND) {
            s.failed_closed_before_send += 1;
        }
        if let Some(k) = report::reload_before(reloads, e.start_ns) {
            since_reload.push((e.start_ns - reloads[k].start_ns) as f64 / 1e6);
            if e.generation.is_some_and(|g| u64::from(g) <= k as u64 + 1) {
                s.failed_on_replaced_generation += 1;
            }
        }
    }
    s.failed_after_retry = s.failed - s.retried + s.retries_failed;
    if !reloads.is_empty() {
        s.failed_per_reload = s.failed as f64 / reloads.len() as f64;
        s.failed_after_retry_per_reload = s.failed_after_retry as f64 / reloads.len() as f64;
    }
    if let (Some(first), Some(last)) = (events.first(), events.last()) {
        s.duration_s = (last.start_ns - first.start_ns) as f64 / 1e9;
        if s.duration_s > 0.0 {
            s.requests_per_s = successes as f64 / s.duration_s;
        }
    }
    s.failure_after_reload_start = report::stat(since_reload.into_iter());
    s
}

/// One case's results.
#[derive(Serialize)]
pub struct CaseResult {
    pub server: &'static str,
    pub config: String,
    pub config_lines: Extra,
    pub method: String,
    pub client: String,
    pub migrate_req: String,
    pub seconds: f64,
    pub summary: Summary,
    pub failed_reloads: Vec<Reload>,
}

/// Runs every case; returns the results and the table.
pub fn run(servers: &[Server], bins: &Bins, params: &Params) -> Result<(Vec<CaseResult>, String)> {
    let mut results = Vec::new();
    for case in cases(servers) {
        let t = Instant::now();
        eprint!(
            "bench keep-alive: {} [{}] / {} / {} ... ",
            case.server.name(),
            case.config,
            case.method_label(),
            case.client_label()
        );
        let mut params = params.clone();
        if let Client::KeepAlive { pause_ms, .. } = &mut params.client {
            *pause_ms = case.pause_ms;
        }
        let outcome = scenario::run(case.server, case.method, bins, &params, &case.variant)
            .with_context(|| {
                format!(
                    "{} [{}] / {}",
                    case.server.name(),
                    case.config,
                    case.method_label()
                )
            })?;
        let Events::KeepAlive(events) = outcome.events else {
            anyhow::bail!("the keep-alive scenario ran the new-connection client");
        };
        let summary = summarize(&events, &outcome.reloads);
        eprintln!(
            "{:.0}s: {} requests, {} failed ({} after retry), {} reloads ({} failed)",
            t.elapsed().as_secs_f64(),
            summary.requests,
            summary.failed,
            summary.failed_after_retry,
            summary.reloads,
            summary.reloads_failed
        );
        results.push(CaseResult {
            server: case.server.name(),
            config: case.config.clone(),
            config_lines: case.variant.extra.clone(),
            method: case.method_label(),
            client: case.client_label(),
            migrate_req: outcome.migrate_req,
            seconds: t.elapsed().as_secs_f64(),
            failed_reloads: outcome
                .reloads
                .into_iter()
                .filter(|r| !r.succeeded)
                .take(20)
                .collect(),
            summary,
        });
    }
    let table = render(&results);
    Ok((results, table))
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The keep-alive table, as plain text (also valid Markdown).
pub fn render(results: &[CaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Keep-alive requests (failed = no complete 200; kinds: closed = FIN before any byte of \
         the response, reset = RST before any byte, send = the request could not be written; \
         seen closed = of the failed, sent on a connection whose FIN or RST had already \
         arrived (a client that checks before reuse would not have sent them there); after \
         retry = still failed with one retry of a request that failed on a reused connection \
         before any byte of its response)\n"
    );
    let _ = writeln!(
        out,
        "| server | server config | method | client | reloads | requests | failed | failed/reload | closed | reset | send | other | on replaced gen | seen closed | after retry | after retry/reload | Connection: close | req/s | reload total ms (median) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in results {
        let s = &r.summary;
        let k = |name: &str| s.failed_by_kind.get(name).copied().unwrap_or(0);
        let other: u64 = s
            .failed_by_kind
            .iter()
            .filter(|(name, _)| !matches!(**name, "closed" | "reset" | "send_failed"))
            .map(|(_, n)| n)
            .sum();
        let failed_reloads = if s.reloads_failed > 0 {
            format!(" ({} failed)", s.reloads_failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {}{failed_reloads} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.0} | {} |",
            r.server,
            r.config,
            r.method,
            r.client,
            s.reloads,
            s.requests,
            s.failed,
            s.failed_per_reload,
            k("closed"),
            k("reset"),
            k("send_failed"),
            other,
            s.failed_on_replaced_generation,
            s.failed_closed_before_send,
            s.failed_after_retry,
            s.failed_after_retry_per_reload,
            s.server_closed,
            s.requests_per_s,
            if s.phases.total.n == 0 {
                "-".into()
            } else {
                ms(s.phases.total.median_ms)
            },
        );
    }
    out
}

/// The keep-alive section of a `cargo xtask bench` run, end to end.
pub fn section(
    servers: &[Server],
    bins: &Bins,
    params: &Params,
    json_path: &Path,
    machine: &serde_json::Value,
    started: Instant,
) -> Result<()> {
    let Client::KeepAlive { connections, .. } = params.client else {
        anyhow::bail!("the keep-alive section needs the keep-alive client");
    };
    eprintln!(
        "bench keep-alive: {} reloads per scenario every {} ms, {connections} keep-alive \
         connections; {}",
        params.reloads, params.interval_ms, machine["summary"]
    );
    let (results, table) = run(servers, bins, params)?;
    println!("{table}");
    let document = json!({
        "command": super::command_line(),
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "params": params,
        "scenarios": results,
        "table": table,
    });
    std::fs::write(json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    eprintln!(
        "bench keep-alive: done in {:.0}s; wrote {}",
        started.elapsed().as_secs_f64(),
        json_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Phases;

    const MS: u64 = 1_000_000;

    fn event(at_ms: u64, outcome: Outcome, flags: u8, generation: Option<u32>) -> Event {
        Event {
            start_ns: 1_000 * MS + at_ms * MS,
            latency_us: 100,
            outcome,
            flags: Flags(flags),
            generation,
        }
    }

    fn reload(from_ms: u64, to_ms: u64) -> Reload {
        Reload {
            start_ns: 1_000 * MS + from_ms * MS,
            end_ns: 1_000 * MS + to_ms * MS,
            succeeded: true,
            error: None,
            phases: Phases {
                total_ms: Some((to_ms - from_ms) as f64),
                ..Phases::default()
            },
        }
    }

    #[test]
    fn first_attempts_count_as_requests_and_retries_only_after_retry() {
        let reused = Flags::REUSED;
        let events = vec![
            event(0, Outcome::Ok, 0, Some(1)),
            event(1, Outcome::Ok, reused, Some(1)),
            // Reload 0 (gen 2 replaces gen 1) starts at 100 ms.
            event(150, Outcome::Closed, reused, Some(1)),
            event(150, Outcome::Ok, Flags::RETRY, Some(2)),
            event(
                160,
                Outcome::Reset,
                reused | Flags::CLOSED_BEFORE_SEND,
                Some(1),
            ),
            event(161, Outcome::Reset, Flags::RETRY, None),
            event(170, Outcome::Ok, Flags::SERVER_CLOSED, Some(2)),
            // Reload 1 (gen 3 replaces gen 2) starts at 300 ms.
            event(320, Outcome::SendFailed, reused, Some(1)),
            event(325, Outcome::Timeout, reused, Some(3)),
            event(320, Outcome::Ok, Flags::RETRY, Some(3)),
            event(330, Outcome::Refused, 0, None),
            event(400, Outcome::Ok, reused, Some(3)),
        ];
        let reloads = [reload(100, 200), reload(300, 350)];
        let s = summarize(&events, &reloads);
        assert_eq!(s.requests, 9);
        assert_eq!(s.ok, 4);
        assert_eq!(s.failed, 5);
        assert_eq!(s.failed_by_kind["closed"], 1);
        assert_eq!(s.failed_by_kind["reset"], 1);
        assert_eq!(s.failed_by_kind["send_failed"], 1);
        assert_eq!(s.failed_by_kind["refused"], 1);
        assert_eq!(s.failed_by_kind["timeout"], 1);
        assert_eq!(s.failed_on_reused_connection, 4);
        assert_eq!(s.failed_closed_before_send, 1);
        // Gen 1 after reload 0 began (twice) and after reload 1 began; the
        // refused connection had no generation.
        assert_eq!(s.failed_on_replaced_generation, 3);
        assert_eq!((s.retried, s.retries_failed), (3, 1));
        // The refused and the timed-out requests were not retried; one
        // retry failed.
        assert_eq!(s.failed_after_retry, 3);
        assert_eq!(s.failed_per_reload, 2.5);
        assert_eq!(s.failed_after_retry_per_reload, 1.5);
        assert_eq!(s.server_closed, 1);
        // Requests without REUSED: the first, three retries, two others.
        assert_eq!(s.connections_opened, 6);
        assert!((s.duration_s - 0.4).abs() < 1e-9);
        // Successes, retries included.
        assert!((s.requests_per_s - 6.0 / 0.4).abs() < 1e-9);
        // 50, 60, 20, 25 and 30 ms after their reload's start.
        assert_eq!(s.failure_after_reload_start.n, 5);
        assert_eq!(s.failure_after_reload_start.median_ms, 30.0);
        assert_eq!(s.failure_after_reload_start.max_ms, 60.0);
        assert_eq!(s.phases.total.n, 2);
    }

    #[test]
    fn nothing_failed_means_zero_everywhere() {
        let events = vec![
            event(0, Outcome::Ok, 0, Some(1)),
            event(10, Outcome::Ok, Flags::REUSED, Some(1)),
        ];
        let s = summarize(&events, &[reload(5, 8)]);
        assert_eq!((s.failed, s.failed_after_retry, s.retried), (0, 0, 0));
        assert_eq!(s.failed_per_reload, 0.0);
        assert_eq!(s.failure_after_reload_start, Stat::default());
        assert!(s.failed_by_kind.values().all(|&n| n == 0));
    }

    #[test]
    fn every_server_gets_the_three_methods_then_its_remedies() {
        let cases = cases(&[Server::Nginx, Server::Haproxy]);
        let of = |server: Server| cases.iter().filter(move |c| c.server == server);
        let defaults: Vec<String> = of(Server::Haproxy)
            .filter(|c| c.config == "default" && c.pause_ms == 0)
            .map(Case::method_label)
            .collect();
        assert_eq!(
            defaults,
            [
                "naive",
                "sysctl",
                "reloader",
                "reloader --settle idle --settle-max 3s",
                "reloader --settle 1s"
            ]
        );
        let spread = of(Server::Haproxy)
            .find(|c| c.config == "close-spread-time 1s")
            .unwrap();
        assert_eq!(spread.variant.extra.global, ["close-spread-time 1s"]);
        assert!(of(Server::Nginx).any(|c| c.config == "keepalive_time 1s"
            && c.method_label() == "reloader --settle idle --settle-max 10s"));
        assert!(
            cases
                .iter()
                .all(|c| c.method == Method::Reloader || c.variant.reloader_args.is_empty())
        );
        let paced: Vec<String> = of(Server::Nginx)
            .filter(|c| c.pause_ms > 0)
            .map(|c| format!("{} / {}", c.config, c.method_label()))
            .collect();
        assert_eq!(
            paced,
            [
                "default / naive",
                "default / reloader",
                "default / reloader --settle idle --settle-max 3s",
                "keepalive_time 1s / naive",
                "keepalive_time 1s / reloader",
                "keepalive_time 1s / reloader --settle idle --settle-max 10s"
            ]
        );
    }
}
