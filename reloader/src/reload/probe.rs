//! Readiness probes (`--ready-probe`) through the candidate's own listener:
//! the probe socket's source port is registered in the program's probe
//! table, so its SYN (or, for `dns://`, its datagram) reaches generation N+1
//! even though everything else still goes to N.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

use crate::{config::Probe, error::ReloadError, generation::human_duration, state::Client};

/// How often a failing probe is retried.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one probe attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes generation `number` until it passes, it exits, or `deadline`.
pub async fn wait_for_probe(
    client: &Client,
    number: u64,
    probe: &Probe,
    deadline: Instant,
) -> Result<(), ReloadError> {
    let mut snapshots = client.subscribe();
    loop {
        snapshots.borrow_and_update().check_alive(number)?;
        let last = match probe_once(client, number, probe).await {
            Ok(()) => return Ok(()),
            Err(ProbeError::Steering(error)) => return Err(error),
            Err(ProbeError::Failed(text)) => text,
        };
        if Instant::now() >= deadline {
            return Err(ReloadError::ProbeFailed {
                timeout: client.config().ready.timeout,
                last,
            });
        }
        let _ = tokio::time::timeout(PROBE_INTERVAL, snapshots.changed()).await;
    }
}

/// One probe attempt of generation `number`, for health checks.
pub async fn check(client: &Client, number: u64, probe: &Probe) -> Result<(), String> {
    match probe_once(client, number, probe).await {
        Ok(()) => Ok(()),
        Err(ProbeError::Steering(error)) => Err(crate::error_chain(&error)),
        Err(ProbeError::Failed(text)) => Err(text),
    }
}

enum ProbeError {
    /// The probe could not be routed: no point in retrying.
    Steering(ReloadError),
    /// The server did not answer as expected (yet).
    Failed(String),
}

/// One probe attempt.
async fn probe_once(client: &Client, number: u64, probe: &Probe) -> Result<(), ProbeError> {
    let addr = probe.addr();
    let failed = |text: String| ProbeError::Failed(text);
    let any: std::net::SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Bound first: its source port is what the program routes by.
    let socket = match probe {
        Probe::Dns { .. } => ProbeSocket::Udp(
            tokio::net::UdpSocket::bind(any)
                .await
                .map_err(|e| failed(format!("probe socket: {e}")))?,
        ),
        Probe::Tcp { .. } | Probe::Http { .. } => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| failed(format!("probe socket: {e}")))?;
            socket
                .bind(any)
                .map_err(|e| failed(format!("probe bind: {e}")))?;
            ProbeSocket::Tcp(socket)
        }
    };
    let port = socket.port().map_err(|e| failed(e.to_string()))?;
    let listener = probe.listener();
    client
        .add_probe(number, listener, port)
        .await
        .map_err(ProbeError::Steering)?;
    let result = tokio::time::timeout(PROBE_TIMEOUT, exchange(socket, probe))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                human_duration(PROBE_TIMEOUT)
            ))
        });
    client.remove_probe(listener, port).await;
    result.map_err(failed)
}

/// A probe's socket, bound, not yet connected.
enum ProbeSocket {
    Tcp(TcpSocket),
    Udp(tokio::net::UdpSocket),
}

impl ProbeSocket {
    fn port(&self) -> std::io::Result<u16> {
        Ok(match self {
            Self::Tcp(s) => s.local_addr()?.port(),
            Self::Udp(s) => s.local_addr()?.port(),
        })
    }
}

async fn exchange(socket: ProbeSocket, probe: &Probe) -> Result<(), String> {
    let addr = probe.addr();
    let socket = match socket {
        ProbeSocket::Udp(socket) => {
            let Probe::Dns { name, .. } = probe else {
                unreachable!("UDP sockets are made for DNS probes")
            };
            // The query id comes from the clock: nothing to guess here, a
            // stale reply to an earlier attempt just fails this one.
            let id = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
                & 0xffff) as u16;
            socket
                .send_to(&crate::dns::query(id, name, crate::dns::TYPE_A), addr)
                .await
                .map_err(|e| format!("send to {addr}: {e}"))?;
            let mut buf = [0u8; 1500];
            let (n, _) = socket
                .recv_from(&mut buf)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            return crate::dns::check_answer(id, &buf[..n]);
        }
        ProbeSocket::Tcp(socket) => socket,
    };
    let mut stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    match probe {
        Probe::Tcp { .. } | Probe::Dns { .. } => Ok(()),
        Probe::Http { host, path, .. } => {
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: reloader-probe\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            // Enough of the response to read its status line.
            while !head.contains(&b'\n') && head.len() < 4096 {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading the response: {e}"))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            // Partial is fine: only the status line matters.
            let _ = response.parse(&head);
            match response.code {
                Some(code) if (200..300).contains(&code) => Ok(()),
                Some(code) => Err(format!("GET {path} answered {code}")),
                None => Err(format!(
                    "GET {path}: not an HTTP response: {:?}",
                    String::from_utf8_lossy(&head[..head.len().min(64)])
                )),
            }
        }
    }
}
