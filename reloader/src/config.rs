//! Validated configuration of `reloader run`: everything a user can get
//! wrong is checked here, before anything starts, and each error says how to
//! fix it. Pure logic, no syscalls.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use nix::sys::signal::Signal;
use thiserror::Error;

use crate::steering::{Limits, limits::MAX_LISTENERS};

/// Old generations that may drain at once, at most: with the active
/// generation and a candidate, 16 generations live per instance.
pub const MAX_DRAINING: u32 = 14;
/// Listening sockets one generation may hold per address, by default.
pub const DEFAULT_SOCKETS_PER_LISTENER: u32 = 256;

/// Errors in a `reloader run` command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--listen` is not `IP:PORT`.
    #[error(
        "--listen {value:?} is not an address: use IP:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:80 or [::]:443"
    )]
    BadAddress { value: String },
    /// Port 0 cannot be shared by generations.
    #[error(
        "--listen {addr}: port 0 picks a different port for every socket; name the port the server listens on"
    )]
    PortZero { addr: SocketAddr },
    /// The same address twice.
    #[error("--listen {addr} is given twice")]
    DuplicateListen { addr: SocketAddr },
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
    #[error("--ready-probe {value:?}: {why}")]
    BadProbe { value: String, why: String },
    /// `--metrics` is not `IP:PORT`.
    #[error("--metrics {value:?} is not an address: use IP:PORT, e.g. 127.0.0.1:9090")]
    BadMetricsAddress { value: String },
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
}

impl Probe {
    /// The managed listener the probe goes through.
    pub fn listener(&self) -> usize {
        match self {
            Self::Tcp { listener, .. } | Self::Http { listener, .. } => *listener,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Tcp { addr, .. } | Self::Http { addr, .. } => *addr,
        }
    }
}

/// Everything `reloader run` needs, validated.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
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
}

impl RunConfig {
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
            listen: listen.iter().map(|a| a.parse().expect("address")).collect(),
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

/// One `--listen` value (a clap value parser).
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = value.parse().map_err(|_| ConfigError::BadAddress {
        value: value.to_owned(),
    })?;
    if addr.port() == 0 {
        return Err(ConfigError::PortZero { addr });
    }
    Ok(addr)
}

/// Checks the `--listen` addresses together: at least one, not too many,
/// none twice.
pub fn check_listen(addrs: &[SocketAddr]) -> Result<(), ConfigError> {
    if addrs.is_empty() {
        return Err(ConfigError::NoListen);
    }
    if addrs.len() > MAX_LISTENERS as usize {
        return Err(ConfigError::TooManyListen { count: addrs.len() });
    }
    let mut seen = HashSet::new();
    for addr in addrs {
        if !seen.insert(*addr) {
            return Err(ConfigError::DuplicateListen { addr: *addr });
        }
    }
    Ok(())
}

/// Parses and checks the `--listen` addresses.
pub fn parse_listen(values: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    let addrs = values
        .iter()
        .map(|v| parse_listen_addr(v))
        .collect::<Result<Vec<_>, _>>()?;
    check_listen(&addrs)?;
    Ok(addrs)
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
pub fn parse_probe(value: &str, listen: &[SocketAddr]) -> Result<Probe, ConfigError> {
    let bad = |why: &str| ConfigError::BadProbe {
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| bad("use tcp://HOST:PORT or http://HOST:PORT/PATH"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| bad("the host must be an IP address with a port, e.g. 127.0.0.1:8080"))?;
    let listener = listen
        .iter()
        .position(|l| {
            l.port() == addr.port()
                && l.is_ipv4() == addr.is_ipv4()
                && (l.ip() == addr.ip() || l.ip().is_unspecified())
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
        _ => Err(bad("the scheme must be tcp or http")),
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

    fn listen(values: &[&str]) -> Result<Vec<SocketAddr>, ConfigError> {
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
        let listen = vec![
            "0.0.0.0:8080".parse().unwrap(),
            "[::1]:8443".parse().unwrap(),
        ];
        let p = parse_probe("http://127.0.0.1:8080/healthz", &listen).unwrap();
        assert_eq!(p.listener(), 0);
        assert!(matches!(p, Probe::Http { ref path, .. } if path == "/healthz"));
        let t = parse_probe("tcp://[::1]:8443", &listen).unwrap();
        assert_eq!(t.listener(), 1);
        assert!(parse_probe("tcp://127.0.0.1:9999", &listen).is_err());
        assert!(
            parse_probe("tcp://[::1]:8080", &listen).is_err(),
            "family differs"
        );
        assert!(parse_probe("ftp://127.0.0.1:8080", &listen).is_err());
        assert!(parse_probe("127.0.0.1:8080", &listen).is_err());
        assert!(parse_probe("tcp://0.0.0.0:8080", &listen).is_err());
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
