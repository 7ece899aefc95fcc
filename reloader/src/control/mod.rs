//! Control of a running instance over its Unix socket: the protocol
//! ([`protocol`]), the controller's server ([`server`]) and the CLI's
//! client ([`client`]), and finding the instances of a host ([`list`]).
//! The server sees the instance only through the [`Controller`] trait,
//! which the instance implements.

pub mod client;
pub mod list;
pub mod protocol;
pub mod server;

use std::future::Future;

pub use client::{ClientError, ask};
pub use protocol::{MAX_REQUEST, Request, Response};

use crate::status::StatusReport;

/// What the control server can ask of the instance.
pub trait Controller: Clone + Send + Sync + 'static {
    /// Requests a reload (as a canary with `canary`); with `wait`, answers
    /// when it completed.
    fn reload(
        &self,
        wait: bool,
        canary: Option<crate::config::CanaryPlan>,
    ) -> impl Future<Output = Response> + Send;
    /// Requests a rollback; with `wait`, answers once the generation rolled
    /// back from has exited.
    fn rollback(&self, wait: bool) -> impl Future<Output = Response> + Send;
    /// Promotes the canary; with `wait`, answers once the generation
    /// beside it has exited (at once when it is held).
    fn promote(&self, wait: bool) -> impl Future<Output = Response> + Send;
    /// Requests a stop.
    fn stop(&self) -> Response;
    /// Requests a hand-over to the next controller.
    fn handover(&self) -> impl Future<Output = Response> + Send;
    /// The instance's status (`None` once its owner has stopped).
    fn status(&self) -> impl Future<Output = Option<StatusReport>> + Send;
}
