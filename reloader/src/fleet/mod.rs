//! `reloader fleet`: is config X active on every replica? Answered from
//! Prometheus, which scrapes every replica's `/metrics`: the fleet barrier
//! (`fleet wait`) asks until every reloader instance Prometheus scrapes
//! (at least `--expect`) serves the config digest with no canary pending,
//! and `fleet status` prints what each serves.
//!
//! What counts as an instance: a target that exports
//! `reloader_active_generation`, and a target that is down (`up == 0`) in
//! a job that has such targets (its metrics are gone, but it is still a
//! replica that does not serve the config). `--selector` narrows both to
//! matching target labels. The metrics read, per target:
//! `reloader_active_config_info{config_sha256}` (what it serves),
//! `reloader_canary_generation` (a canary pending), `reloader_held_generation`,
//! `reloader_active_generation`, `reloader_config_last_reload_successful`.
//!
//! The CLI runs this without a runtime: blocking HTTP, a sleep between
//! polls, each bounded by the request timeout and `--timeout`.

// The CLI (no runtime): blocking HTTP, file reads and sleeps.
#![allow(clippy::disallowed_methods)]

mod human;
pub mod prometheus;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

pub use prometheus::{Auth, Connection, Prometheus, PrometheusError, Sample, read_secret};
use serde::{Deserialize, Serialize};

/// One reloader instance as Prometheus sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInstance {
    /// Its target labels (`job`, `instance`, and any service discovery
    /// added).
    pub labels: BTreeMap<String, String>,
    /// Prometheus scraped it at its last attempt (`up`).
    pub up: bool,
    /// The generation receiving new connections (`None`: none, or down).
    pub active_generation: Option<u64>,
    /// The active generation's config digest (`None`: none exported).
    pub config_sha256: Option<String>,
    /// A canary runs beside the active generation.
    pub canary_generation: Option<u64>,
    /// The previous generation is held for a rollback.
    pub held_generation: Option<u64>,
    /// Whether its last config load succeeded (`None`: not known).
    pub last_reload_successful: Option<bool>,
}

impl FleetInstance {
    /// Its `instance` label, or all its labels.
    pub fn name(&self) -> String {
        match self.labels.get("instance") {
            Some(instance) => instance.clone(),
            None => self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Why it does not serve `config` with nothing pending (`None`: it
    /// does).
    pub fn lag(&self, config: &str) -> Option<String> {
        if !self.up {
            return Some("down: Prometheus cannot scrape it".into());
        }
        match (&self.config_sha256, self.active_generation) {
            (_, None) => return Some("no active generation".into()),
            (None, Some(g)) => {
                return Some(format!(
                    "generation {g} exports no config digest (run it with --config or --watch)"
                ));
            }
            (Some(serves), Some(g)) if serves != config => {
                return Some(format!("serves {} (generation {g})", short(serves)));
            }
            _ => {}
        }
        self.canary_generation
            .map(|canary| format!("canary generation {canary} pending (promote or roll back)"))
    }
}

/// An instance that does not serve the config yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagging {
    pub instance: String,
    pub why: String,
}

/// What `fleet wait` and `fleet status` report (`--json`: stable field
/// names, for scripts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The config digest asked about, if any.
    pub config_sha256: Option<String>,
    /// Instances there must be at least.
    pub expect: usize,
    pub instances: Vec<FleetInstance>,
    /// Instances that do not serve the config yet, and why (empty without
    /// a config).
    pub lagging: Vec<Lagging>,
    /// Every instance, at least `expect` of them, serves the config with
    /// no canary pending.
    pub done: bool,
    /// How long `fleet wait` waited.
    pub waited_ms: u64,
    /// Why the last attempt to ask Prometheus failed (`None`: it answered).
    pub error: Option<String>,
}

/// Target label matchers (`job="edge",env=~"prod|canary"`): what every
/// query is narrowed to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(String);

impl Selector {
    /// Reads `--selector`: PromQL label matchers, with or without braces.
    pub fn parse(value: &str) -> Result<Self, String> {
        let inner = value.trim();
        let inner = inner
            .strip_prefix('{')
            .and_then(|v| v.strip_suffix('}'))
            .unwrap_or(inner)
            .trim();
        if inner.contains(['{', '}']) {
            return Err(format!(
                "{value:?}: give label matchers such as job=\"edge\",env=~\"prod.*\""
            ));
        }
        Ok(Self(inner.to_owned()))
    }

    /// Every metric of `metrics` with the matchers, as one vector
    /// selector (`{__name__=~"a|b",matchers}`).
    fn on_all(&self, metrics: &[&str]) -> String {
        let name = format!("__name__=~\"{}\"", metrics.join("|"));
        if self.0.is_empty() {
            format!("{{{name}}}")
        } else {
            format!("{{{name},{}}}", self.0)
        }
    }
}

/// The answers of one survey, by metric.
#[derive(Debug, Default)]
pub struct Answers {
    pub up: Vec<Sample>,
    pub active_generation: Vec<Sample>,
    pub active_config: Vec<Sample>,
    pub canary: Vec<Sample>,
    pub held: Vec<Sample>,
    pub last_reload_successful: Vec<Sample>,
}

/// The metrics a survey reads, in the order of [`Answers`].
const SURVEYED: [&str; 6] = [
    "up",
    "reloader_active_generation",
    "reloader_active_config_info",
    "reloader_canary_generation",
    "reloader_held_generation",
    "reloader_config_last_reload_successful",
];

/// Asks Prometheus what every instance matching `selector` serves now.
///
/// One instant query for every metric: Prometheus evaluates it at one
/// time over one view of its storage. A query per metric raced the
/// scrapes — a target's first scrape could land between two queries and
/// show a replica with `last_reload_successful` but no active config.
pub fn survey(
    prometheus: &Prometheus,
    selector: &Selector,
) -> Result<Vec<FleetInstance>, PrometheusError> {
    let mut answers = Answers::default();
    for sample in prometheus.query(&selector.on_all(&SURVEYED))? {
        let into = match sample.labels.get("__name__").map(String::as_str) {
            Some("up") => &mut answers.up,
            Some("reloader_active_generation") => &mut answers.active_generation,
            Some("reloader_active_config_info") => &mut answers.active_config,
            Some("reloader_canary_generation") => &mut answers.canary,
            Some("reloader_held_generation") => &mut answers.held,
            Some("reloader_config_last_reload_successful") => &mut answers.last_reload_successful,
            _ => continue,
        };
        into.push(sample);
    }
    Ok(assemble(&answers))
}

/// A target's identity: its labels without the metric's name and
/// `extra` (the metric's own labels).
fn target(sample: &Sample, extra: &[&str]) -> BTreeMap<String, String> {
    sample
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != "__name__" && !extra.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Joins the answers by target (see the module comment for what counts).
pub fn assemble(answers: &Answers) -> Vec<FleetInstance> {
    let jobs: BTreeSet<Option<&String>> = answers
        .active_generation
        .iter()
        .map(|s| s.labels.get("job"))
        .collect();
    let mut instances: BTreeMap<BTreeMap<String, String>, FleetInstance> = BTreeMap::new();
    for s in answers
        .up
        .iter()
        .filter(|s| jobs.contains(&s.labels.get("job")))
    {
        let labels = target(s, &[]);
        instances.insert(
            labels.clone(),
            FleetInstance {
                labels,
                up: s.value == 1.0,
                ..FleetInstance::default()
            },
        );
    }
    let generation = |s: &Sample| (s.value >= 1.0).then_some(s.value as u64);
    for s in &answers.active_generation {
        let labels = target(s, &[]);
        let instance = instances
            .entry(labels.clone())
            .or_insert_with(|| FleetInstance {
                labels,
                up: true,
                ..FleetInstance::default()
            });
        instance.active_generation = generation(s);
    }
    // The other metrics only fill in an instance found above: a target
    // seen through one of them alone (Prometheus answered from a scrape
    // it had not finished storing: CI saw `last_reload_successful`
    // without `reloader_active_generation` once in about ten first
    // scrapes) is not yet an instance.
    let mut with =
        |samples: &[Sample], extra: &[&str], set: &dyn Fn(&mut FleetInstance, &Sample)| {
            for s in samples {
                if let Some(instance) = instances.get_mut(&target(s, extra)) {
                    set(instance, s);
                }
            }
        };
    with(&answers.active_config, &["config_sha256"], &|i, s| {
        i.config_sha256 = s.labels.get("config_sha256").cloned()
    });
    with(&answers.canary, &[], &|i, s| {
        i.canary_generation = generation(s)
    });
    with(&answers.held, &[], &|i, s| {
        i.held_generation = generation(s)
    });
    with(&answers.last_reload_successful, &[], &|i, s| {
        i.last_reload_successful = Some(s.value == 1.0)
    });
    instances.into_values().collect()
}

/// The report on `instances` for `config` (none: status only).
pub fn judge(instances: Vec<FleetInstance>, config: Option<&str>, expect: usize) -> FleetReport {
    let lagging: Vec<Lagging> = config
        .map(|config| {
            instances
                .iter()
                .filter_map(|i| {
                    i.lag(config).map(|why| Lagging {
                        instance: i.name(),
                        why,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    FleetReport {
        config_sha256: config.map(str::to_owned),
        expect,
        done: config.is_some() && lagging.is_empty() && instances.len() >= expect,
        instances,
        lagging,
        waited_ms: 0,
        error: None,
    }
}

/// How `fleet wait` waits.
#[derive(Clone, Debug)]
pub struct Wait {
    pub config: String,
    pub expect: usize,
    pub timeout: Duration,
    /// Between two surveys.
    pub interval: Duration,
}

/// Surveys every `interval` until every instance serves the config (the
/// barrier) or `timeout` has passed; the last report either way.
pub fn wait(prometheus: &Prometheus, selector: &Selector, how: &Wait) -> FleetReport {
    let started = Instant::now();
    let mut last = FleetReport {
        config_sha256: Some(how.config.clone()),
        expect: how.expect,
        ..FleetReport::default()
    };
    loop {
        match survey(prometheus, selector) {
            Ok(instances) => last = judge(instances, Some(&how.config), how.expect),
            Err(error) => last.error = Some(crate::error_chain(&error)),
        }
        last.waited_ms = started.elapsed().as_millis() as u64;
        let left = how.timeout.saturating_sub(started.elapsed());
        if last.done || left.is_zero() {
            return last;
        }
        std::thread::sleep(how.interval.min(left));
    }
}

/// The first 12 hex digits of a digest, as tables show it.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

#[cfg(test)]
mod tests;
