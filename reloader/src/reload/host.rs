//! [`System`]: the real [`Host`] — processes, `/proc`, sock_diag and
//! `pidfd_getfd`, pidfds. Everything that may sleep (fork and exec, `/proc`
//! walks, netlink dumps) runs on a blocking thread.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{Host, Scan};
use crate::{
    config::{RunConfig, substitute_generation},
    discovery,
    error::ReloadError,
    state::{Effect, FoundSocket},
    steering::Transport,
    supervisor::{self, Spawned},
};

/// Spawns and inspects real processes for instance `config`.
pub struct System {
    pub config: Arc<RunConfig>,
    /// The log keeper every generation's stderr is handed to (none if it
    /// could not be started: said at start).
    pub keeper: Option<Arc<supervisor::keeper::Link>>,
    /// The runtime directory (notify sockets go there).
    pub dir: Arc<crate::rundir::RuntimeDir>,
    /// The control socket's file name, which notify sockets are named after.
    pub socket_name: std::ffi::OsString,
    /// The instance's cgroups, and the watch on its generations' ones
    /// (`None`: no writable cgroup v2, said at start).
    pub cgroups: Option<(Arc<crate::cgroup::Instance>, crate::cgroup::Watch)>,
    /// `--inject-reuseport`: the bind programs each generation's cgroup
    /// gets before its first process enters it.
    pub inject: Option<Arc<crate::steering::Injector>>,
}

impl Host for System {
    async fn spawn(
        &self,
        number: u64,
        notify_socket: Option<PathBuf>,
    ) -> Result<Spawned, ReloadError> {
        let (config, keeper) = (self.config.clone(), self.keeper.clone());
        let cgroups = self.cgroups.clone();
        let inject = self.inject.clone();
        blocking("spawn", move || {
            if config.spawn.inject_reuseport && (inject.is_none() || cgroups.is_none()) {
                return Err(ReloadError::SpawnError {
                    command: "--inject-reuseport".into(),
                    source: std::io::Error::other(
                        "no cgroup for the generation to attach the bind programs to (see the \
                         start-up log)",
                    ),
                });
            }
            let mut spawned = spawn(&config, number, notify_socket.as_deref(), keeper.as_deref())?;
            if let Some((cgroups, watch)) = &cgroups {
                // Before the gate opens: none of the server's code runs
                // outside its cgroup. The bind programs are attached before
                // the process enters: it binds nothing without them.
                let pid = spawned.process.pid();
                let entered = cgroups.create(number).and_then(|dir| {
                    if let Some(inject) = &inject {
                        inject
                            .attach(&dir)
                            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
                    }
                    crate::cgroup::admit(&dir, pid)?;
                    watch.add(number, &dir)?;
                    Ok(dir)
                });
                match entered {
                    Ok(dir) => spawned.cgroup = Some(dir),
                    Err(source) => {
                        spawned
                            .process
                            .signal_group(nix::sys::signal::Signal::SIGKILL);
                        return Err(ReloadError::SpawnError {
                            command: format!(
                                "moving generation {number} into its cgroup {}",
                                cgroups.generation(number).display()
                            ),
                            source,
                        });
                    }
                }
            }
            Ok(spawned)
        })
        .await
    }

    fn notify_paths(&self, number: u64) -> (PathBuf, PathBuf) {
        let name = PathBuf::from(&self.socket_name).with_extension(format!("gen{number}.notify"));
        (self.dir.path(&name), self.dir.named(&name))
    }

    async fn scan(&self, of: super::Members) -> Result<Scan, ReloadError> {
        let listen = self.config.listen_keys();
        blocking("discovery", move || scan(&of, &listen)).await
    }

    async fn listening(&self) -> Result<BTreeSet<u64>, ReloadError> {
        let listen = self.config.listen_keys();
        blocking("discovery", move || listening_now(&listen)).await
    }

    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static {
        supervisor::exit_of(pid)
    }

    async fn copy(&self, scan: Scan) -> Result<Vec<Vec<FoundSocket>>, ReloadError> {
        blocking("discovery", move || copy(&scan)).await
    }

    fn carry_out(&self, effects: Vec<Effect>) -> impl Future<Output = ()> + Send + 'static {
        let cgroups = self.cgroups.clone();
        let done = tokio::task::spawn_blocking(move || {
            for effect in effects {
                match (effect, &cgroups) {
                    (Effect::SignalAdoptedGroup { process, signal }, _) => {
                        process.signal_group(signal);
                    }
                    (Effect::KillCgroup { dir }, Some((instance, _))) => {
                        crate::cgroup::kill(&dir, instance.mount());
                    }
                    (Effect::SignalCgroupRoots { dir, signal }, Some((instance, _))) => {
                        crate::cgroup::signal_roots(&dir, instance.mount(), signal);
                    }
                    (Effect::RemoveCgroup { number, dir }, Some((_, watch))) => {
                        watch.forget(number);
                        if let Err(error) = crate::cgroup::remove(&dir) {
                            tracing::debug!(cgroup = %dir.display(), %error, "not removed yet");
                        }
                    }
                    (effect, None) => {
                        tracing::warn!(?effect, "a cgroup effect without cgroups");
                    }
                }
            }
        });
        async move {
            let _ = done.await;
        }
    }

    fn peek_exited(&self) -> Option<supervisor::Exit> {
        supervisor::peek_exited()
    }

    fn reap(&self, pid: u32) {
        supervisor::reap(pid);
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ReloadError> + Send + 'static,
) -> Result<T, ReloadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReloadError::Internal {
            what: format!("{what} thread: {e}"),
        })?
}

/// Spawns generation `number` of instance `config`.
fn spawn(
    config: &RunConfig,
    number: u64,
    notify_socket: Option<&Path>,
    keeper: Option<&supervisor::keeper::Link>,
) -> Result<Spawned, ReloadError> {
    let command = substitute_generation(&config.spawn.command, number);
    // Socket activation: this generation's listeners, opened here. Our
    // copies close right after the spawn; discovery then finds them in
    // the server like any others.
    let passed: Vec<OwnedFd> = if config.spawn.pass_fds {
        config
            .listen
            .iter()
            .map(|spec| {
                match spec.transport {
                    Transport::Tcp => crate::net::tcp_listener(spec.addr, true).map(OwnedFd::from),
                    Transport::Udp => crate::net::udp_socket(spec.addr, true).map(OwnedFd::from),
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
        keeper,
    };
    supervisor::spawn(&command, number, &config.name, &extras).map_err(|source| {
        ReloadError::SpawnError {
            command: command.first().cloned().unwrap_or_default(),
            source,
        }
    })
}

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

fn scan(of: &super::Members, listen: &[(Transport, SocketAddr)]) -> Result<Scan, ReloadError> {
    let found = match &of.cgroup {
        Some(dir) => discovery::find_among(&crate::cgroup::members(dir), listen),
        None => discovery::find(of.pid, listen),
    }
    .map_err(|source| ReloadError::DiscoveryError {
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

/// Copies the sockets of `scan` into this process.
fn copy(scan: &Scan) -> Result<Vec<Vec<FoundSocket>>, ReloadError> {
    let mut go = std::collections::HashMap::new();
    scan.per_address
        .iter()
        .map(|sockets| {
            sockets
                .iter()
                .map(|(socket, holder)| {
                    let copy = discovery::copy_socket(holder.pid, holder.fd, socket.inode)
                        .map_err(|source| ReloadError::DiscoveryError {
                            source: Box::new(source),
                        })?;
                    Ok(FoundSocket {
                        socket: socket.clone(),
                        holder: *holder,
                        process: discovery::process_name(holder.pid).unwrap_or_else(|| "?".into()),
                        go: *go
                            .entry(holder.pid)
                            .or_insert_with(|| discovery::is_go_program(holder.pid)),
                        copy,
                    })
                })
                .collect()
        })
        .collect()
}
