//! `reloader fleet`'s arguments: `wait` (the fleet barrier) and `status`,
//! and which Prometheus they ask ([`PrometheusArgs`]).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};

use super::{
    HOUR, MS,
    parse::{duration_in, parse_sha256},
};

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Wait until every reloader instance Prometheus scrapes (at least
    /// --expect) has config SHA256 active with no canary pending. Exits 0
    /// then; 1 at --timeout, listing each instance and what it serves; 2
    /// when Prometheus could not be asked at the last attempt.
    Wait(FleetWaitArgs),
    /// Print each reloader instance Prometheus scrapes and what it serves.
    Status(FleetStatusArgs),
}

#[derive(Debug, Args)]
pub struct FleetWaitArgs {
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
    /// The config digest every instance must serve (what `reloader status`
    /// shows; docs/config-aware-reloads.md, "Config identity", computes it
    /// with sha256sum).
    #[arg(long, value_name = "SHA256", value_parser = parse_sha256)]
    pub config: String,
    /// Instances there must be at least (a wrong --selector, or replicas
    /// Prometheus has not discovered yet, must not pass the barrier).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub expect: u32,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_name = "DURATION",
          value_parser = duration_in("--timeout", Duration::ZERO, HOUR * 24))]
    pub timeout: Duration,
    /// Time between two looks (Prometheus sees a change at its next
    /// scrape anyway).
    #[arg(long, default_value = "2s", value_name = "DURATION",
          value_parser = duration_in("--interval", MS * 100, Duration::from_secs(600)))]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
    /// Also say, per instance, why it does not serve this config digest.
    #[arg(long, value_name = "SHA256", value_parser = parse_sha256)]
    pub config: Option<String>,
}

/// Which Prometheus to ask, and how.
#[derive(Debug, Args)]
pub struct PrometheusArgs {
    /// Prometheus's base URL, e.g. http://prometheus:9090 (its HTTP API
    /// /api/v1/query is asked).
    #[arg(long, value_name = "URL", env = "RELOADER_PROMETHEUS_URL")]
    pub prometheus: String,
    /// Target label matchers the instances must have, e.g.
    /// 'job="edge",env="prod"'.
    #[arg(long, value_name = "LABELS", default_value = "",
          value_parser = |v: &str| crate::fleet::Selector::parse(v))]
    pub selector: crate::fleet::Selector,
    /// Basic auth user; the password comes from --password-file or
    /// RELOADER_PROMETHEUS_PASSWORD.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// A file holding the basic auth password (one line).
    #[arg(long, value_name = "PATH", requires = "user")]
    pub password_file: Option<PathBuf>,
    /// A file holding a bearer token (one line); or RELOADER_PROMETHEUS_TOKEN.
    #[arg(long, value_name = "PATH", conflicts_with = "user")]
    pub bearer_token_file: Option<PathBuf>,
    /// Trust only the CA certificates in this PEM file for an https://
    /// Prometheus (default: Mozilla's root certificates).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// How long one request may take.
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = duration_in("--request-timeout", MS * 100, Duration::from_secs(600)))]
    pub request_timeout: Duration,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}
