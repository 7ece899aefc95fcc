//! A bounded UDP request load for the privileged tests: each of N threads
//! has its own socket (its own flow), sends `ping-SEQ` and waits up to a
//! second for the reply (`gen=G pid=P` from the test server). A request
//! without a reply is lost. Every request's outcome is kept.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was sent, from the start of the load.
    pub sent: Duration,
    /// The generation that answered, or `None`: lost.
    pub generation: Option<u64>,
    /// Which flow (thread) sent it.
    pub flow: usize,
}

/// A running UDP load.
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
    pub start: Instant,
}

impl UdpLoad {
    /// `flows` senders, each pausing `gap` between requests.
    pub fn start(addr: SocketAddr, flows: usize, gap: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..flows)
            .map(|flow| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
                    socket
                        .set_read_timeout(Some(Duration::from_secs(1)))
                        .expect("timeout");
                    let mut outcomes = Vec::new();
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed)
                        && start.elapsed() < Duration::from_secs(300)
                    {
                        seq += 1;
                        let sent = start.elapsed();
                        let generation = request(&socket, addr, seq);
                        outcomes.push(Outcome {
                            sent,
                            generation,
                            flow,
                        });
                        std::thread::sleep(gap);
                    }
                    outcomes
                })
            })
            .collect();
        Self {
            stop,
            threads,
            start,
        }
    }

    /// Stops and collects every outcome, in sending order.
    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Outcome> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("udp load thread"))
            .collect();
        all.sort_by_key(|o| o.sent);
        all
    }
}

/// One request on `socket`: the answering generation, or `None` (lost).
/// Replies to earlier requests (late ones) are skipped.
pub fn request(socket: &UdpSocket, addr: SocketAddr, seq: u64) -> Option<u64> {
    let payload = format!("ping-{seq}");
    socket.send_to(payload.as_bytes(), addr).ok()?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let n = socket.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        // The test server does not echo the sequence number: the first
        // reply after this send answers this request (one in flight).
        if let Some(g) = reloader::demo::load::Answer::parse(&text).generation {
            return Some(g);
        }
    }
    None
}
