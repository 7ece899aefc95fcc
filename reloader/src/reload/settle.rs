//! Step 7: when an old generation, which receives nothing new from the
//! cutover on, gets its drain signal (`--settle`).
//!
//! A drain signal is safe once the generation has nothing left to answer:
//! a server's graceful stop closes its listeners (what is queued migrates
//! on select-or-migrate kernels, and is lost on select-only ones) and
//! closes idle keep-alive connections; a server without a graceful stop
//! dies mid-response. So, from looks at the kernel ([`holdings::look`]):
//!
//! - `auto`: its listeners' accept queues are empty, and each connection it
//!   holds is closed or idle after an answer: nothing unread, nothing
//!   unsent or unacknowledged, it has received a request, and its last send
//!   is not older than its last receive ([`answered`]). A connection
//!   accepted but silent keeps it settling until it speaks or the bound.
//! - `idle`: its accept queues are empty and it holds no connection at all.
//! - a fixed duration: as before `auto`.
//!
//! `auto` and `idle` end at `--settle-max` whatever the looks say.
//!
//! Handshakes in progress (request sockets) do not say which listener they
//! belong to. On select-or-migrate kernels they need no wait: when the
//! final ACK of a request whose listener has closed arrives, the kernel
//! asks the program for another listener (`tcp_migrate_req`). On
//! select-only kernels they would be reset, so the settle also waits until
//! every handshake seen at its first look has completed or gone.
//!
//! Limits: `tcp_info`'s times have jiffy resolution (4 ms at HZ=250), so
//! a request that arrived in the same jiffy as the answer before it, and is
//! still being processed, looks answered (the send and receive times are
//! equal and the connection has sent before). Streaming responses with
//! nothing in flight at a look look answered too.
//!
//! Looks are cheap but not free (a sock_diag dump per managed address
//! family, which walks the kernel's whole established hash, TIME_WAIT
//! sockets included: 3–9 ms of wall time in the bench under 12,000 new
//! connections/s; the cost is in BENCHMARKS.md): [`FIRST_LOOK`] apart for
//! [`BACK_OFF_AFTER`], then backing off to [`LAST_LOOK`]. So on kernels
//! that migrate handshakes a look reads the old generation's processes'
//! descriptors instead ([`holdings::look_held`]: a dump of the listeners
//! only, for the queues, then each socket they hold — microseconds per
//! descriptor, whatever the hash holds). Where that cannot be done (no
//! `pidfd_getfd`, too many descriptors), a dump.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use tracing::{debug, info};

use crate::{
    config::Settle,
    generation::{State, human_duration},
    holdings::{self, Connection, Look, Subject, TCP_CLOSE_WAIT, TCP_ESTABLISHED},
    net::Transport,
    state::Client,
};

/// The looks' interval for the first [`BACK_OFF_AFTER`]: answers to what
/// was accepted before the cutover usually take milliseconds, and a
/// doubling interval (2, 4, 8, 16, 32 ms) made the test server's settle
/// 62 ms in the bench where one look at 2 ms intervals ends it in a few.
const FIRST_LOOK: Duration = Duration::from_millis(2);
/// When the interval starts doubling.
const BACK_OFF_AFTER: Duration = Duration::from_millis(100);
/// The interval looks back off to.
const LAST_LOOK: Duration = Duration::from_millis(100);

/// What a settling generation still waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Connections in its listeners' accept queues.
    Queued(u64),
    /// Handshakes seen at the first look still in progress (select-only).
    Handshakes(usize),
    /// Connections that have not been answered (auto).
    Unanswered(usize),
    /// Connections it holds (idle).
    Connections(usize),
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Queued(n) => write!(f, "{n} connections in its accept queues"),
            Self::Handshakes(n) => write!(f, "{n} handshakes in progress"),
            Self::Unanswered(n) => write!(f, "{n} connections not yet answered"),
            Self::Connections(n) => write!(f, "{n} open connections"),
        }
    }
}

/// Whether connection `c` is closed or idle after an answer (module
/// comment).
pub fn answered(c: &Connection) -> bool {
    if c.unread > 0 || c.unsent > 0 {
        return false;
    }
    match c.state {
        // The client closed: nothing more will come.
        TCP_CLOSE_WAIT => true,
        TCP_ESTABLISHED => c.activity.is_some_and(|a| {
            a.bytes_received > 0
                && (a.last_sent_ms < a.last_received_ms
                    || (a.last_sent_ms == a.last_received_ms && a.bytes_sent > 0))
        }),
        _ => true,
    }
}

/// What `look` says the generation still waits for under `mode` (`None`:
/// settled). `early` are the handshakes of the first look, waited for when
/// `handshakes_matter` (select-only).
pub fn waiting_for(
    mode: Settle,
    look: &Look,
    early: &HashSet<u64>,
    handshakes_matter: bool,
) -> Option<Waiting> {
    if look.queued > 0 {
        return Some(Waiting::Queued(look.queued));
    }
    if handshakes_matter {
        let pending = early.intersection(&look.handshakes).count();
        if pending > 0 {
            return Some(Waiting::Handshakes(pending));
        }
    }
    match mode {
        Settle::Fixed(_) => None,
        Settle::Auto => {
            let unanswered = look.connections.iter().filter(|c| !answered(c)).count();
            (unanswered > 0).then_some(Waiting::Unanswered(unanswered))
        }
        Settle::Idle => {
            (!look.connections.is_empty()).then_some(Waiting::Connections(look.connections.len()))
        }
    }
}

/// Lets `old` settle by looking (`auto`, `idle`) until it is settled or
/// `max` has passed; returns early if it no longer drains.
pub async fn by_looks(client: &Client, old: u64, mode: Settle, max: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + max;
    let config = client.config().clone();
    let managed: Vec<SocketAddr> = config
        .listen
        .iter()
        .filter(|l| l.transport == Transport::Tcp)
        .map(|l| l.addr)
        .collect();
    let (subject, handshakes_matter) = {
        let snapshot = client.snapshot();
        let Some(g) = snapshot.generation(old) else {
            return;
        };
        let subject = Subject {
            generation: old,
            cgroup: g.cgroup.clone(),
            pid: g.pid,
            listeners: g.tcp_listeners.clone(),
            managed,
        };
        (subject, !snapshot.migrates)
    };
    if subject.managed.is_empty() {
        return;
    }
    let migrations = client.migrations();
    let mut early: Option<HashSet<u64>> = None;
    let mut interval = FIRST_LOOK;
    let mut looks = 0u32;
    loop {
        if !client.snapshot().is(old, State::Draining) {
            return;
        }
        let (subject2, migrations2) = (subject.clone(), migrations.clone());
        let look = tokio::task::spawn_blocking(move || {
            if !handshakes_matter && let Some(look) = holdings::look_held(&subject2)? {
                return Ok(look);
            }
            holdings::look(&subject2, migrations2.as_ref())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        looks += 1;
        let look = match look {
            Ok(look) => look,
            Err(error) => {
                // Nothing to decide by: the bound, as a fixed settle would.
                info!(generation = old, %error, "cannot look at what it holds; settling for --settle-max");
                tokio::time::sleep_until(deadline).await;
                return;
            }
        };
        let early = early.get_or_insert_with(|| look.handshakes.clone());
        let waiting = waiting_for(mode, &look, early, handshakes_matter);
        let Some(waiting) = waiting else {
            debug!(
                generation = old,
                settle = %mode,
                after = %human_duration(started.elapsed()),
                looks,
                "settled"
            );
            return;
        };
        if tokio::time::Instant::now() >= deadline {
            info!(
                generation = old,
                settle = %mode,
                "--settle-max ({}) reached with {waiting}: draining anyway",
                human_duration(max)
            );
            return;
        }
        tokio::time::sleep(interval.min(deadline - tokio::time::Instant::now())).await;
        if started.elapsed() >= BACK_OFF_AFTER {
            interval = (interval * 2).min(LAST_LOOK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::holdings::Activity;

    fn connection(state: u8, unread: u32, unsent: u32, activity: Option<Activity>) -> Connection {
        Connection {
            cookie: 1,
            local: "127.0.0.1:80".parse().unwrap(),
            remote: "127.0.0.1:40000".parse().unwrap(),
            cgroup_id: None,
            state,
            inode: 7,
            unread,
            unsent,
            activity,
        }
    }

    fn activity(last_sent_ms: u32, last_received_ms: u32, received: u64, sent: u64) -> Activity {
        Activity {
            last_sent_ms,
            last_received_ms,
            bytes_received: received,
            bytes_sent: sent,
        }
    }

    fn look(connections: Vec<Connection>) -> Look {
        Look {
            connections,
            ..Look::default()
        }
    }

    #[test]
    fn a_connection_is_answered_when_its_last_send_follows_its_last_request() {
        let established = |a| connection(TCP_ESTABLISHED, 0, 0, Some(a));
        // Answered 3 ms after the request came in (times are "ago").
        assert!(answered(&established(activity(2, 5, 100, 900))));
        // The request came in after the last send: being processed.
        assert!(!answered(&established(activity(9, 1, 200, 900))));
        // Accepted, never spoke: the server waits for it.
        assert!(!answered(&established(activity(40, 40, 0, 0))));
        // Request and answer in the same jiffy: answered if it sent at all.
        assert!(answered(&established(activity(4, 4, 100, 900))));
        assert!(!answered(&established(activity(4, 4, 100, 0))));
        // Something unread or unsent is never answered.
        assert!(!answered(&connection(
            TCP_ESTABLISHED,
            10,
            0,
            Some(activity(2, 5, 100, 900))
        )));
        assert!(!answered(&connection(
            TCP_ESTABLISHED,
            0,
            10,
            Some(activity(2, 5, 100, 900))
        )));
        // No tcp_info: unknown, so not answered.
        assert!(!answered(&connection(TCP_ESTABLISHED, 0, 0, None)));
        // The client closed and nothing is left: answered.
        assert!(answered(&connection(TCP_CLOSE_WAIT, 0, 0, None)));
        assert!(!answered(&connection(TCP_CLOSE_WAIT, 3, 0, None)));
    }

    #[test]
    fn auto_waits_for_queues_and_unanswered_connections_only() {
        let none = HashSet::new();
        let idle = connection(TCP_ESTABLISHED, 0, 0, Some(activity(1, 3, 10, 10)));
        let busy = connection(TCP_ESTABLISHED, 0, 0, Some(activity(9, 1, 10, 10)));
        assert_eq!(waiting_for(Settle::Auto, &look(vec![]), &none, false), None);
        assert_eq!(
            waiting_for(Settle::Auto, &look(vec![idle, idle]), &none, false),
            None
        );
        assert_eq!(
            waiting_for(Settle::Auto, &look(vec![idle, busy, busy]), &none, false),
            Some(Waiting::Unanswered(2))
        );
        let queued = Look {
            queued: 3,
            ..Look::default()
        };
        assert_eq!(
            waiting_for(Settle::Auto, &queued, &none, false),
            Some(Waiting::Queued(3))
        );
    }

    #[test]
    fn idle_waits_for_every_connection_to_close() {
        let none = HashSet::new();
        let idle = connection(TCP_ESTABLISHED, 0, 0, Some(activity(1, 3, 10, 10)));
        assert_eq!(
            waiting_for(Settle::Idle, &look(vec![idle]), &none, false),
            Some(Waiting::Connections(1))
        );
        assert_eq!(waiting_for(Settle::Idle, &look(vec![]), &none, false), None);
    }

    #[test]
    fn handshakes_of_the_first_look_matter_only_without_migration() {
        let early = HashSet::from([1, 2, 3]);
        let mut now = Look {
            handshakes: HashSet::from([3, 4, 5]),
            ..Look::default()
        };
        // Select-only: handshake 3 may be the old listener's.
        assert_eq!(
            waiting_for(Settle::Auto, &now, &early, true),
            Some(Waiting::Handshakes(1))
        );
        // Select-or-migrate: the kernel migrates it when it completes.
        assert_eq!(waiting_for(Settle::Auto, &now, &early, false), None);
        // Later handshakes are the new generation's.
        now.handshakes = HashSet::from([4, 5]);
        assert_eq!(waiting_for(Settle::Auto, &now, &early, true), None);
    }
}
