//! The fleet barrier's decisions from made-up query answers.

use super::*;

const X: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const Y: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn sample(metric: &str, job: &str, instance: &str, extra: &[(&str, &str)], value: f64) -> Sample {
    let mut labels: BTreeMap<String, String> =
        [("__name__", metric), ("job", job), ("instance", instance)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Sample { labels, value }
}

/// Three replicas of `edge` (`a` on X, `b` on Y, `c` on X with a canary),
/// one of them down (`d`), and Prometheus scraping itself.
fn answers() -> Answers {
    let up = |i: &str, v| sample("up", "edge", i, &[], v);
    let config = |i: &str, c: &str| {
        sample(
            "reloader_active_config_info",
            "edge",
            i,
            &[("config_sha256", c)],
            1.0,
        )
    };
    let gauge = |m: &str, i: &str, v| sample(m, "edge", i, &[], v);
    Answers {
        up: vec![
            up("a", 1.0),
            up("b", 1.0),
            up("c", 1.0),
            up("d", 0.0),
            sample("up", "prometheus", "localhost:9090", &[], 1.0),
        ],
        active_generation: vec![
            gauge("reloader_active_generation", "a", 4.0),
            gauge("reloader_active_generation", "b", 2.0),
            gauge("reloader_active_generation", "c", 7.0),
        ],
        active_config: vec![config("a", X), config("b", Y), config("c", X)],
        canary: vec![
            gauge("reloader_canary_generation", "a", 0.0),
            gauge("reloader_canary_generation", "b", 0.0),
            gauge("reloader_canary_generation", "c", 8.0),
        ],
        held: vec![gauge("reloader_held_generation", "a", 3.0)],
        last_reload_successful: vec![gauge("reloader_config_last_reload_successful", "b", 0.0)],
    }
}

#[test]
fn instances_are_reloader_targets_and_down_targets_of_their_jobs() {
    let instances = assemble(&answers());
    let names: Vec<String> = instances.iter().map(FleetInstance::name).collect();
    assert_eq!(names, ["a", "b", "c", "d"], "not Prometheus itself");
    let a = &instances[0];
    assert!(a.up);
    assert_eq!(a.active_generation, Some(4));
    assert_eq!(a.config_sha256.as_deref(), Some(X));
    assert_eq!((a.canary_generation, a.held_generation), (None, Some(3)));
    assert_eq!(instances[1].last_reload_successful, Some(false));
    assert_eq!(instances[2].canary_generation, Some(8));
    assert!(!instances[3].up && instances[3].config_sha256.is_none());
    assert_eq!(
        a.labels.keys().collect::<Vec<_>>(),
        ["instance", "job"],
        "target labels only"
    );
}

#[test]
fn the_barrier_holds_only_when_every_instance_serves_the_config_with_nothing_pending() {
    let report = judge(assemble(&answers()), Some(X), 1);
    assert!(!report.done);
    let why: Vec<(&str, &str)> = report
        .lagging
        .iter()
        .map(|l| (l.instance.as_str(), l.why.as_str()))
        .collect();
    assert_eq!(
        why,
        [
            ("b", "serves 222222222222 (generation 2)"),
            ("c", "canary generation 8 pending (promote or roll back)"),
            ("d", "down: Prometheus cannot scrape it"),
        ]
    );
    let human = report.human();
    assert!(human.contains("3 of 4 instances lag"), "{human}");
    assert!(human.contains("STATUS"), "{human}");

    // b reloads to X, c's canary is promoted, d is gone from the targets.
    let mut fixed = answers();
    fixed.up.retain(|s| s.labels["instance"] != "d");
    fixed.active_config[1]
        .labels
        .insert("config_sha256".into(), X.into());
    fixed.canary[2].value = 0.0;
    let report = judge(assemble(&fixed), Some(X), 3);
    assert!(report.done, "{report:#?}");
    assert!(report.human().contains("active on all 3 instances"));
    // Unless fewer are seen than expected.
    let report = judge(assemble(&fixed), Some(X), 4);
    assert!(!report.done && report.lagging.is_empty());
    assert!(
        report.human().contains("--expect says at least 4"),
        "{}",
        report.human()
    );
}

#[test]
fn no_instance_is_never_done() {
    let report = judge(Vec::new(), Some(X), 1);
    assert!(!report.done);
    let status = judge(assemble(&answers()), None, 1);
    assert!(!status.done && status.lagging.is_empty());
    assert!(!status.human().contains("STATUS"), "{}", status.human());
}

#[test]
fn an_instance_without_a_digest_lags_saying_why() {
    let mut a = answers();
    a.active_config.remove(0);
    let report = judge(assemble(&a), Some(X), 1);
    assert_eq!(
        report.lagging[0].why,
        "generation 4 exports no config digest (run it with --config or --watch)"
    );
}

#[test]
fn selectors_are_label_matchers_with_or_without_braces() {
    let metrics = ["up", "reloader_active_generation"];
    assert_eq!(
        Selector::parse("job=\"edge\"").unwrap().on_all(&metrics),
        "{__name__=~\"up|reloader_active_generation\",job=\"edge\"}"
    );
    assert_eq!(
        Selector::parse(" {job=\"edge\", env=~\"prod\"} ")
            .unwrap()
            .on_all(&["up"]),
        "{__name__=~\"up\",job=\"edge\", env=~\"prod\"}"
    );
    assert_eq!(
        Selector::parse("").unwrap().on_all(&["up"]),
        "{__name__=~\"up\"}"
    );
    assert!(Selector::parse("up{job=\"x\"}").is_err());
}

#[test]
fn a_target_seen_only_through_other_metrics_is_not_yet_an_instance() {
    let mut partial = answers();
    partial.last_reload_successful.push(sample(
        "reloader_config_last_reload_successful",
        "edge",
        "e",
        &[],
        1.0,
    ));
    partial.active_config.push(sample(
        "reloader_active_config_info",
        "edge",
        "e",
        &[("config_sha256", X)],
        1.0,
    ));
    let names: Vec<String> = assemble(&partial).iter().map(FleetInstance::name).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
}
