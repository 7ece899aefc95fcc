//! Handing the instance over to the next controller (`reloader handover`,
//! used to upgrade reloader itself): the owner stops taking reloads, lets
//! the one under way reach its cut-over, then ends its loop without
//! signalling any generation. [`super::run`] then keeps what a successor
//! adopts them by — the state file (written once more), the pinned maps,
//! the log keeper — and the controller exits with
//! [`super::HANDED_OVER`]; the next `reloader run` with the same options
//! (systemd restarts it: `RestartForceExitStatus=75`) adopts them as after
//! a controller's crash, so nothing the servers do is interrupted.

use anyhow::Context;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Outcome, owner::Owner, recovery};
use crate::{control::Response, reload::Host, state::Client};

impl<H: Host> Owner<H> {
    /// A hand-over request, decided in one step: refused while stopping,
    /// else taken (answered at once; the run loop ends once no reload
    /// runs).
    pub(super) fn on_handover(&mut self, reply: oneshot::Sender<Response>) {
        let response = if self.stopping.is_some() || self.state.is_stopping() {
            Response::Error {
                message: "the instance is stopping".into(),
            }
        } else {
            if !self.handing_over {
                info!(
                    reload_running = self.running.is_some(),
                    "handing over to the next controller (once no reload runs)"
                );
            }
            self.handing_over = true;
            Response::HandingOver {
                controller_pid: std::process::id(),
            }
        };
        let _ = reply.send(response);
    }

    /// The last step before the loop ends on a hand-over: requests still
    /// waiting are refused (a successor knows nothing of them), and the
    /// tasks this owner started end without touching any generation (a
    /// drain under way is begun again by the successor, which adopts
    /// draining generations as such).
    pub(super) fn hand_over(&mut self) {
        self.scheduler.refuse_all(
            "the controller handed over to a new one before this reload started: ask again",
        );
        self.tasks.abort_all();
        self.restart_at = None;
        info!(
            generations = ?self.state.live(),
            "handed over: every generation keeps running for the next controller"
        );
    }
}

/// The end of a hand-over: the state file is written once more (what the
/// successor adopts by, as the owner left it), the control socket goes
/// (nobody answers on it until the successor binds its own), the state
/// file, the pins and the keeper stay; then the instance lock is released.
pub(super) async fn hand_over(
    client: &Client,
    paths: recovery::Paths,
    lock: crate::rundir::InstanceLock,
) -> anyhow::Result<Outcome> {
    let saved = client.snapshot().saved.clone();
    let written = tokio::task::spawn_blocking(move || {
        let written = crate::state::saved::save(&paths.state, &saved);
        #[allow(clippy::disallowed_methods)] // on a blocking thread
        let _ = std::fs::remove_file(&paths.control);
        // The lock's file goes through the directory's descriptor: before
        // the paths (and the descriptor) are dropped.
        drop(lock);
        written
    })
    .await
    .context("the hand-over thread")?;
    match written {
        Ok(()) => info!(
            state = %crate::state::saved::state_path(&client.config().control_socket).display(),
            "handed over: exiting without signalling any generation; the next `reloader run` \
             with the same options adopts them"
        ),
        Err(error) => warn!(
            %error,
            "handed over, but the state file could not be written once more: the successor \
             adopts from the last one written"
        ),
    }
    Ok(Outcome::HandedOver)
}
