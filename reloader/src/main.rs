use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use reloader::{
    cli::{Cli, Command, LogFormat},
    config,
    control::{self, Request, Response},
    controller, supervisor,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!(
                "reloader: {}",
                reloader::steering::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RELOADER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` also bridges the `log` records of aya and aya-log.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = args.into_config()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?;
            let clean = runtime.block_on(controller::run(config))?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Reload(args) => {
            let socket = args.instance.socket()?;
            let timeout = client_timeout(&args.timeout)?;
            let response = control::ask(&socket, &Request::Reload { wait: args.wait }, timeout)?;
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
            let options = args.options()?;
            let clean = reloader::demo::run(&options)?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Exec {
            listen_fds,
            fd_names,
            command,
        } => {
            let error = supervisor::exec_with_listen_fds(listen_fds, &fd_names, &command);
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
            let timeout = client_timeout(&args.timeout)?;
            match control::ask(&socket, &Request::Stop {}, Duration::from_secs(10))? {
                Response::Stopping => {}
                other => return unexpected(other),
            }
            // The controller removes its socket as its last step.
            let deadline = std::time::Instant::now() + timeout;
            while socket.exists() {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "instance {} is still stopping after {}",
                        args.instance.name,
                        args.timeout
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A client's `--timeout`.
fn client_timeout(value: &str) -> Result<Duration> {
    Ok(config::parse_duration(
        "--timeout",
        value,
        Duration::from_millis(100),
        Duration::from_secs(86_400),
    )?)
}

fn unexpected(response: Response) -> Result<ExitCode> {
    match response {
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
}
