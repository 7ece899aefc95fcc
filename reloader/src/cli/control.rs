//! The arguments of the commands that ask running controllers over their
//! control sockets: which instance ([`InstanceArgs`]), then `reload` (with
//! its canary plan), `rollback`, `promote`, `status`, `list`, `handover`
//! and `stop`.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::{
    HOUR, MS,
    parse::{CanarySteps, duration_in, parse_canary, parse_name},
};
use crate::config::{self, ConfigError};

/// Selects an instance.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// Instance name (one controller per name).
    #[arg(long, default_value = "default", value_parser = parse_name)]
    pub name: String,
    /// Control socket path [default: /run/reloader/NAME.sock as root,
    /// $XDG_RUNTIME_DIR/reloader/NAME.sock otherwise].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl InstanceArgs {
    pub fn socket(&self) -> Result<PathBuf, ConfigError> {
        Ok(self
            .control_socket
            .clone()
            .unwrap_or_else(|| config::default_control_socket(&self.name)))
    }
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Wait until the new generation is active everywhere and the old one
    /// has exited; exit non-zero if the reload failed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the new generation as a canary: once ready it gets this share
    /// of new connections (by packet hash, so a client's retry usually
    /// lands alike), the active generation the rest, until `reloader
    /// promote` or `reloader rollback`. Steps such as 1%,10%,50% need
    /// --canary-for. With --wait: returns when promoted (exit 0) or rolled
    /// back (exit 3).
    #[arg(long, value_name = "PERCENT", value_parser = parse_canary)]
    pub canary: Option<CanarySteps>,
    /// With --canary: how long each step lasts; after the last one, a
    /// canary that stayed healthy is promoted.
    #[arg(long, value_name = "DURATION", requires = "canary",
          value_parser = duration_in("--canary-for", MS * 100, HOUR * 24))]
    pub canary_for: Option<Duration>,
}

impl ReloadArgs {
    /// The canary plan asked for, checked.
    pub fn canary_plan(&self) -> Result<Option<config::CanaryPlan>, ConfigError> {
        let Some(CanarySteps(steps)) = &self.canary else {
            return Ok(None);
        };
        if steps.len() > 1 && self.canary_for.is_none() {
            return Err(ConfigError::BadCanary {
                value: steps
                    .iter()
                    .map(|w| format!("{}%", config::CanaryPlan::percent(*w)))
                    .collect::<Vec<_>>()
                    .join(","),
                why: "steps need --canary-for DURATION (how long each lasts)".into(),
            });
        }
        Ok(Some(config::CanaryPlan {
            steps: steps.clone(),
            dwell_ms: self.canary_for.map(|d| d.as_millis() as u64),
        }))
    }
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Return once the generation rolled back from has exited.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Return once the generation beside the canary has exited (at once
    /// when it is held with --keep-previous).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also look for control sockets (`*.sock`) in DIR (repeat for each):
    /// instances started with --control-socket elsewhere.
    #[arg(long, value_name = "DIR")]
    pub dir: Vec<PathBuf>,
    /// How long each instance may take to answer.
    #[arg(long, default_value = "1s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 10, Duration::from_secs(60)))]
    pub timeout: Duration,
    /// Print JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HandoverArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Give up waiting (for the controller to exit; with --wait, for its
    /// successor to answer) after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
    /// Then wait until the next controller answers on the control socket
    /// (systemd starts it).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Give up waiting for the instance to exit after this long.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = duration_in("--timeout", MS * 100, HOUR * 24))]
    pub timeout: Duration,
}
