//! Before a reload takes a slot: the pre-flight `--check` ([`super::check`])
//! and the digest of the `--config` files ([`crate::digest`]).
//!
//! A failed check ends the reload here: no slot is taken, no generation
//! number is used (the next reload gets the same one), nothing is spawned,
//! and the active generation is untouched. The digest is made after the
//! check passed and before the spawn, so it names what the check
//! approved; a file changed in between is caught by `--watch`, which
//! reloads again. A digest that cannot be made (a `--config` file is
//! missing or unreadable) does not fail the reload: the configuration's
//! identity is for reporting, and the server is the judge of its config
//! (add a `--check` to refuse such reloads). The generation then has no
//! digest, and a fleet query over `reloader_active_config_info` sees the
//! replica as not serving the expected config.

use std::time::Instant;

use tracing::warn;

use super::{check, machine::failed};
use crate::{state::Client, status::ReloadReport};

/// Runs the check and hashes the config; returns the digest (`None`:
/// no `--config`, or it could not be read), or the failure report.
pub async fn run(client: &Client) -> Result<Option<String>, ReloadReport> {
    let t0 = Instant::now();
    let config = client.config().clone();
    if let Some(command) = &config.changes.check {
        let snapshot = client.snapshot();
        let (next, previous) = (snapshot.next_generation, snapshot.active);
        if let Err(error) = check::run(command, &config.name, next, config.ready.timeout).await {
            warn!(generation = next, error = %crate::error_chain(&error), "reload refused by --check");
            let output = match &error {
                crate::error::ReloadError::CheckFailed { output, .. } => output.clone(),
                _ => Vec::new(),
            };
            let report = ReloadReport {
                generation: next,
                previous,
                stderr_tail: output,
                ..ReloadReport::default()
            };
            return Err(failed(report, &error, t0));
        }
    }
    if config.changes.config_files.is_empty() {
        return Ok(None);
    }
    let files = config.changes.config_files.clone();
    let digest = tokio::task::spawn_blocking(move || crate::digest::config_sha256(&files)).await;
    match digest {
        Ok(Ok(digest)) => Ok(Some(digest)),
        Ok(Err(error)) => {
            warn!(error = %crate::error_chain(&error), "the new generation gets no config digest");
            Ok(None)
        }
        Err(error) => {
            warn!(%error, "the new generation gets no config digest");
            Ok(None)
        }
    }
}
