//! The benchmark's keep-alive load client (see `reloader_tests::keepalive`):
//! N persistent HTTP/1.1 connections sending requests back to back, until
//! SIGTERM/SIGINT or `--max-duration-s`. Writes every request's event to
//! `--out` and a one-line summary to stderr.
//!
//! `cargo xtask bench --keepalive` runs it; by hand:
//! `kaload --addr 127.0.0.1:8080 --connections 64 --retry --out events.bin`

use std::{io::BufWriter, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use reloader_tests::keepalive::{self, Config, Flags, Outcome};

#[derive(Parser, Debug)]
#[command(about = "Keep-alive HTTP/1.1 load for reloader's benchmark")]
struct Args {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Persistent connections, each sending requests back to back.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Per-request timeout, milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Retry, once and on a new connection, a request that failed on a
    /// reused connection before any byte of its response.
    #[arg(long)]
    retry: bool,
    /// Milliseconds each connection waits between a response and its next
    /// request (0: back to back).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Stop by itself after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    max_duration_s: f64,
    /// Event file to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config {
        addr: args.addr,
        connections: args.connections,
        timeout: Duration::from_millis(args.timeout_ms),
        retry: args.retry,
        pause: Duration::from_millis(args.pause_ms),
        max_duration: Duration::from_secs_f64(args.max_duration_s),
    };
    // One thread: on a small machine the server under test needs the rest.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let events = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        Ok::<_, anyhow::Error>(keepalive::run(config, stop).await)
    })?;
    let file = std::fs::File::create(&args.out)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", args.out.display()))?;
    keepalive::write_events(BufWriter::new(file), &events)?;
    let first = events.iter().filter(|e| !e.flags.has(Flags::RETRY));
    let by_kind: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| o.is_failure())
        .map(|&o| {
            let n = first.clone().filter(|e| e.outcome == o).count();
            format!("{} {n}", o.name())
        })
        .collect();
    let retries = events.iter().filter(|e| e.flags.has(Flags::RETRY));
    let server_closed = events
        .iter()
        .filter(|e| e.flags.has(Flags::SERVER_CLOSED))
        .count();
    eprintln!(
        "kaload: {} requests, {} failed ({}); {} retried, {} of them failed; \
         {server_closed} responses said Connection: close",
        first.clone().count(),
        first.filter(|e| e.outcome.is_failure()).count(),
        by_kind.join(", "),
        retries.clone().count(),
        retries.filter(|e| e.outcome.is_failure()).count(),
    );
    Ok(())
}
