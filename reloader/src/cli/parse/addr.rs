//! The value parsers for addresses: `--listen` (TCP, or UDP with its
//! mode) and the addresses together, `--metrics`/`--health`, and the
//! probes (`--ready-probe`, `--health-probe`), each of which must reach a
//! managed listener.

use std::{collections::HashSet, net::SocketAddr};

use reloader_ebpf::limits::MAX_LISTENERS;

use crate::{
    config::{ConfigError, Probe},
    listen::{ListenerSpec, Transport},
};

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
}
