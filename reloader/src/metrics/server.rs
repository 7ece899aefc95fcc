//! The controller's HTTP endpoints over plain HTTP: `GET /metrics`
//! (`reloader run --metrics ADDR`), where each scrape reads the same
//! status snapshot `reloader status` shows, and the probes `/healthz` and
//! `/readyz` (on the `--health ADDR` and on the metrics address). Requests
//! are parsed with httparse, bounded in size and time; accept errors back
//! off.
//!
//! The probes never block on the instance: `/readyz` reads the owner's
//! published snapshot; `/healthz` asks the owner for its status and says
//! whether it answered within [`ANSWER_WITHIN`] (a kubelet gives a probe
//! 1 s by default).

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use super::Recorder;
use crate::status::{Readiness, StatusReport};

/// Largest request head read.
const MAX_HEAD: usize = 4096;
/// How long `/healthz` waits for the owner's answer.
const ANSWER_WITHIN: Duration = Duration::from_millis(500);

/// Where a scrape or a probe gets its answer.
pub trait Source: Clone + Send + Sync + 'static {
    /// The instance's status now (`None` once it has stopped).
    fn status(&self) -> impl Future<Output = Option<StatusReport>> + Send;
    /// Whether the instance's owner answers within `within`.
    fn answers(&self, within: Duration) -> impl Future<Output = bool> + Send;
    /// Whether the instance serves every managed address now (from its
    /// last snapshot: never waits).
    fn readiness(&self) -> Readiness;
    /// The event metrics.
    fn recorder(&self) -> &Recorder;
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `--metrics`: `/metrics` (also at `/`) and the probes.
    MetricsAndProbes,
    /// `--health`: `/healthz` and `/readyz` only, so the metrics can stay
    /// on a private address while the kubelet reaches the probes.
    Probes,
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve<S: Source>(source: S, listener: TcpListener, endpoints: Endpoints) {
    if let Ok(addr) = listener.local_addr() {
        match endpoints {
            Endpoints::MetricsAndProbes => {
                info!(%addr, "serving metrics on /metrics, probes on /healthz and /readyz")
            }
            Endpoints::Probes => info!(%addr, "serving probes on /healthz and /readyz"),
        }
    }
    let what = match endpoints {
        Endpoints::MetricsAndProbes => "metrics",
        Endpoints::Probes => "probes",
    };
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(error) => {
                backoff.wait(&error, what).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(&source, stream, endpoints).await {
                debug!(%peer, %error, "{what} request");
            }
        });
    }
}

async fn answer<S: Source>(
    source: &S,
    mut stream: TcpStream,
    endpoints: Endpoints,
) -> std::io::Result<()> {
    let mut head = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let path = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut head[len..]).await?;
            if n == 0 {
                return Ok(None);
            }
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&head[..len]) {
                Ok(httparse::Status::Complete(_)) => {
                    return Ok(Some((
                        request.method.unwrap_or_default().to_owned(),
                        request.path.unwrap_or_default().to_owned(),
                    )));
                }
                Ok(httparse::Status::Partial) if len < head.len() => {}
                _ => return Ok(None),
            }
        }
    })
    .await
    .unwrap_or(Ok::<_, std::io::Error>(None))?;
    let response = match path {
        Some((method, path)) if method == "GET" => {
            // A query string (`/readyz?verbose`) changes nothing.
            let path = path.split('?').next().unwrap_or_default();
            route(source, path, endpoints).await
        }
        Some(_) => plain(405, "Method Not Allowed", "only GET is served\n"),
        None => plain(400, "Bad Request", ""),
    };
    stream.write_all(response.as_bytes()).await
}

/// The response to `GET path`.
async fn route<S: Source>(source: &S, path: &str, endpoints: Endpoints) -> String {
    match (path, endpoints) {
        ("/metrics" | "/", Endpoints::MetricsAndProbes) => match source.status().await {
            Some(status) => {
                let body = source.recorder().encode(&status);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; \
                     version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: \
                     close\r\n\r\n{body}",
                    body.len()
                )
            }
            None => plain(503, "Service Unavailable", ""),
        },
        ("/healthz", _) => {
            if source.answers(ANSWER_WITHIN).await {
                plain(200, "OK", "ok: the controller answers\n")
            } else {
                plain(
                    503,
                    "Service Unavailable",
                    &format!(
                        "the controller's state owner did not answer within {}\n",
                        crate::generation::human_duration(ANSWER_WITHIN)
                    ),
                )
            }
        }
        ("/readyz", _) => {
            let readiness = source.readiness();
            if readiness.is_ready() {
                plain(200, "OK", &format!("{readiness}\n"))
            } else {
                plain(503, "Service Unavailable", &format!("{readiness}\n"))
            }
        }
        _ => plain(404, "Not Found", ""),
    }
}

/// A plain-text response that closes the connection.
fn plain(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
