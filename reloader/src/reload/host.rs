//! [`System`]: the real [`Host`] — processes, `/proc`, sock_diag and
//! `pidfd_getfd`, pidfds.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::Arc,
};

use super::{Host, Scan};
use crate::{
    config::{RunConfig, substitute_generation},
    discovery,
    error::ReloadError,
    state::FoundSocket,
    steering::Transport,
    supervisor::{self, Spawned},
};

/// Spawns and inspects real processes for instance `config`.
pub struct System {
    pub config: Arc<RunConfig>,
}

impl Host for System {
    fn spawn(&self, number: u64, notify_socket: Option<&Path>) -> Result<Spawned, ReloadError> {
        let config = &self.config;
        let command = substitute_generation(&config.command, number);
        // Socket activation: this generation's listeners, opened here. Our
        // copies close right after the spawn; discovery then finds them in
        // the server like any others.
        let passed: Vec<OwnedFd> = if config.pass_fds {
            config
                .listen
                .iter()
                .map(|spec| {
                    match spec.transport {
                        Transport::Tcp => {
                            crate::net::tcp_listener(spec.addr, true).map(OwnedFd::from)
                        }
                        Transport::Udp => {
                            crate::net::udp_socket(spec.addr, true).map(OwnedFd::from)
                        }
                    }
                    .map_err(|source| ReloadError::PassFdsError {
                        addr: *spec,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let extras = supervisor::SpawnExtras {
            listen_fds: passed
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_fd(), format!("listen{i}")))
                .collect(),
            notify_socket,
        };
        supervisor::spawn(&command, number, &config.name, &extras).map_err(|source| {
            ReloadError::SpawnError {
                command: command.first().cloned().unwrap_or_default(),
                source,
            }
        })
    }

    async fn scan(&self, pid: u32) -> Result<Scan, ReloadError> {
        let listen = self.config.listen_keys();
        tokio::task::spawn_blocking(move || scan(pid, &listen))
            .await
            .map_err(|e| ReloadError::Internal {
                what: format!("discovery thread: {e}"),
            })?
    }

    async fn listening(&self) -> Result<BTreeSet<u64>, ReloadError> {
        let listen = self.config.listen_keys();
        tokio::task::spawn_blocking(move || Self::listening_now(&listen))
            .await
            .map_err(|e| ReloadError::Internal {
                what: format!("discovery thread: {e}"),
            })?
    }

    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static {
        supervisor::exit_of(pid)
    }

    fn copy(&self, scan: &Scan) -> Result<Vec<Vec<FoundSocket>>, ReloadError> {
        scan.per_address
            .iter()
            .map(|sockets| {
                sockets
                    .iter()
                    .map(|(socket, holder)| {
                        let copy = discovery::copy_fd(holder.pid, holder.fd).map_err(|source| {
                            ReloadError::DiscoveryError {
                                source: Box::new(source),
                            }
                        })?;
                        Ok(FoundSocket {
                            socket: socket.clone(),
                            holder: *holder,
                            copy,
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

impl System {
    /// Inodes listening on managed addresses.
    fn listening_now(listen: &[(Transport, SocketAddr)]) -> Result<BTreeSet<u64>, ReloadError> {
        let all = discovery::listeners().map_err(|source| ReloadError::DiscoveryError {
            source: Box::new(source),
        })?;
        Ok(all
            .into_iter()
            .filter(|l| listen.contains(&(l.transport, l.addr)))
            .map(|l| l.inode)
            .collect())
    }
}

fn scan(pid: u32, listen: &[(Transport, SocketAddr)]) -> Result<Scan, ReloadError> {
    let found = discovery::find(pid, listen).map_err(|source| ReloadError::DiscoveryError {
        source: Box::new(source),
    })?;
    Ok(Scan {
        per_address: found.per_address,
        listening: found
            .tree_listens_on
            .iter()
            .map(|(transport, addr)| match transport {
                Transport::Tcp => addr.to_string(),
                Transport::Udp => format!("udp://{addr}"),
            })
            .collect(),
    })
}
