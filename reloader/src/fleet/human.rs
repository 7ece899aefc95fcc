//! `fleet status` and `fleet wait` for people: a summary line and a table
//! of the instances (a STATUS column saying why each lags, with a config).

use std::time::Duration;

use super::{FleetReport, short};
use crate::{
    generation::human_duration,
    status::{Column, render},
};

impl FleetReport {
    /// The summary line, then the table.
    pub fn human(&self) -> String {
        let mut text = self.summary();
        text.push('\n');
        if !self.instances.is_empty() {
            text.push_str(&self.table());
            text.push('\n');
        }
        text
    }

    fn summary(&self) -> String {
        let seen = self.instances.len();
        let instances = |n: usize| format!("{n} instance{}", if n == 1 { "" } else { "s" });
        let mut lines = Vec::new();
        match &self.config_sha256 {
            Some(config) if self.done => lines.push(format!(
                "config {} is active on all {} with no canary pending (waited {})",
                short(config),
                instances(seen),
                human_duration(Duration::from_millis(self.waited_ms))
            )),
            Some(config) if seen == 0 => lines.push(format!(
                "config {} is not active anywhere after {}: no instance seen",
                short(config),
                human_duration(Duration::from_millis(self.waited_ms))
            )),
            Some(config) => {
                lines.push(format!(
                    "config {} is not active everywhere after {}: {} of {} lag{}",
                    short(config),
                    human_duration(Duration::from_millis(self.waited_ms)),
                    self.lagging.len(),
                    instances(seen),
                    if self.lagging.len() == 1 { "s" } else { "" }
                ));
                if seen < self.expect {
                    lines.push(format!(
                        "only {} seen where --expect says at least {}",
                        instances(seen),
                        self.expect
                    ));
                }
            }
            None => lines.push(format!("{} scraped by Prometheus", instances(seen))),
        }
        if let Some(error) = &self.error {
            lines.push(format!(
                "the last attempt to ask Prometheus failed: {error}"
            ));
        }
        lines.join("\n")
    }

    fn table(&self) -> String {
        const COLUMNS: [Column; 9] = [
            Column::left("INSTANCE"),
            Column::left("JOB"),
            Column::left("UP"),
            Column::right("ACTIVE"),
            Column::left("CONFIG"),
            Column::right("CANARY"),
            Column::right("HELD"),
            Column::left("LAST RELOAD"),
            Column::left("STATUS").optional(),
        ];
        let number = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
        let rows = self.instances.iter().map(|i| {
            let status = match &self.config_sha256 {
                Some(config) => i.lag(config).unwrap_or_else(|| "ok".into()),
                None => String::new(),
            };
            [
                i.name(),
                i.labels.get("job").cloned().unwrap_or_default(),
                if i.up { "up" } else { "down" }.to_owned(),
                number(i.active_generation),
                i.config_sha256.as_deref().map_or("-", short).to_owned(),
                number(i.canary_generation),
                number(i.held_generation),
                match i.last_reload_successful {
                    Some(true) => "ok",
                    Some(false) => "failed",
                    None => "-",
                }
                .to_owned(),
                status,
            ]
        });
        render(&COLUMNS, rows)
    }
}
