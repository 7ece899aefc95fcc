//! A server that binds and listens on `--count` TCP sockets at `--bind`
//! (default: `--listen`; all on one address: they need `SO_REUSEPORT`,
//! set by itself with `--reuseport`, else by `reloader run
//! --inject-reuseport`), writes how long its socket, bind and listen calls
//! took (nanoseconds) to `--out`, listens on `--listen` too when that is
//! another address, then waits for its drain signal (SIGTERM's default
//! action). Started by `cargo xtask bench --inject`: the start-time cost
//! of injection.

use std::{net::SocketAddr, time::Instant};

use clap::Parser;
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    bind: Option<SocketAddr>,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Set SO_REUSEPORT itself.
    #[arg(long)]
    reuseport: bool,
    /// Where to write the elapsed nanoseconds (`{generation}` is replaced
    /// by reloader).
    #[arg(long)]
    out: std::path::PathBuf,
}

fn main() {
    let args = Args::parse();
    let open = |addr: SocketAddr| {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        if args.reuseport {
            socket.set_reuse_port(true).expect("SO_REUSEPORT");
        }
        socket.bind(&addr.into()).expect("bind");
        socket.listen(128).expect("listen");
        socket
    };
    let bind = args.bind.unwrap_or(args.listen);
    let t0 = Instant::now();
    let mut sockets: Vec<Socket> = (0..args.count).map(|_| open(bind)).collect();
    let elapsed = t0.elapsed().as_nanos();
    if bind != args.listen {
        sockets.push(open(args.listen));
    }
    std::fs::write(&args.out, elapsed.to_string()).expect("write --out");
    loop {
        // Holds the sockets until the drain signal ends the process.
        std::thread::park();
        let _ = &sockets;
    }
}
