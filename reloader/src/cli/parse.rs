//! The command line's value parsers (clap calls them, one flag value at a
//! time): durations, signals, addresses, probes, canary steps, the
//! `--check` command, paths, instance names. What depends on several flags
//! is checked when [`super::RunArgs`] becomes a [`crate::config::RunConfig`].

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use nix::sys::signal::Signal;
use reloader_ebpf::limits::MAX_LISTENERS;

use crate::{
    config::{CheckCommand, ConfigError, Probe},
    listen::{ListenerSpec, Transport},
};

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
    let scale = f64::from(reloader_ebpf::WEIGHT_SCALE);
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

/// Splits a `--check` value into words the way a POSIX shell would (quotes
/// and backslashes; no variables, globs or pipes), with the `shlex` crate.
pub fn parse_check(value: &str) -> Result<CheckCommand, ConfigError> {
    parse_command("--check", value)
}

/// `--drain-command CMD`: as `--check`.
pub fn parse_drain_command(value: &str) -> Result<CheckCommand, ConfigError> {
    parse_command("--drain-command", value)
}

fn parse_command(flag: &'static str, value: &str) -> Result<CheckCommand, ConfigError> {
    let bad = |why| ConfigError::BadCheck {
        flag,
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
            crate::generation::human_duration(min)
        )));
    }
    if duration > max {
        return Err(bad(format!(
            "must be at most {}",
            crate::generation::human_duration(max)
        )));
    }
    Ok(duration)
}

/// `--settle`: `auto`, `idle`, or a duration up to a minute.
pub fn parse_settle(value: &str) -> Result<crate::config::Settle, ConfigError> {
    use crate::config::Settle;
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Settle::Auto),
        "idle" => Ok(Settle::Idle),
        _ => parse_duration("--settle", value, Duration::ZERO, Duration::from_secs(60))
            .map(Settle::Fixed)
            .map_err(|e| match e {
                ConfigError::BadDuration { flag, value, why } => ConfigError::BadDuration {
                    flag,
                    value,
                    why: format!("{why} (or `auto`, `idle`)"),
                },
                other => other,
            }),
    }
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
/// `tcp://IP:PORT` (TCP), `udp://IP:PORT?mode=flows` (UDP with flow
/// affinity), `udp://IP:PORT?mode=stateless` (UDP, every datagram to the
/// active generation). UDP without a mode is refused: neither is a safe
/// default (flows lose DNS queries to old generations, stateless breaks
/// QUIC connections at every reload).
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
        ("udp", "") => return Err(ConfigError::UdpModeMissing { addr }),
        ("udp", "mode=flows") => ListenerSpec::udp(addr, false),
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

/// A size: bytes, or a number with a binary unit (`K`, `M`, `G`, `T`,
/// also written `KiB`, `MB`… — all powers of 1024, as cgroup limits and
/// systemd's `MemoryMax=` read them).
pub fn parse_size(flag: &'static str, value: &str) -> Result<u64, ConfigError> {
    let bad = |why: &str| ConfigError::BadSize {
        flag,
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let text = value.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad("must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// A clap value parser for a size flag.
pub fn size_named(
    flag: &'static str,
) -> impl Fn(&str) -> Result<u64, ConfigError> + Clone + Send + Sync + 'static {
    move |value| parse_size(flag, value)
}

/// A clap value parser for a signal flag.
pub fn signal_named(
    flag: &'static str,
) -> impl Fn(&str) -> Result<Signal, ConfigError> + Clone + Send + Sync + 'static {
    move |value| parse_signal(flag, value)
}

/// A clap value parser for `--metrics`.
/// A config digest: 64 hex digits (sha256), as `reloader status` and
/// `sha256sum` print it.
pub fn parse_sha256(value: &str) -> Result<String, String> {
    let digest = value.trim().to_ascii_lowercase();
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest)
    } else {
        Err(format!(
            "{value:?} is not a sha256 digest (64 hex digits, as `reloader status` shows the \
             active config's)"
        ))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::substitute_generation;

    fn listen(values: &[&str]) -> Result<Vec<ListenerSpec>, ConfigError> {
        parse_listen(&values.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        let size = |v| parse_size("--max-draining-memory", v);
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("2GiB"), Ok(2 << 30));
        assert_eq!(size("1.5g"), Ok(3 << 29));
        assert_eq!(size(" 64 KiB "), Ok(64 << 10));
        for bad in ["", "M", "12 apples", "0", "0.1"] {
            let error = size(bad).unwrap_err().to_string();
            assert!(error.contains("--max-draining-memory"), "{error}");
        }
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
            "udp://127.0.0.1:443?mode=flows",
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
        assert_eq!(specs[2].to_string(), "udp://127.0.0.1:443?mode=flows");
        assert_eq!(specs[0].to_string(), "127.0.0.1:443");
        assert!(matches!(
            listen(&[
                "udp://127.0.0.1:53?mode=flows",
                "udp://127.0.0.1:53?mode=stateless"
            ]),
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

    /// `udp://ADDR` meant flows until issue 29; it is refused now, and the
    /// refusal names both modes and what each is for.
    #[test]
    fn udp_without_a_mode_is_refused_with_both_modes_explained() {
        let error = listen(&["udp://127.0.0.1:53"]).unwrap_err();
        assert_eq!(
            error,
            ConfigError::UdpModeMissing {
                addr: "127.0.0.1:53".parse().unwrap()
            }
        );
        let text = error.to_string();
        for needle in [
            "udp://127.0.0.1:53?mode=flows",
            "udp://127.0.0.1:53?mode=stateless",
            "QUIC",
            "DNS",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text:?}");
        }
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
        let listen = listen(&[
            "0.0.0.0:8080",
            "[::1]:8443",
            "udp://127.0.0.1:5353?mode=stateless",
        ])
        .unwrap();
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
