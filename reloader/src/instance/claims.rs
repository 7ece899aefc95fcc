//! One owner per address: at start, before anything is spawned, an
//! instance claims each managed address by binding an abstract Unix socket
//! named after it (`@reloader/claim/tcp/127.0.0.1:8080`), held for the
//! controller's life. Abstract Unix sockets live in the network namespace:
//! the claim is exactly as wide as the address, whatever the uid of the
//! instance, and it goes with the controller (a killed controller's claim
//! is free for its successor, which adopts its generations).
//!
//! Why not the listening sockets themselves: while the first instance's
//! server is still starting nothing listens yet, and a second instance for
//! the same address used to be accepted then; both reported `active`, and
//! whichever registered last got every connection.
//!
//! A wildcard address overlaps every address of its family on its port:
//! after binding its own names, an instance reads the claims of its network
//! namespace (`/proc/net/unix`) and refuses one that overlaps. Each claim
//! answers a connection with the instance's name and controller pid, so the
//! refusal names the owner.

use std::{
    io::Read,
    net::SocketAddr,
    os::{linux::net::SocketAddrExt, unix::net::UnixListener},
    time::Duration,
};

use anyhow::bail;

use crate::listen::{ListenerSpec, Transport};

/// The abstract names' prefix.
const PREFIX: &str = "reloader/claim/";

/// The claims of one instance (held by the controller; closed at exit).
pub struct Claims {
    listeners: Vec<UnixListener>,
}

/// The abstract name claiming `spec`.
fn name(transport: Transport, addr: SocketAddr) -> String {
    let transport = match transport {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    };
    format!("{PREFIX}{transport}/{addr}")
}

/// Parses a claim's name back.
fn parse(name: &str) -> Option<(Transport, SocketAddr)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (transport, addr) = rest.split_once('/')?;
    let transport = match transport {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        _ => return None,
    };
    Some((transport, addr.parse().ok()?))
}

/// Whether two addresses of one transport overlap: the same, or one is
/// its family's wildcard on the other's port.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Who holds the claim `name`: what it answers (instance and pid).
fn owner_of(name: &str) -> String {
    let asked = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|addr| std::os::unix::net::UnixStream::connect_addr(&addr))
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut who = String::new();
            stream.read_to_string(&mut who)?;
            Ok(who)
        });
    match asked {
        Ok(who) if !who.trim().is_empty() => who.trim().to_owned(),
        _ => "another reloader instance (it did not say which)".to_owned(),
    }
}

/// Claims every address of `listen`; fails, naming the owner, when another
/// instance in this network namespace claims one of them (or one that
/// overlaps). Blocking: run on a blocking thread.
#[allow(clippy::disallowed_methods)] // start-up, on the blocking thread of `startup::prepare`
pub fn claim(listen: &[ListenerSpec]) -> anyhow::Result<Claims> {
    let mut listeners = Vec::new();
    for spec in listen {
        let wanted = name(spec.transport, spec.addr);
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(wanted.as_bytes())?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => {
                listener.set_nonblocking(true)?;
                listeners.push(listener);
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => bail!(
                "{spec} is already claimed by {}: one address has one owner; stop that \
                 instance first, or give this one another address",
                owner_of(&wanted)
            ),
            Err(error) => {
                return Err(error).map_err(|e| anyhow::anyhow!("cannot claim {spec}: {e}"));
            }
        }
    }
    // Claims made before ours that overlap (a wildcard and an address on
    // the same port). Checked after binding ours, so of two instances
    // starting at once at least the later sees the earlier.
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    for line in table.lines().skip(1) {
        let Some(path) = line.split_whitespace().nth(7) else {
            continue;
        };
        let Some(other) = path.strip_prefix('@') else {
            continue;
        };
        let Some((transport, addr)) = parse(other) else {
            continue;
        };
        let ours = listen.iter().any(|s| name(s.transport, s.addr) == other);
        if ours {
            continue;
        }
        if let Some(spec) = listen
            .iter()
            .find(|s| s.transport == transport && overlap(s.addr, addr))
        {
            bail!(
                "{spec} overlaps {addr}, which {} claims: one address has one owner; stop that \
                 instance first, or give this one another address",
                owner_of(other)
            );
        }
    }
    Ok(Claims { listeners })
}

impl Claims {
    /// Answers each connection to a claim with `who` until the task is
    /// dropped (the claims close with it).
    pub async fn answer(self, who: String) {
        let listeners: Vec<tokio::net::UnixListener> = self
            .listeners
            .into_iter()
            .filter_map(|l| tokio::net::UnixListener::from_std(l).ok())
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            let who = who.clone();
            tasks.spawn(async move {
                loop {
                    if let Ok((stream, _)) = listener.accept().await {
                        let who = who.clone();
                        tokio::spawn(async move {
                            use tokio::io::AsyncWriteExt;
                            let mut stream = stream;
                            let _ = stream.write_all(who.as_bytes()).await;
                        });
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_read_back_and_wildcards_overlap() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let v6: SocketAddr = "[::]:80".parse().unwrap();
        assert_eq!(parse(&name(Transport::Udp, a)), Some((Transport::Udp, a)));
        assert_eq!(parse(&name(Transport::Tcp, v6)), Some((Transport::Tcp, v6)));
        assert!(overlap(a, any));
        assert!(!overlap(a, v6), "another family");
        assert!(!overlap(a, "127.0.0.2:80".parse().unwrap()));
        assert!(!overlap(a, "127.0.0.1:81".parse().unwrap()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_claimed_address_is_refused_naming_its_owner() {
        let spec = ListenerSpec::from("127.0.0.1:41819".parse::<SocketAddr>().unwrap());
        let first = claim(&[spec]).expect("free");
        let answering = tokio::spawn(first.answer("instance \"a\" (controller pid 7)".into()));
        let wildcard = ListenerSpec::from("0.0.0.0:41819".parse::<SocketAddr>().unwrap());
        for second in [spec, wildcard] {
            let error = tokio::task::spawn_blocking(move || claim(&[second]).err())
                .await
                .unwrap()
                .expect("refused");
            let text = error.to_string();
            assert!(text.contains("instance \"a\" (controller pid 7)"), "{text}");
        }
        answering.abort();
        let _ = answering.await;
        // The answering task's own tasks (one per listener) are aborted
        // with its JoinSet and dropped, with their listeners, when the
        // runtime next runs them: give it a few turns.
        let mut free = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if claim(&[spec]).is_ok() {
                free = true;
                break;
            }
        }
        assert!(free, "free again once released");
    }
}
