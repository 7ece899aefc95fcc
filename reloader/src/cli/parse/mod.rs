//! The command line's value parsers (clap calls them, one flag value at a
//! time): durations, signals, addresses, probes, canary steps, the
//! `--check` command, paths, instance names. What depends on several flags
//! is checked when [`super::RunArgs`] becomes a [`crate::config::RunConfig`].
//! The address parsers (`--listen`, `--metrics`, the probes) are in `addr`.

use std::{path::PathBuf, str::FromStr, time::Duration};

use nix::sys::signal::Signal;

pub use self::addr::{
    check_listen, parse_listen, parse_listen_addr, parse_metrics_addr, parse_probe,
};
use crate::config::{CheckCommand, ConfigError};

mod addr;

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
