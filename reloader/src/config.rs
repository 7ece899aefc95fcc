//! Validated configuration of `reloader run`: everything a user can get
//! wrong is checked here, before anything starts, and each error says how to
//! fix it. Pure logic, no syscalls.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use nix::sys::signal::Signal;
use thiserror::Error;

use crate::steering::{Limits, ListenerSpec, Transport, limits::MAX_LISTENERS};

/// Old generations that may drain at once, at most: with the active
/// generation and a candidate, 16 generations live per instance.
pub const MAX_DRAINING: u32 = 14;
/// Listening sockets one generation may hold per address, by default.
pub const DEFAULT_SOCKETS_PER_LISTENER: u32 = 256;
/// UDP flows the flow table holds, by default (least recently used ones
/// are forgotten beyond that).
pub const DEFAULT_UDP_FLOWS: u32 = 65_536;

/// Errors in a `reloader run` command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--listen` is not `IP:PORT`.
    #[error(
        "--listen {value:?} is not an address: use IP:PORT (TCP), udp://IP:PORT (UDP, flows \
         kept with their generation) or udp://IP:PORT?mode=stateless, e.g. 127.0.0.1:8080, \
         [::]:443 or udp://0.0.0.0:53?mode=stateless"
    )]
    BadAddress { value: String },
    /// Port 0 cannot be shared by generations.
    #[error(
        "--listen {addr}: port 0 picks a different port for every socket; name the port the server listens on"
    )]
    PortZero { addr: SocketAddr },
    /// The same address twice.
    #[error("--listen {listen} is given twice")]
    DuplicateListen { listen: String },
    /// No `--listen` at all.
    #[error("at least one --listen ADDR is needed: the addresses the server listens on")]
    NoListen,
    /// Too many addresses for the steering maps.
    #[error("{count} --listen addresses; at most {MAX_LISTENERS} are supported")]
    TooManyListen { count: usize },
    /// Empty command.
    #[error(
        "no server command: put it after `--`, e.g. `reloader run --listen 0.0.0.0:80 -- nginx -g 'daemon off;'`"
    )]
    EmptyCommand,
    /// A duration that is zero or unreasonable.
    #[error("{flag} {value}: {why}")]
    BadDuration {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// A signal name we do not know.
    #[error("{flag} {value:?} is not a signal name: use e.g. TERM, QUIT, USR1, INT, HUP")]
    BadSignal { flag: &'static str, value: String },
    /// `--max-draining` out of range.
    #[error("--max-draining {value}: must be between 1 and {MAX_DRAINING}")]
    BadMaxDraining { value: u32 },
    /// A probe URL we cannot use.
    #[error("{flag} {value:?}: {why}")]
    BadProbe {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// A canary share we cannot use.
    #[error(
        "--canary {value:?}: {why}; give the share of new connections as a percentage, or \
         ascending steps, e.g. 10% or 1%,10%,50%"
    )]
    BadCanary { value: String, why: String },
    /// `--health-interval` or `--health-failures` without `--health-probe`.
    #[error("{flag} needs --health-probe URL (what to send to each generation)")]
    HealthWithoutProbe { flag: &'static str },
    /// `--metrics` is not `IP:PORT`.
    #[error("--metrics {value:?} is not an address: use IP:PORT, e.g. 127.0.0.1:9090")]
    BadMetricsAddress { value: String },
    /// `--check` cannot be split into words.
    #[error(
        "--check {value:?}: {why}; give the command as one string, quoted like in a shell, \
         e.g. --check 'nginx -t -c /etc/nginx/nginx.conf' (no pipes or variables: use \
         --check 'sh -c \"...\"' for those)"
    )]
    BadCheck { value: String, why: &'static str },
    /// `--watch` or `--config` with an empty path.
    #[error("{flag}: the path is empty")]
    EmptyPath { flag: &'static str },
    /// A bad instance name.
    #[error(
        "--name {value:?}: use letters, digits, '-', '_' and '.' (at most 64), not starting with '.'"
    )]
    BadName { value: String },
}

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

/// Everything `reloader run` needs, validated.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub name: String,
    pub listen: Vec<ListenerSpec>,
    pub ready_timeout: Duration,
    pub ready_probe: Option<Probe>,
    pub drain_signal: Signal,
    pub drain_timeout: Duration,
    /// How long the old generation keeps running, receiving nothing new,
    /// before it gets the drain signal (to read what it already accepted).
    pub settle: Duration,
    pub max_draining: u32,
    pub control_socket: PathBuf,
    pub command: Vec<String>,
    pub force_select_only: bool,
    /// Create each generation's listeners and pass them (socket activation).
    pub pass_fds: bool,
    /// Also wait for READY=1 on a per-generation NOTIFY_SOCKET.
    pub ready_notify: bool,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Listening sockets one generation may hold per address.
    pub sockets_per_listener: u32,
    /// Entries of the UDP flow table.
    pub udp_flows: u32,
    /// `--check`: run before every new generation is spawned.
    pub check: Option<CheckCommand>,
    /// `--watch`: reload when these change (absolute paths).
    pub watch: Vec<PathBuf>,
    /// `--config` (or the `--watch` paths): what a generation's config
    /// digest covers (absolute paths).
    pub config_files: Vec<PathBuf>,
    /// How long the previous generation is kept, receiving nothing new but
    /// not signalled, after a cutover (`reloader rollback` brings it back).
    pub keep_previous: Duration,
    /// Health checks of live generations while a rollback is possible.
    pub health: Option<Health>,
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
/// at each step (parts of [`crate::steering::WEIGHT_SCALE`], ascending),
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
        let scale = crate::steering::WEIGHT_SCALE;
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
        f64::from(weight) * 100.0 / f64::from(crate::steering::WEIGHT_SCALE)
    }
}

/// The weights of `--canary` (one value on the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanarySteps(pub Vec<u32>);

/// `10%`, `0.5%` or `1%,10%,50%` → weights, checked: each above 0 and below
/// 100 %, ascending.
pub fn parse_canary(value: &str) -> Result<CanarySteps, ConfigError> {
    let bad = |why: String| ConfigError::BadCanary {
        value: value.to_owned(),
        why,
    };
    let scale = f64::from(crate::steering::WEIGHT_SCALE);
    let mut steps = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        let number = part
            .strip_suffix('%')
            .ok_or_else(|| bad(format!("{part:?} has no '%'")))?;
        let percent: f64 = number
            .trim()
            .parse()
            .map_err(|_| bad(format!("{part:?} is not a number")))?;
        let weight = (percent * scale / 100.0).round();
        if !(weight >= 1.0 && weight < scale) {
            return Err(bad(format!(
                "{part} is not between {}% and 100% (exclusive)",
                100.0 / scale
            )));
        }
        let weight = weight as u32;
        if steps.last().is_some_and(|&last| last >= weight) {
            return Err(bad("steps must grow".into()));
        }
        steps.push(weight);
    }
    Ok(CanarySteps(steps))
}

/// `--check CMD`: one shell-like string, split into words when parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckCommand {
    /// As given, for messages.
    pub text: String,
    /// Its words; `{generation}` in them is replaced at each run.
    pub argv: Vec<String>,
}

/// Splits a `--check` value into words the way a POSIX shell would (quotes
/// and backslashes; no variables, globs or pipes), with the `shlex` crate.
pub fn parse_check(value: &str) -> Result<CheckCommand, ConfigError> {
    let bad = |why| ConfigError::BadCheck {
        value: value.to_owned(),
        why,
    };
    let argv =
        shlex::split(value).ok_or_else(|| bad("unbalanced quotes or a trailing backslash"))?;
    if argv.first().is_none_or(|program| program.is_empty()) {
        return Err(bad("no command"));
    }
    Ok(CheckCommand {
        text: value.to_owned(),
        argv,
    })
}

/// A `--watch` or `--config` path made absolute (relative to the working
/// directory at start; symlinks are not resolved: they are watched and
/// hashed as named).
pub fn absolute_path(flag: &'static str, path: &std::path::Path) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::EmptyPath { flag });
    }
    // `absolute` also drops `.` components and a trailing slash, so the
    // path reads as `find` and `sha256sum` print it.
    let absolute = std::path::absolute(path).map_err(|_| ConfigError::EmptyPath { flag })?;
    Ok(absolute.components().collect())
}

impl RunConfig {
    /// (transport, address) of each `--listen`: what discovery matches
    /// sockets by.
    pub fn listen_keys(&self) -> Vec<(Transport, SocketAddr)> {
        self.listen.iter().map(ListenerSpec::key).collect()
    }

    /// How large the steering maps are for this configuration: a slot per
    /// generation that can be live at once (the active one, a candidate,
    /// and `--max-draining` old ones).
    pub fn limits(&self) -> Limits {
        Limits {
            listeners: self.listen.len() as u32,
            slots: self.max_draining + 2,
            sockets_per_slot: self.sockets_per_listener,
        }
    }
}

impl RunConfig {
    /// A configuration for unit tests: `listen`, short timeouts, no probe.
    #[cfg(test)]
    pub fn for_tests(listen: &[&str]) -> Self {
        Self {
            name: "test".into(),
            listen: listen
                .iter()
                .map(|a| parse_listen_addr(a).expect("address"))
                .collect(),
            ready_timeout: Duration::from_millis(500),
            ready_probe: None,
            drain_signal: Signal::SIGTERM,
            drain_timeout: Duration::from_secs(2),
            settle: Duration::from_millis(10),
            max_draining: 4,
            control_socket: std::env::temp_dir().join("reloader-unit-test.sock"),
            command: vec!["sleep".into(), "60".into()],
            force_select_only: false,
            pass_fds: false,
            ready_notify: false,
            metrics: None,
            sockets_per_listener: 16,
            udp_flows: 1024,
            check: None,
            watch: Vec::new(),
            config_files: Vec::new(),
            keep_previous: Duration::ZERO,
            health: None,
        }
    }
}

/// `500ms`, `30s`, `2m` → Duration, checked against a sane range.
pub fn parse_duration(
    flag: &'static str,
    value: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let bad = |why: String| ConfigError::BadDuration {
        flag,
        value: value.to_owned(),
        why,
    };
    let duration = humantime::parse_duration(value)
        .map_err(|e| bad(format!("{e}; write durations like 500ms, 30s or 2m")))?;
    if duration < min {
        return Err(bad(format!(
            "must be at least {}",
            humantime::format_duration(min)
        )));
    }
    if duration > max {
        return Err(bad(format!(
            "must be at most {}",
            humantime::format_duration(max)
        )));
    }
    Ok(duration)
}

/// `TERM`, `SIGTERM`, `term` → SIGTERM.
pub fn parse_signal(flag: &'static str, value: &str) -> Result<Signal, ConfigError> {
    let upper = value.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| ConfigError::BadSignal {
        flag,
        value: value.to_owned(),
    })
}

/// One `--listen` value (a clap value parser): `IP:PORT` or
/// `tcp://IP:PORT` (TCP), `udp://IP:PORT` (UDP with flow affinity),
/// `udp://IP:PORT?mode=stateless` (UDP, every datagram to the active
/// generation).
pub fn parse_listen_addr(value: &str) -> Result<ListenerSpec, ConfigError> {
    let bad = || ConfigError::BadAddress {
        value: value.to_owned(),
    };
    let (scheme, rest) = value.split_once("://").unwrap_or(("tcp", value));
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let addr: SocketAddr = authority.parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(ConfigError::PortZero { addr });
    }
    let spec = match (scheme, query) {
        ("tcp", "") => ListenerSpec::from(addr),
        ("udp", "" | "mode=flows") => ListenerSpec::udp(addr, false),
        ("udp", "mode=stateless") => ListenerSpec::udp(addr, true),
        _ => return Err(bad()),
    };
    Ok(spec)
}

/// Checks the `--listen` addresses together: at least one, not too many,
/// none twice.
pub fn check_listen(specs: &[ListenerSpec]) -> Result<(), ConfigError> {
    if specs.is_empty() {
        return Err(ConfigError::NoListen);
    }
    if specs.len() > MAX_LISTENERS as usize {
        return Err(ConfigError::TooManyListen { count: specs.len() });
    }
    let mut seen = HashSet::new();
    for spec in specs {
        if !seen.insert(spec.key()) {
            return Err(ConfigError::DuplicateListen {
                listen: spec.to_string(),
            });
        }
    }
    Ok(())
}

/// Parses and checks the `--listen` addresses.
pub fn parse_listen(values: &[String]) -> Result<Vec<ListenerSpec>, ConfigError> {
    let specs = values
        .iter()
        .map(|v| parse_listen_addr(v))
        .collect::<Result<Vec<_>, _>>()?;
    check_listen(&specs)?;
    Ok(specs)
}

/// A clap value parser for a duration flag within `min..=max`.
pub fn duration_in(
    flag: &'static str,
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, ConfigError> + Clone + Send + Sync + 'static {
    move |value| parse_duration(flag, value, min, max)
}

/// A clap value parser for a signal flag.
pub fn signal_named(
    flag: &'static str,
) -> impl Fn(&str) -> Result<Signal, ConfigError> + Clone + Send + Sync + 'static {
    move |value| parse_signal(flag, value)
}

/// A clap value parser for `--metrics`.
pub fn parse_metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::BadMetricsAddress {
        value: value.to_owned(),
    })
}

/// Parses `tcp://HOST:PORT` or `http://HOST:PORT/path` and finds the managed
/// listener it reaches (a wildcard listener covers every address of its
/// family on its port).
pub fn parse_probe(
    flag: &'static str,
    value: &str,
    listen: &[ListenerSpec],
) -> Result<Probe, ConfigError> {
    let bad = |why: &str| ConfigError::BadProbe {
        flag,
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| bad("use tcp://HOST:PORT, http://HOST:PORT/PATH or dns://HOST:PORT/NAME"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| bad("the host must be an IP address with a port, e.g. 127.0.0.1:8080"))?;
    let transport = if scheme == "dns" {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let listener = listen
        .iter()
        .position(|l| {
            let l_addr = l.addr;
            l.transport == transport
                && l_addr.port() == addr.port()
                && l_addr.is_ipv4() == addr.is_ipv4()
                && (l_addr.ip() == addr.ip() || l_addr.ip().is_unspecified())
        })
        .ok_or_else(|| {
            bad("it does not reach any --listen address (the probe must go through a managed listener)")
        })?;
    if addr.ip().is_unspecified() {
        return Err(bad(
            "connect to a concrete address (e.g. 127.0.0.1), not a wildcard",
        ));
    }
    match scheme {
        "tcp" => {
            if path != "/" {
                return Err(bad("tcp:// probes take no path"));
            }
            Ok(Probe::Tcp { addr, listener })
        }
        "http" => Ok(Probe::Http {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
            listener,
        }),
        "dns" => {
            let name = path.trim_matches('/');
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .split('.')
                    .all(|label| !label.is_empty() && label.len() <= 63);
            if !valid {
                return Err(bad(
                    "dns:// probes name a domain: dns://127.0.0.1:53/example.test",
                ));
            }
            Ok(Probe::Dns {
                addr,
                name: name.to_owned(),
                listener,
            })
        }
        _ => Err(bad("the scheme must be tcp, http or dns")),
    }
}

/// An instance name (a clap value parser).
pub fn parse_name(name: &str) -> Result<String, ConfigError> {
    check_name(name).map(|()| name.to_owned())
}

/// Checks an instance name (it becomes a file name).
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName {
            value: name.to_owned(),
        })
    }
}

/// Where the control socket of instance `name` lives by default:
/// `/run/reloader/NAME.sock` as root, `$XDG_RUNTIME_DIR/reloader/NAME.sock`
/// otherwise.
pub fn default_control_socket(name: &str) -> PathBuf {
    let dir = if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/reloader")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("reloader"))
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("reloader-{}", nix::unistd::geteuid()))
            })
    };
    dir.join(format!("{name}.sock"))
}

/// Replaces `{generation}` in every argument.
pub fn substitute_generation(command: &[String], generation: u64) -> Vec<String> {
    command
        .iter()
        .map(|arg| arg.replace("{generation}", &generation.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(values: &[&str]) -> Result<Vec<ListenerSpec>, ConfigError> {
        parse_listen(&values.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn listen_addresses_are_checked() {
        assert_eq!(listen(&["127.0.0.1:80", "[::]:443"]).unwrap().len(), 2);
        assert!(matches!(listen(&[]), Err(ConfigError::NoListen)));
        assert!(matches!(
            listen(&["localhost:80"]),
            Err(ConfigError::BadAddress { .. })
        ));
        assert!(matches!(
            listen(&["127.0.0.1"]),
            Err(ConfigError::BadAddress { .. })
        ));
        assert!(matches!(
            listen(&["127.0.0.1:0"]),
            Err(ConfigError::PortZero { .. })
        ));
        assert!(matches!(
            listen(&["127.0.0.1:80", "127.0.0.1:80"]),
            Err(ConfigError::DuplicateListen { .. })
        ));
        let many: Vec<String> = (1..=1025).map(|p| format!("127.0.0.1:{p}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            listen(&many),
            Err(ConfigError::TooManyListen { count: 1025 })
        ));
        assert_eq!(listen(&many[..256]).unwrap().len(), 256);
    }

    #[test]
    fn tcp_and_udp_listeners_are_told_apart() {
        let specs = listen(&[
            "127.0.0.1:443",
            "tcp://127.0.0.1:80",
            "udp://127.0.0.1:443",
            "udp://[::1]:53?mode=stateless",
        ])
        .unwrap();
        let transports: Vec<Transport> = specs.iter().map(|s| s.transport).collect();
        assert_eq!(
            transports,
            [
                Transport::Tcp,
                Transport::Tcp,
                Transport::Udp,
                Transport::Udp
            ]
        );
        assert_eq!(specs[2].mode, crate::steering::ListenerMode::UdpFlows);
        assert_eq!(specs[3].mode, crate::steering::ListenerMode::UdpStateless);
        assert_eq!(specs[3].to_string(), "udp://[::1]:53?mode=stateless");
        assert_eq!(specs[0].to_string(), "127.0.0.1:443");
        assert!(matches!(
            listen(&["udp://127.0.0.1:53", "udp://127.0.0.1:53?mode=stateless"]),
            Err(ConfigError::DuplicateListen { .. })
        ));
        assert!(matches!(
            listen(&["sctp://127.0.0.1:53"]),
            Err(ConfigError::BadAddress { .. })
        ));
        assert!(matches!(
            listen(&["udp://127.0.0.1:53?mode=sometimes"]),
            Err(ConfigError::BadAddress { .. })
        ));
    }

    #[test]
    fn durations_are_human_and_bounded() {
        let min = Duration::from_millis(1);
        let max = Duration::from_secs(3600);
        assert_eq!(
            parse_duration("--drain-timeout", "500ms", min, max).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("--drain-timeout", "2m", min, max).unwrap(),
            Duration::from_secs(120)
        );
        let zero = parse_duration("--drain-timeout", "0s", min, max).unwrap_err();
        assert!(zero.to_string().contains("at least"), "{zero}");
        let absurd = parse_duration("--drain-timeout", "400d", min, max).unwrap_err();
        assert!(absurd.to_string().contains("at most"), "{absurd}");
        let garbage = parse_duration("--drain-timeout", "soon", min, max).unwrap_err();
        assert!(garbage.to_string().contains("500ms"), "{garbage}");
    }

    #[test]
    fn signals_by_name() {
        assert_eq!(
            parse_signal("--drain-signal", "QUIT").unwrap(),
            Signal::SIGQUIT
        );
        assert_eq!(
            parse_signal("--drain-signal", "sigusr1").unwrap(),
            Signal::SIGUSR1
        );
        assert_eq!(
            parse_signal("--drain-signal", "term").unwrap(),
            Signal::SIGTERM
        );
        assert!(matches!(
            parse_signal("--drain-signal", "SIGNOPE"),
            Err(ConfigError::BadSignal { .. })
        ));
    }

    #[test]
    fn probes_must_reach_a_managed_listener() {
        let listen = listen(&["0.0.0.0:8080", "[::1]:8443", "udp://127.0.0.1:5353"]).unwrap();
        let p = parse_probe("--ready-probe", "http://127.0.0.1:8080/healthz", &listen).unwrap();
        assert_eq!(p.listener(), 0);
        assert!(matches!(p, Probe::Http { ref path, .. } if path == "/healthz"));
        let t = parse_probe("--ready-probe", "tcp://[::1]:8443", &listen).unwrap();
        assert_eq!(t.listener(), 1);
        assert!(parse_probe("--ready-probe", "tcp://127.0.0.1:9999", &listen).is_err());
        assert!(
            parse_probe("--ready-probe", "tcp://[::1]:8080", &listen).is_err(),
            "family differs"
        );
        assert!(parse_probe("--ready-probe", "ftp://127.0.0.1:8080", &listen).is_err());
        assert!(parse_probe("--ready-probe", "127.0.0.1:8080", &listen).is_err());
        assert!(parse_probe("--ready-probe", "tcp://0.0.0.0:8080", &listen).is_err());
        let d = parse_probe("--ready-probe", "dns://127.0.0.1:5353/gen.test", &listen).unwrap();
        assert_eq!(d.listener(), 2);
        assert!(matches!(d, Probe::Dns { ref name, .. } if name == "gen.test"));
        assert!(
            parse_probe("--ready-probe", "dns://127.0.0.1:8080/x.test", &listen).is_err(),
            "DNS probes go through a UDP listener"
        );
        assert!(parse_probe("--ready-probe", "dns://127.0.0.1:5353/", &listen).is_err());
    }

    #[test]
    fn names_become_safe_file_names() {
        assert!(check_name("default").is_ok());
        assert!(check_name("edge-proxy_1.v2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../etc").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn check_commands_split_like_a_shell() {
        let c =
            parse_check("nginx -t -c '/etc/nginx/my nginx.conf' -g \"pid /run/{generation}.pid;\"")
                .unwrap();
        assert_eq!(
            c.argv,
            vec![
                "nginx",
                "-t",
                "-c",
                "/etc/nginx/my nginx.conf",
                "-g",
                "pid /run/{generation}.pid;"
            ]
        );
        assert_eq!(
            substitute_generation(&c.argv, 12)[5],
            "pid /run/12.pid;",
            "{{generation}} is the number the new generation will get"
        );
        assert_eq!(
            parse_check("haproxy -c -f $CFG").unwrap().argv[3],
            "$CFG",
            "no variable expansion"
        );
        assert!(matches!(
            parse_check("nginx -t 'unclosed"),
            Err(ConfigError::BadCheck { .. })
        ));
        assert!(matches!(
            parse_check("   "),
            Err(ConfigError::BadCheck { .. })
        ));
        assert!(matches!(
            parse_check("''"),
            Err(ConfigError::BadCheck { .. })
        ));
    }

    #[test]
    fn watched_paths_become_absolute_as_named() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_path("--watch", std::path::Path::new("conf/./nginx.conf")).unwrap(),
            cwd.join("conf/nginx.conf")
        );
        assert_eq!(
            absolute_path("--watch", std::path::Path::new("/etc/nginx/")).unwrap(),
            PathBuf::from("/etc/nginx")
        );
        assert!(absolute_path("--config", std::path::Path::new("")).is_err());
    }

    #[test]
    fn generation_is_substituted_everywhere() {
        let cmd = vec![
            "envoy".into(),
            "--base-id".into(),
            "{generation}".into(),
            "x{generation}y".into(),
        ];
        assert_eq!(
            substitute_generation(&cmd, 7),
            vec!["envoy", "--base-id", "7", "x7y"]
        );
    }
}
