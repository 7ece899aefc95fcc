//! Starting an instance, before its run loop takes over: on a blocking
//! thread, its runtime directory and lock, what a previous controller left
//! (adopt or clean up, [`super::recovery`]), its addresses, its control
//! socket and the steering program; then, with the runtime, the state with
//! whatever was adopted and the tasks that watch adopted generations.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use tracing::warn;

use super::recovery;
use crate::{
    config::RunConfig,
    generation::{Generations, State},
    rundir::{InstanceLock, RuntimeDir},
    state::{RegisteredSocket, saved::SavedHold},
    steering::{Limits, Steering},
    supervisor::{Process, keeper},
};

/// What the blocking part of the start found and made.
pub struct Prepared {
    pub lock: InstanceLock,
    /// The claims of the managed addresses (see [`super::claims`]).
    pub claims: super::claims::Claims,
    pub paths: recovery::Paths,
    /// A previous controller's generations are adopted.
    pub adopting: bool,
    pub recovered: Option<String>,
    pub limits: Limits,
    pub steering: Steering,
    /// The steering maps are pinned (else a successor cannot adopt).
    pub pinned: bool,
    /// The eBPF log pump (with debug logs on).
    pub log_pump: Option<crate::steering::LogPump>,
    /// Listen events from the controller's cgroup, or why there are none.
    pub listen_events: Result<crate::steering::ListenEvents, String>,
    pub control: std::os::unix::net::UnixListener,
    /// `--metrics`, bound.
    pub metrics: Option<std::net::TcpListener>,
    /// `--health`, bound.
    pub health: Option<std::net::TcpListener>,
    pub generations: Generations,
    pub processes: HashMap<u64, Process>,
    /// Adopted generations whose leader is gone (their cgroup lives on).
    pub leaderless: Vec<u64>,
    /// The instance's cgroups, or why there are none.
    pub cgroups: Result<crate::cgroup::Instance, crate::cgroup::Unavailable>,
    /// The hold the previous controller recorded.
    pub hold: Option<SavedHold>,
    /// The sockets of adopted generations that serve or may serve again.
    pub adopted_sockets: Vec<(u64, Vec<RegisteredSocket>)>,
    /// Per managed address, a copy of one of the adopted active
    /// generation's sockets: the bridges' templates.
    pub bridge_templates: Vec<Option<std::os::fd::OwnedFd>>,
    /// The log keeper (`None`: it could not be started, said why).
    pub keeper: Option<keeper::Link>,
    /// What the keeper held for the previous controller: the stderr of
    /// its generations, and the lines it kept meanwhile.
    pub taken: Vec<keeper::Taken>,
    /// `--inject-reuseport`: the bind programs, checked on this kernel.
    pub injector: Option<crate::steering::Injector>,
}

/// What a start made that a failed start removes again.
#[derive(Default)]
struct Made {
    /// The control socket it bound.
    control: Option<PathBuf>,
    /// Pins it made (not a previous controller's, which adopted
    /// generations still need).
    pins: Option<PathBuf>,
    /// The runtime directory the paths above go through, kept open until
    /// they are removed.
    dir: Option<Arc<RuntimeDir>>,
}

impl Made {
    #[allow(clippy::disallowed_methods)] // on the blocking thread of `prepare`
    fn undo(self) {
        if let Some(socket) = self.control {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(pins) = self.pins {
            Steering::unpin(&pins);
        }
        drop(self.dir);
    }
}

/// The blocking part of the start (it reads `/proc`, the state file,
/// sock_diag; it loads the steering program). A start that fails removes
/// what it made: nothing is left behind but what a previous controller
/// left for its generations.
#[allow(clippy::disallowed_methods)] // runs on a blocking thread (see `super::run`)
pub fn prepare(config: &Arc<RunConfig>) -> anyhow::Result<Prepared> {
    let dir = config
        .control_socket
        .parent()
        .context("the control socket path has no directory")?;
    let paths = recovery::Paths::of(config, RuntimeDir::open(dir)?);
    let lock = InstanceLock::take(&paths.lock, &config.name)?;
    // With the lock held no other controller of this instance runs: a
    // control socket left here is a dead one's, and goes now (not only if
    // this start gets as far as binding its own).
    if std::fs::symlink_metadata(&paths.control).is_ok()
        && std::os::unix::net::UnixStream::connect(&paths.control).is_err()
    {
        let _ = std::fs::remove_file(&paths.control);
    }
    let claims = super::claims::claim(&config.listen)?;
    let mut made = Made {
        dir: Some(paths.dir.clone()),
        ..Made::default()
    };
    let prepared = prepare_locked(config, paths, lock, claims, &mut made);
    if prepared.is_err() {
        made.undo();
    }
    prepared
}

/// `--max-draining-memory` reads each generation's `memory.current`: the
/// memory controller must be available below the controller's cgroup
/// (`base`), or the budget could never be kept. Refused before anything is
/// made.
#[allow(clippy::disallowed_methods)] // on the blocking thread of `prepare`
fn memory_controller(
    base: Result<(&Path, &Path), &crate::cgroup::Unavailable>,
) -> anyhow::Result<()> {
    let (base, mount) = base.map_err(|why| {
        anyhow::anyhow!(
            "--max-draining-memory needs a cgroup v2 per generation, and there is none: {why}"
        )
    })?;
    let offered = crate::cgroup::offered_to_generations(base, mount);
    if offered.iter().any(|c| c == "memory") {
        return Ok(());
    }
    if base == mount {
        anyhow::bail!(
            "--max-draining-memory needs the memory controller in cgroup v2, and {} offers only \
             [{}]: on a hybrid host it is held by cgroup v1 (boot with \
             systemd.unified_cgroup_hierarchy=1), or run without --max-draining-memory",
            base.display(),
            offered.join(" ")
        );
    }
    anyhow::bail!(
        "--max-draining-memory needs the memory controller for the generations' cgroups, and \
         the controller's cgroup {} enables only [{}] for its children. reloader does not \
         enable controllers there itself: under systemd that cgroup is the unit's, where the \
         next controller is started, and cgroup v2 lets no process into a cgroup that enables \
         controllers (a restart would fail with 219/CGROUP). Per-generation memory under \
         systemd is not supported yet (it needs systemd's DelegateSubgroup=, systemd >= 254); \
         run without --max-draining-memory",
        base.display(),
        offered.join(" ")
    );
}

/// [`prepare`], once the instance lock is held (`lock`, released on error).
fn prepare_locked(
    config: &Arc<RunConfig>,
    paths: recovery::Paths,
    lock: InstanceLock,
    claims: super::claims::Claims,
    made: &mut Made,
) -> anyhow::Result<Prepared> {
    // The controller's own cgroup v2 (where the listen notifier attaches),
    // then the instance's below it (the controller may move into a leaf).
    let base = crate::cgroup::own();
    if config.drain.max_memory.is_some() {
        memory_controller(
            base.as_ref()
                .map(|(dir, mount)| (dir.as_path(), mount.as_path())),
        )?;
    }
    let cgroups = base
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| crate::cgroup::prepare(&config.name, &config.control_socket));
    let previous = recovery::look_back(config, &paths, cgroups.as_ref().ok())?;
    let recovered = recovery::clean_up(&previous, &paths);
    let adopting = previous.adopting();
    if !adopting {
        recovery::check_addresses_free(&config.listen)?;
    }
    let control = bind_control_socket(&paths.control, &config.control_socket, &config.name)?;
    made.control = Some(paths.control.clone());
    let metrics = config
        .metrics
        .map(|addr| bind_http("--metrics", addr))
        .transpose()?;
    let health = config
        .health
        .map(|addr| bind_http("--health", addr))
        .transpose()?;
    let limits = recovery::limits(config, &previous);
    let mut steering = recovery::load_steering(config, &paths, limits, adopting)?;
    if !adopting {
        made.pins = Some(paths.pins.clone());
    }
    let pinned = Steering::pinned_in(&paths.pins);
    let injector = if config.spawn.inject_reuseport {
        Some(injector(config, &mut steering, cgroups.as_ref())?)
    } else {
        None
    };
    let log_pump = steering.log_pump();
    let listen_events = base.map_err(|e| e.to_string()).and_then(|(cgroup, _)| {
        steering
            .listen_events(&cgroup)
            .map_err(|e| crate::error_chain(&e))
    });
    let recovery::Adopted {
        generations,
        processes,
        leaderless,
    } = recovery::generations(&previous, limits, cgroups.as_ref().ok());
    // Cgroups of generations not adopted (stale, or a candidate the state
    // file never named) are emptied and removed.
    if let Ok(cgroups) = &cgroups {
        let keep: std::collections::BTreeSet<u64> = generations.live().map(|g| g.number).collect();
        recovery::sweep_cgroups(cgroups, &keep);
    }
    let hold = previous.saved.as_ref().and_then(|s| s.hold);
    // A held generation can be made active again: its sockets are needed
    // to check it still listens everywhere.
    let adopted_sockets = generations
        .live()
        .filter(|g| match g.state {
            State::Active | State::Canary => true,
            State::Draining => hold.is_some_and(|h| h.held == g.number),
            _ => false,
        })
        .filter_map(|g| Some((g.number, g.pid?)))
        .map(|(number, pid)| {
            let pids = match &cgroups {
                Ok(cgroups) => crate::cgroup::members(&cgroups.generation(number)),
                Err(_) => crate::discovery::process_tree(pid).unwrap_or_default(),
            };
            (number, recovery::adopted_sockets(&pids, &config.listen))
        })
        .collect::<Vec<_>>();
    let active = generations
        .live()
        .find(|g| g.state == State::Active)
        .map(|g| g.number);
    let bridge_templates = adopted_sockets
        .iter()
        .find(|(number, _)| Some(*number) == active)
        .map(|(_, sockets)| recovery::bridge_templates(sockets, config.listen.len()))
        .unwrap_or_default();
    let (keeper, taken) = start_keeper(&paths);
    Ok(Prepared {
        lock,
        claims,
        paths,
        adopting,
        recovered,
        limits,
        steering,
        pinned,
        log_pump,
        listen_events,
        control,
        metrics,
        health,
        generations,
        processes,
        leaderless,
        cgroups,
        hold,
        adopted_sockets,
        bridge_templates,
        keeper,
        taken,
        injector,
    })
}

/// `--inject-reuseport`: loads the bind programs and checks on this kernel,
/// in a scratch cgroup of the instance, that they set `SO_REUSEPORT`;
/// refused by name and reason where they cannot, or where the generations
/// get no cgroup.
fn injector(
    config: &RunConfig,
    steering: &mut Steering,
    cgroups: Result<&crate::cgroup::Instance, &crate::cgroup::Unavailable>,
) -> anyhow::Result<crate::steering::Injector> {
    let cgroups = cgroups.map_err(|why| {
        anyhow::anyhow!(
            "--inject-reuseport attaches cgroup bind programs to each generation's cgroup v2, \
             and there is none: {why}"
        )
    })?;
    let mut injector = steering.injector(&config.listen)?;
    injector.probe(&cgroups.scratch("inject-probe"))?;
    tracing::info!(
        "--inject-reuseport: binds of the generations to {} get SO_REUSEPORT",
        config
            .listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(injector)
}

/// Connects to the instance's log keeper (a previous controller's, if it
/// still runs) or starts one, and takes back what it holds. Without one the
/// instance runs, but servers' stderr does not outlive this controller.
fn start_keeper(paths: &recovery::Paths) -> (Option<keeper::Link>, Vec<keeper::Taken>) {
    let link = std::env::current_exe()
        .and_then(|exe| keeper::Link::connect_or_spawn(&paths.keeper, &exe, paths.dir.raw_fd()));
    match link {
        Ok(link) => match link.take() {
            Ok(taken) => (Some(link), taken),
            Err(error) => {
                warn!(%error, "cannot take back what the log keeper holds");
                (Some(link), Vec::new())
            }
        },
        Err(error) => {
            warn!(
                %error,
                "no log keeper: if this controller dies, a server writing to its stderr gets \
                 EPIPE (many exit then)"
            );
            (None, Vec::new())
        }
    }
}

/// Binds the control socket (its directory was checked, and the instance
/// lock is held): refuses when another controller answers on it, replaces
/// a stale file otherwise (a dead controller's). Mode 0600.
#[allow(clippy::disallowed_methods)] // runs on a blocking thread (see `prepare`)
fn bind_control_socket(
    path: &Path,
    named: &Path,
    name: &str,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::net::{UnixListener, UnixStream};
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "instance {name:?} is already running (its control socket {} answers): stop it \
                 with `reloader stop --name {name}`, or choose another --name",
                named.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove stale socket {}", named.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("failed to bind control socket {}", named.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to chmod {}", named.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A listener for the HTTP endpoints of `flag` (`--metrics`, `--health`).
fn bind_http(flag: &str, addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("{flag} {addr}: cannot listen there: {e}"))
}
