//! The human forms of the reports: what people read stays complete and
//! aligned.

use super::{
    CounterStatus, FlowTableStatus, GenerationStatus, HealthStatus, ListenerStatus, ReloadReport,
    ReloadResult, RolloutKind, RolloutStatus, SocketStatus, StatusReport,
};
use crate::generation::State;

#[test]
fn reload_reports_name_the_config_and_what_a_check_refused() {
    let done = ReloadReport {
        generation: 3,
        previous: Some(2),
        result: ReloadResult::Succeeded,
        config_sha256: Some("ab".repeat(32)),
        ..ReloadReport::default()
    };
    assert!(
        done.human()
            .starts_with("generation 3 active (replaced 2): ")
    );
    assert!(
        done.human()
            .ends_with(&format!("; config sha256 {}", "ab".repeat(32)))
    );
    let refused = ReloadReport {
        generation: 3,
        previous: Some(2),
        error: Some(
            "--check `nginx -t` exited with status 1: nothing was started; it printed:\n  bad"
                .into(),
        ),
        stderr_tail: vec!["bad".into()],
        check_failed: true,
        ..ReloadReport::default()
    };
    assert_eq!(
        refused.human(),
        "reload to generation 3 failed (generation 2 is still active): --check `nginx -t` \
         exited with status 1: nothing was started; it printed:\n  bad",
        "the output once, after what still runs"
    );
    let failed = ReloadReport {
        check_failed: false,
        ..refused.clone()
    };
    assert!(
        failed
            .human()
            .contains("; generation 2 is still active\nlast stderr lines")
    );
}

fn generation(n: u64, state: State) -> GenerationStatus {
    GenerationStatus {
        generation: n,
        pid: Some(1000 + n as u32),
        state,
        age_ms: 1200,
        slot: 0,
        outcome: None,
        sockets: vec![SocketStatus {
            addr: "127.0.0.1:8080".into(),
            inode: 4242,
            cookie: 7,
            accept_queue: Some(3),
        }],
        counters: CounterStatus {
            steered: 123_456,
            ..CounterStatus::default()
        },
        udp_flows: 0,
        config_sha256: None,
        weight_percent: None,
        steered_per_second: None,
        health: None,
        cgroup: None,
        evicted: None,
        connections: None,
        memory_bytes: None,
        cpu_seconds: None,
        processes: None,
        unavailable: Default::default(),
    }
}

/// The start of `needle` in `line`.
fn column(line: &str, needle: &str) -> usize {
    line.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {line:?}"))
}

#[test]
fn status_tables_align_and_keep_every_detail() {
    let mut canary = generation(2, State::Canary);
    canary.weight_percent = Some(20.0);
    canary.steered_per_second = Some(41.7);
    canary.config_sha256 = Some("cd".repeat(32));
    canary.health = Some(HealthStatus {
        checks: 5,
        consecutive_failures: 2,
        last_error: Some("connect: refused".into()),
    });
    let mut exited = generation(1, State::Exited);
    exited.pid = None;
    exited.outcome = Some("exited with status 0".into());
    exited.sockets[0].accept_queue = None;
    let report = StatusReport {
        name: "web".into(),
        listeners: vec![
            ListenerStatus {
                addr: "127.0.0.1:8080".into(),
                active_generation: Some(1),
                bridged: 17,
                ..ListenerStatus::default()
            },
            ListenerStatus {
                addr: "udp://127.0.0.1:53?mode=flows".into(),
                active_generation: None,
                flow_table: Some(FlowTableStatus {
                    flows: 2,
                    capacity: 65536,
                }),
                ..ListenerStatus::default()
            },
        ],
        generations: vec![canary, exited],
        rollout: Some(RolloutStatus {
            kind: RolloutKind::Canary,
            generation: 2,
            previous: 1,
            weight_percent: 20.0,
            steps_percent: vec![20.0, 50.0],
            step: 0,
            remaining_ms: None,
        }),
        ..StatusReport::default()
    };
    let text = report.human();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().all(|l| l.trim_end() == *l), "{text}");

    let listeners = lines
        .iter()
        .position(|l| l.starts_with("LISTENER"))
        .unwrap();
    let [header, tcp, udp] = [0, 1, 2].map(|n| lines[listeners + n]);
    assert_eq!(column(header, "ACTIVE"), column(tcp, "1 "), "{text}");
    assert_eq!(column(header, "ACTIVE"), column(udp, "- "), "{text}");
    // Numbers right-aligned under their header.
    let end = |line: &str, needle: &str| column(line, needle) + needle.len();
    assert_eq!(end(header, "BRIDGE HELD"), end(tcp, "17"), "{text}");
    assert_eq!(end(header, "FLOW TABLE"), end(udp, "2/65536"), "{text}");

    let generations = lines.iter().position(|l| l.contains("STEERED")).unwrap();
    let [header, canary, exited] = [0, 1, 2].map(|n| lines[generations + n]);
    for row in [canary, exited] {
        assert_eq!(end(header, "STEERED"), end(row, "123456"), "{text}");
        assert_eq!(
            column(header, "SOCKETS"),
            column(row, "127.0.0.1:8080 4242:"),
            "{text}"
        );
    }
    assert_eq!(column(header, "STATE"), column(canary, "canary"), "{text}");
    assert_eq!(column(header, "CONFIG"), column(canary, "cdcdcdcdcdcd "));
    assert!(canary.contains("4242:3"), "{text}");
    assert!(
        canary.contains(
            "[20% of new connections, 42 steered/s]  \
             [health: 2 failures in a row: connect: refused]"
        ),
        "{text}"
    );
    assert_eq!(
        exited.split_whitespace().take(3).collect::<Vec<_>>(),
        ["1", "-", "exited"],
        "{text}"
    );
    assert!(exited.contains("4242:closed"), "{text}");
    assert!(exited.ends_with("(exited with status 0)"), "{text}");
    assert!(text.contains("\ncanary: generation 2 gets 20% of new connections"));

    // Columns nothing fills are left out.
    let plain = StatusReport {
        listeners: vec![report.listeners[0].clone()],
        generations: vec![generation(3, State::Active)],
        ..StatusReport::default()
    };
    let text = plain.human();
    assert!(!text.contains("FLOW TABLE"), "{text}");
    assert!(!text.contains("CONFIG"), "{text}");
    assert!(!text.contains("NOTES"), "{text}");
    assert!(text.contains("BRIDGE HELD"), "{text}");
}

/// A generation `--keep-previous` holds reads `held` in the table (its
/// state is `draining` in `--json`; issue 29: the table said `draining`,
/// as if it had been told to drain), and only that one.
#[test]
fn a_held_generation_reads_held() {
    let hold = RolloutStatus {
        kind: RolloutKind::Hold,
        generation: 2,
        previous: 1,
        weight_percent: 100.0,
        steps_percent: Vec::new(),
        step: 0,
        remaining_ms: Some(50_000),
    };
    let report = StatusReport {
        generations: vec![
            generation(3, State::Draining),
            generation(2, State::Active),
            generation(1, State::Draining),
        ],
        rollout: Some(hold.clone()),
        ..StatusReport::default()
    };
    let text = report.human();
    let state = |n: &str| {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n) && l.contains("127.0.0.1"))
            .unwrap_or_else(|| panic!("no row for generation {n}: {text}"));
        row.split_whitespace().nth(2).unwrap().to_owned()
    };
    assert_eq!(state("1"), "held", "{text}");
    assert_eq!(state("2"), "active", "{text}");
    assert_eq!(state("3"), "draining", "{text}");
    // A canary's previous generation is active, not held.
    let canary = StatusReport {
        rollout: Some(RolloutStatus {
            kind: RolloutKind::Canary,
            ..hold
        }),
        generations: vec![generation(1, State::Active)],
        ..report
    };
    assert!(!canary.human().contains("held"), "{}", canary.human());
}

/// The `GODEBUG=multipathtcp=0` note is printed once a Go server was seen,
/// not for every server (issue 29).
#[test]
fn the_godebug_note_is_for_go_servers_only() {
    let report = StatusReport {
        server_environment: vec!["GODEBUG=multipathtcp=0".into()],
        ..StatusReport::default()
    };
    assert!(!report.human().contains("GODEBUG"), "{}", report.human());
    let go = StatusReport {
        go_server_seen: true,
        ..report
    };
    assert!(
        go.human()
            .contains("servers get GODEBUG=multipathtcp=0 (Go listens with plain TCP"),
        "{}",
        go.human()
    );
}
