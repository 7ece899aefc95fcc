#![allow(clippy::disallowed_methods)] // the CLI: client commands block on the control socket without a runtime
use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use reloader::{
    cli::{Cli, Command},
    control::{self, Request, Response},
    instance, supervisor,
};

/// `reload --wait`'s exit status when the new generation was rolled back
/// (1: it failed to start or crashed).
const ROLLED_BACK: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept until the end: it flushes buffered log lines.
    let _log = reloader::logging::init(cli.log_format);
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("reloader: {}", reloader::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = args.into_config()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(reloader::MAX_BLOCKING_THREADS)
                .build()
                .context("failed to start the async runtime")?;
            let clean = runtime.block_on(instance::run(config))?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Reload(args) => {
            let socket = args.instance.socket()?;
            let request = Request::Reload {
                wait: args.wait,
                canary: args.canary_plan()?,
            };
            let response = control::ask(&socket, &request, args.timeout)?;
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
        Command::Rollback(args) => {
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
        Command::Promote(args) => {
            let socket = args.instance.socket()?;
            match control::ask(&socket, &Request::Promote {}, Duration::from_secs(10))? {
                response @ Response::Promoted { .. } if args.json => {
                    println!("{}", serde_json::to_string_pretty(&response)?);
                    Ok(ExitCode::SUCCESS)
                }
                Response::Promoted {
                    generation,
                    previous,
                } => {
                    println!(
                        "generation {generation} promoted: it gets every new connection; \
                         generation {previous} gets none (it drains, or is held with \
                         --keep-previous: `reloader status`)"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            }
        }
        Command::Status(args) => {
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
        Command::Demo(args) => {
            let clean = reloader::demo::run(&args.options())?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Keeper { socket } => {
            supervisor::keeper::run(&socket)
                .with_context(|| format!("the log keeper on {}", socket.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            gate_fd,
            listen_fds,
            fd_names,
            command,
        } => {
            let error = supervisor::exec_shim(gate_fd, listen_fds, &fd_names, &command);
            bail!("failed to start {:?}: {error}", command[0]);
        }
        Command::Serve { listen } => reloader::demo::server::run(listen),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "reloader", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop(args) => {
            let socket = args.instance.socket()?;
            match control::ask(
                &socket,
                &Request::Stop {},
                args.timeout.min(Duration::from_secs(10)),
            )? {
                Response::Stopping => {}
                other => return unexpected(other),
            }
            // The controller removes its socket as its last step.
            let deadline = std::time::Instant::now() + args.timeout;
            while socket.exists() {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "instance {} is still stopping after {}",
                        args.instance.name,
                        humantime::format_duration(args.timeout)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn unexpected(response: Response) -> Result<ExitCode> {
    match response {
        Response::Error { message } | Response::Busy { message } => bail!("{message}"),
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
}
