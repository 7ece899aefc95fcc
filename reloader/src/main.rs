#![allow(clippy::disallowed_methods)] // the CLI: client commands block on the control socket without a runtime
use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use reloader::{
    cli::{
        Cli, Command, DemoArgs, FleetCommand, HandoverArgs, Internal, ListArgs, PrometheusArgs,
        PromoteArgs, ReloadArgs, RollbackArgs, RunArgs, StatusArgs, StopArgs,
    },
    control::{self, Request, Response},
    instance, supervisor,
};

/// `reload --wait`'s exit status when the new generation was rolled back
/// (1: it failed to start or crashed).
const ROLLED_BACK: u8 = 3;
/// How long `reload` without `--wait` waits to hear the request was taken.
const NO_WAIT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let result = match Internal::from_env() {
        Some(internal) => {
            let _log = reloader::logging::init(reloader::cli::LogFormat::Text);
            internal_cmd(internal)
        }
        None => {
            let cli = Cli::try_parse_with_tips(std::env::args_os().collect())
                .unwrap_or_else(|error| error.exit());
            // Kept until the end: it flushes buffered log lines.
            let _log = reloader::logging::init(cli.log_format());
            dispatch(cli)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("reloader: {}", reloader::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; `Err` is printed by `main` and exits 1.
fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_cmd(args),
        Command::Reload(args) => reload_cmd(args),
        Command::Rollback(args) => rollback_cmd(args),
        Command::Promote(args) => promote_cmd(args),
        Command::Status(args) => status_cmd(args),
        Command::List(args) => list_cmd(args),
        Command::Fleet(args) => fleet_cmd(args.command),
        Command::Demo(args) => demo_cmd(args),
        Command::Completions { shell } => completions_cmd(shell),
        Command::Man { dir } => man_cmd(dir.as_deref()),
        Command::Stop(args) => stop_cmd(args),
        Command::Handover(args) => handover_cmd(args),
    }
}

/// Runs a subcommand the binary starts itself as.
fn internal_cmd(internal: Internal) -> Result<ExitCode> {
    match internal {
        Internal::Keeper { socket } => keeper_cmd(&socket),
        Internal::Exec {
            gate_fd,
            listen_fds,
            fd_names,
            command,
        } => exec_cmd(gate_fd, listen_fds, &fd_names, &command),
        Internal::Serve { listen } => reloader::demo::server::run(listen),
    }
}

/// `run`: the controller, in the foreground until it is stopped; exits 2
/// when the stop was not clean (a generation outlived its drain timeout),
/// [`instance::HANDED_OVER`] after a hand-over.
fn run_cmd(args: RunArgs) -> Result<ExitCode> {
    let config = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(reloader::MAX_BLOCKING_THREADS)
        .build()
        .context("failed to start the async runtime")?;
    Ok(match runtime.block_on(instance::run(config))? {
        instance::Outcome::Stopped { clean: true } => ExitCode::SUCCESS,
        instance::Outcome::Stopped { clean: false } => ExitCode::from(2),
        instance::Outcome::HandedOver => ExitCode::from(instance::HANDED_OVER),
    })
}

/// `reload`: exits 1 when the new generation failed, [`ROLLED_BACK`] when
/// it was rolled back.
fn reload_cmd(args: ReloadArgs) -> Result<ExitCode> {
    let socket = args.instance.socket()?;
    let request = Request::Reload {
        wait: args.wait,
        canary: args.canary_plan()?,
    };
    // Without --wait the answer is only "accepted": a controller that does
    // not give it within seconds is not reading its socket.
    let timeout = if args.wait {
        args.timeout
    } else {
        args.timeout.min(NO_WAIT_TIMEOUT)
    };
    let response = control::ask(&socket, &request, timeout)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    }
    match response {
        Response::ReloadAccepted => {
            if !args.json {
                println!("reload requested");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::ReloadDone { report } => {
            if !args.json {
                println!("{}", report.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::ReloadFailed { report } => {
            if !args.json {
                eprintln!("{}", report.human());
            }
            Ok(ExitCode::FAILURE)
        }
        Response::ReloadRolledBack { report } => {
            if !args.json {
                eprintln!("{}", report.human());
            }
            Ok(ExitCode::from(ROLLED_BACK))
        }
        other => unexpected(other),
    }
}

/// `rollback`: the held generation, or the one beside the canary, active
/// again.
fn rollback_cmd(args: RollbackArgs) -> Result<ExitCode> {
    let socket = args.instance.socket()?;
    let timeout = if args.wait {
        args.timeout
    } else {
        Duration::from_secs(10)
    };
    match control::ask(&socket, &Request::Rollback { wait: args.wait }, timeout)? {
        Response::RolledBack { report } => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

/// `promote`: every new connection to the canary; with `--wait`, returns
/// once the generation beside it has exited.
fn promote_cmd(args: PromoteArgs) -> Result<ExitCode> {
    let socket = args.instance.socket()?;
    let timeout = if args.wait {
        args.timeout
    } else {
        Duration::from_secs(10)
    };
    match control::ask(&socket, &Request::Promote { wait: args.wait }, timeout)? {
        response @ Response::Promoted { .. } if args.json => {
            println!("{}", serde_json::to_string_pretty(&response)?);
            Ok(ExitCode::SUCCESS)
        }
        Response::Promoted {
            generation,
            previous,
            previous_exited_ms,
            held_ms,
        } => {
            let then = match (previous_exited_ms, held_ms) {
                (Some(ms), _) => format!(
                    "generation {previous} exited {} after the promotion",
                    reloader::generation::human_duration(Duration::from_secs_f64(ms / 1000.0))
                ),
                (None, Some(ms)) => format!(
                    "generation {previous} is held for {} (`reloader rollback` makes it active \
                     again), then drains",
                    reloader::generation::human_duration(Duration::from_secs_f64(ms / 1000.0))
                ),
                (None, None) => format!(
                    "generation {previous} gets none (it drains, or is held with \
                     --keep-previous: `reloader status`)"
                ),
            };
            println!("generation {generation} promoted: it gets every new connection; {then}");
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

/// `status`: the tables, or the report as JSON.
fn status_cmd(args: StatusArgs) -> Result<ExitCode> {
    let socket = args.instance.socket()?;
    match control::ask(&socket, &Request::Status {}, Duration::from_secs(10))? {
        Response::Status { status } => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        other => unexpected(other),
    }
}

/// `list`: every instance that answers, from the default socket
/// directories and `--dir`.
fn list_cmd(args: ListArgs) -> Result<ExitCode> {
    let mut dirs = control::list::default_directories();
    dirs.extend(args.dir);
    let listing = control::list::list(&control::list::sockets(&dirs), args.timeout);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", listing.human());
    }
    Ok(ExitCode::SUCCESS)
}

/// `fleet wait`: 0 when every instance serves the config, 1 at the
/// timeout, 2 when Prometheus could not be asked at the last attempt;
/// `fleet status`: the table.
fn fleet_cmd(command: FleetCommand) -> Result<ExitCode> {
    use reloader::fleet;
    let (prometheus, report) = match command {
        FleetCommand::Wait(args) => {
            let client = prometheus_client(&args.prometheus)?;
            let how = fleet::Wait {
                config: args.config,
                expect: args.expect as usize,
                timeout: args.timeout,
                interval: args.interval,
            };
            let report = fleet::wait(&client, &args.prometheus.selector, &how);
            (args.prometheus, report)
        }
        FleetCommand::Status(args) => {
            let client = prometheus_client(&args.prometheus)?;
            let instances = fleet::survey(&client, &args.prometheus.selector)?;
            let report = fleet::judge(instances, args.config.as_deref(), 1);
            (args.prometheus, report)
        }
    };
    if prometheus.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(match (&report.config_sha256, report.done, &report.error) {
        (None, _, _) | (_, true, _) => ExitCode::SUCCESS,
        (_, false, Some(_)) => ExitCode::from(2),
        (_, false, None) => ExitCode::FAILURE,
    })
}

/// The Prometheus client `args` describe, secrets read from their files
/// or the environment.
fn prometheus_client(args: &PrometheusArgs) -> Result<reloader::fleet::Prometheus> {
    use reloader::fleet::{Auth, Connection, Prometheus, read_secret};
    let auth = match &args.user {
        Some(user) => Auth::Basic {
            user: user.clone(),
            password: read_secret(
                "--password-file",
                args.password_file.as_deref(),
                "RELOADER_PROMETHEUS_PASSWORD",
            )?
            .context("--user needs a password: --password-file or RELOADER_PROMETHEUS_PASSWORD")?,
        },
        None => match read_secret(
            "--bearer-token-file",
            args.bearer_token_file.as_deref(),
            "RELOADER_PROMETHEUS_TOKEN",
        )? {
            Some(token) => Auth::Bearer { token },
            None => Auth::None,
        },
    };
    Ok(Prometheus::new(&Connection {
        url: args.prometheus.clone(),
        auth,
        ca_file: args.ca_file.clone(),
        timeout: args.request_timeout,
    })?)
}

/// `demo`: exits 1 when reloader failed a connection.
fn demo_cmd(args: DemoArgs) -> Result<ExitCode> {
    let clean = reloader::demo::run(&args.options())?;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `__keeper`: the log keeper, until it is told to exit or has nothing
/// left to keep (no controller connected, no pipe open).
fn keeper_cmd(socket: &Path) -> Result<ExitCode> {
    supervisor::keeper::run(socket)
        .with_context(|| format!("the log keeper on {}", socket.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `__exec`, every generation's start: returns only when the exec failed.
fn exec_cmd(
    gate_fd: i32,
    listen_fds: usize,
    fd_names: &str,
    command: &[String],
) -> Result<ExitCode> {
    let error = supervisor::exec_shim(gate_fd, listen_fds, fd_names, command);
    bail!("failed to start {:?}: {error}", command[0]);
}

fn completions_cmd(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut command = reloader::cli::command();
    clap_complete::generate(shell, &mut command, "reloader", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// `man DIR`: every page into DIR; without DIR, reloader(1) on stdout.
fn man_cmd(dir: Option<&Path>) -> Result<ExitCode> {
    match dir {
        Some(dir) => {
            let written = reloader::cli::write_man_pages(dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            for page in written {
                println!("{}", page.display());
            }
        }
        None => clap_mangen::Man::new(reloader::cli::command()).render(&mut std::io::stdout())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `stop`: asks the controller to stop and waits until it removed its
/// socket, at most `--timeout`.
fn stop_cmd(args: StopArgs) -> Result<ExitCode> {
    let socket = args.instance.socket()?;
    // The request carries when this client gives up: a controller that
    // reads it later (it was stopped, or overloaded) does not carry it out,
    // so a stop reported as failed here never happens behind its back.
    let asked = args.timeout.min(Duration::from_secs(10));
    let deadline_unix_ms = (std::time::SystemTime::now() + asked)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Beyond the deadline, time for an answer to a stop carried out at
    // its last moment.
    let answer = control::ask(
        &socket,
        &Request::Stop {
            deadline_unix_ms: Some(deadline_unix_ms),
        },
        asked + Duration::from_secs(2),
    );
    match answer {
        Ok(Response::Stopping) => {}
        Ok(other) => return unexpected(other),
        Err(error @ control::ClientError::TimedOut { .. }) => bail!(
            "{error}; the stop was not carried out (it reached the controller too late or not \
             at all, and a late stop is refused)"
        ),
        Err(error) => return Err(error.into()),
    }
    // The controller removes its socket as its last step.
    let deadline = std::time::Instant::now() + args.timeout;
    while socket.exists() {
        if std::time::Instant::now() > deadline {
            bail!(
                "instance {} is still stopping after {}",
                args.instance.name,
                reloader::generation::human_duration(args.timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// `handover`: checks that this binary can adopt the instance (its state
/// file's format and maps' layout), asks the controller to hand over, and
/// waits until it has exited; with `--wait`, until a successor answers.
fn handover_cmd(args: HandoverArgs) -> Result<ExitCode> {
    use reloader::state::saved;
    let socket = args.instance.socket()?;
    let name = &args.instance.name;
    let state = saved::state_path(&socket);
    match saved::load(&state, &state) {
        Ok(Some(_)) => {}
        Ok(None) => bail!(
            "instance {name} has no state file ({}): is it running (`reloader status`)? Nothing \
             was asked",
            state.display()
        ),
        Err(error) => bail!(
            "not handing over: this binary could not adopt instance {name}: {}. The controller \
             keeps running; to switch binaries anyway, `reloader stop` it (the servers drain) and \
             start this one",
            reloader::error_chain(&error)
        ),
    }
    let started = std::time::Instant::now();
    let old = match control::ask(&socket, &Request::Handover {}, Duration::from_secs(10))? {
        Response::HandingOver { controller_pid } => controller_pid,
        other => return unexpected(other),
    };
    // The controller exits once no reload runs. Then the state file tells
    // a hand-over (kept) from a stop that came meanwhile (removed).
    let deadline = started + args.timeout;
    while process_alive(old) {
        if std::time::Instant::now() > deadline {
            bail!(
                "controller pid {old} of instance {name} has not exited after {} (a reload may \
                 still run: it hands over once that reload has cut over)",
                humantime::format_duration(args.timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !state.exists() {
        bail!(
            "controller pid {old} of instance {name} stopped instead of handing over (a stop \
             arrived meanwhile): its generations were drained"
        );
    }
    println!(
        "controller pid {old} handed instance {name} over: every generation keeps running; the \
         next `reloader run` with the same options adopts them"
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        if let Ok(Response::Status { status }) =
            control::ask(&socket, &Request::Status {}, Duration::from_secs(2))
            && status.pid != old
        {
            println!(
                "controller pid {} runs instance {name} ({:.1}s after the request)",
                status.pid,
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "no new controller answers for instance {name} after {}: start `reloader run` \
                 with the same options (under systemd: `systemctl status reloader@{name}`)",
                humantime::format_duration(args.timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn unexpected(response: Response) -> Result<ExitCode> {
    match response {
        Response::Error { message } | Response::Busy { message } => bail!("{message}"),
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
}
