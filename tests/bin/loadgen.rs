//! The benchmark's load client: new TCP connections, each with one HTTP
//! request that must get a complete response, until SIGTERM/SIGINT or
//! `--max-duration`. Writes every connection's outcome to `--out` (see
//! `reloader_tests::loadgen`) and a one-line summary to stderr.
//!
//! `cargo xtask bench` runs it; by hand:
//! `loadgen --addr 127.0.0.1:8080 --concurrency 8 --max-duration 10s --out events.bin`

use std::{io::BufWriter, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use reloader_tests::loadgen::{self, Config, Kind, Pace};

#[derive(Parser, Debug)]
#[command(about = "New-connection HTTP load for reloader's benchmark")]
struct Args {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Connections open at once, each followed at once by the next.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// New connections per second instead (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: at most this many open at once.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Whole-connection timeout, milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Stop by itself after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    max_duration_s: f64,
    /// Event file to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pace = match (args.concurrency, args.rate) {
        (_, Some(per_second)) => Pace::Rate {
            per_second,
            max_in_flight: args.max_in_flight,
        },
        (concurrency, None) => Pace::Concurrency(concurrency.unwrap_or(8)),
    };
    let config = Config {
        addr: args.addr,
        pace,
        timeout: Duration::from_millis(args.timeout_ms),
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
        Ok::<_, anyhow::Error>(loadgen::run(config, stop).await)
    })?;
    let file = std::fs::File::create(&args.out)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", args.out.display()))?;
    loadgen::write_events(BufWriter::new(file), &events)?;
    let failed = events.iter().filter(|e| e.kind.is_failure()).count();
    let by_kind: Vec<String> = Kind::ALL
        .iter()
        .filter(|&&k| k.is_failure())
        .map(|&k| {
            let n = events.iter().filter(|e| e.kind == k).count();
            format!("{} {n}", k.name())
        })
        .collect();
    eprintln!(
        "loadgen: {} connections, {failed} failed ({})",
        events.len(),
        by_kind.join(", ")
    );
    Ok(())
}
