//! Control of a running instance over its Unix socket: the protocol
//! ([`protocol`]), the controller's server ([`server`]) and the CLI's
//! client ([`client`]). The server sees the instance only through the
//! [`Controller`] trait, which the instance implements.

pub mod client;
pub mod protocol;
pub mod server;

use std::future::Future;

pub use client::{ClientError, ask};
pub use protocol::{MAX_REQUEST, Request, Response};

use crate::status::StatusReport;

/// What the control server can ask of the instance.
pub trait Controller: Clone + Send + Sync + 'static {
    /// Requests a reload; with `wait`, answers when it completed.
    fn reload(&self, wait: bool) -> impl Future<Output = Response> + Send;
    /// Requests a stop.
    fn stop(&self) -> Response;
    /// The instance's status.
    fn status(&self) -> impl Future<Output = StatusReport> + Send;
}
