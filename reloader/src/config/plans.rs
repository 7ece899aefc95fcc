//! What a flag asks for, checked: the readiness and health probes, a
//! canary plan (also as it arrives over the control socket), the
//! pre-flight `--check` command.

use std::{net::SocketAddr, time::Duration};

/// How readiness of a candidate generation is confirmed, beyond holding a
/// listener for every address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect to `addr` must succeed.
    Tcp { addr: SocketAddr, listener: usize },
    /// `GET path` on `addr` must answer 2xx.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
        listener: usize,
    },
    /// A DNS query for `name` (type A, no recursion) over UDP must get an
    /// answer with rcode NOERROR.
    Dns {
        addr: SocketAddr,
        name: String,
        listener: usize,
    },
}

impl Probe {
    /// The managed listener the probe goes through.
    pub fn listener(&self) -> usize {
        match self {
            Self::Tcp { listener, .. }
            | Self::Http { listener, .. }
            | Self::Dns { listener, .. } => *listener,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Tcp { addr, .. } | Self::Http { addr, .. } | Self::Dns { addr, .. } => *addr,
        }
    }
}

/// `--health-probe`: sent periodically through each live generation's own
/// listener while a generation is held or a canary runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub probe: Probe,
    pub interval: Duration,
    /// Consecutive failures that make a generation unhealthy.
    pub failures: u32,
}

/// What `reload --canary` asks for: the canary's share of new connections
/// at each step (parts of [`reloader_ebpf::WEIGHT_SCALE`], ascending),
/// and how long each step lasts before the next (or the promotion) when
/// healthy; without it, `reloader promote` and `reloader rollback` decide.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryPlan {
    pub steps: Vec<u32>,
    /// Milliseconds per step (`--canary-for`).
    #[serde(default)]
    pub dwell_ms: Option<u64>,
}

/// Steps a canary plan may have at most.
pub const MAX_CANARY_STEPS: usize = 16;
/// How long one canary step may last at most (`--canary-for`).
pub const MAX_CANARY_DWELL: Duration = Duration::from_secs(24 * 3600);
/// How short one canary step may be at least.
pub const MIN_CANARY_DWELL: Duration = Duration::from_millis(100);

impl CanaryPlan {
    pub fn dwell(&self) -> Option<Duration> {
        self.dwell_ms.map(Duration::from_millis)
    }

    /// Checks a plan that arrived over the control socket as the command
    /// line checks its flags: 1 to [`MAX_CANARY_STEPS`] steps, each a share
    /// above 0 and below 100 %, growing; several steps need a dwell; a
    /// dwell within [`MIN_CANARY_DWELL`]..=[`MAX_CANARY_DWELL`]. Says which
    /// field is wrong and why.
    pub fn check(&self) -> Result<(), String> {
        let scale = reloader_ebpf::WEIGHT_SCALE;
        if self.steps.is_empty() {
            return Err(
                "canary.steps is empty: give at least one share (e.g. [1000] for 10%)".into(),
            );
        }
        if self.steps.len() > MAX_CANARY_STEPS {
            return Err(format!(
                "canary.steps has {} steps: at most {MAX_CANARY_STEPS}",
                self.steps.len()
            ));
        }
        for (i, &weight) in self.steps.iter().enumerate() {
            if weight == 0 || weight >= scale {
                return Err(format!(
                    "canary.steps[{i}] is {weight}: each share is in parts of {scale}, above 0 \
                     and below {scale} (100%)"
                ));
            }
            if i > 0 && weight <= self.steps[i - 1] {
                return Err(format!(
                    "canary.steps[{i}] is {weight}, not above the step before it ({}): steps \
                     must grow",
                    self.steps[i - 1]
                ));
            }
        }
        match self.dwell() {
            None if self.steps.len() > 1 => Err(
                "canary.dwell_ms is missing: several steps need a dwell (how long each lasts)"
                    .into(),
            ),
            Some(dwell) if !(MIN_CANARY_DWELL..=MAX_CANARY_DWELL).contains(&dwell) => Err(format!(
                "canary.dwell_ms is {}: between {} and {} ms",
                dwell.as_millis(),
                MIN_CANARY_DWELL.as_millis(),
                MAX_CANARY_DWELL.as_millis()
            )),
            _ => Ok(()),
        }
    }

    /// A share in percent, for people.
    pub fn percent(weight: u32) -> f64 {
        f64::from(weight) * 100.0 / f64::from(reloader_ebpf::WEIGHT_SCALE)
    }
}

/// `--check CMD`: one shell-like string, split into words when parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckCommand {
    /// As given, for messages.
    pub text: String,
    /// Its words; `{generation}` in them is replaced at each run.
    pub argv: Vec<String>,
}
