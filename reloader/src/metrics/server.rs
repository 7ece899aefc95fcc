//! `GET /metrics` over plain HTTP (`reloader run --metrics ADDR`): each
//! scrape reads the same status snapshot `reloader status` shows. Requests
//! are parsed with httparse, bounded in size and time; accept errors back
//! off.

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use super::Recorder;
use crate::status::StatusReport;

/// Largest request head read.
const MAX_HEAD: usize = 4096;

/// Where a scrape gets its numbers.
pub trait Source: Clone + Send + Sync + 'static {
    /// The instance's status now (`None` once it has stopped).
    fn status(&self) -> impl Future<Output = Option<StatusReport>> + Send;
    /// The event metrics.
    fn recorder(&self) -> &Recorder;
}

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve<S: Source>(source: S, listener: TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on /metrics");
    }
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(error) => {
                backoff.wait(&error, "metrics").await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(&source, stream).await {
                debug!(%peer, %error, "metrics request");
            }
        });
    }
}

async fn answer<S: Source>(source: &S, mut stream: TcpStream) -> std::io::Result<()> {
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
        Some((method, path)) if method == "GET" && (path == "/metrics" || path == "/") => {
            match source.status().await {
                Some(status) => {
                    let body = source.recorder().encode(&status);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; \
                         version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: \
                         close\r\n\r\n{body}",
                        body.len()
                    )
                }
                None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: \
                         close\r\n\r\n"
                    .into(),
            }
        }
        Some(_) => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
        }
        None => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    stream.write_all(response.as_bytes()).await
}
