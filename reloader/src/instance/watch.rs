//! `--watch`: each burst of changes becomes one reload request, which the
//! run loop's scheduler coalesces with a reload already running.

use tokio::sync::mpsc;
use tracing::info;

use super::events::Event;
use crate::watch::Watcher;

/// Requests a reload after each burst of changes, until the instance stops.
pub async fn reload_on_change(mut watcher: Watcher, events: mpsc::Sender<Event>) {
    loop {
        let changed = watcher.next_change().await;
        let paths: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        info!(paths = %paths.join(" "), "--watch: changed; reloading");
        if events
            .send(Event::Reload {
                wait: false,
                canary: None,
                reply: None,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}
