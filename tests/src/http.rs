//! A plain HTTP `GET` for the controller's own endpoints (`/metrics`,
//! `/healthz`, `/readyz`) and Prometheus's: one HTTP/1.0 request per
//! connection (so no chunked answer and no keep-alive), the whole answer
//! read until the server closes it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// An answer: its status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub code: u16,
    pub body: String,
}

/// `GET path` from `addr` (5 s timeouts); `Err` says why there was no
/// answer (nothing listens yet, say).
pub fn get(addr: &str, path: &str) -> Result<Answer, String> {
    let target = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok(Answer {
        code,
        body: body.to_owned(),
    })
}
