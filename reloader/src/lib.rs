//! reloader: zero-drop reloads for servers that listen with `SO_REUSEPORT`.
//!
//! Module map (README "How it works" has the picture):
//! - [`steering`]: the eBPF program and its maps; the only module that
//!   talks to aya.
//! - [`discovery`]: which listening sockets a process tree holds.
//! - [`supervisor`]: spawning, reaping and signalling generations.
//! - [`generation`]: the generation state machine (pure).
//! - [`reload`]: one reload, step by step.
//! - [`controller`]: one instance: state, control socket, stop.
//! - [`control`]: the control protocol; [`status`]: what it reports.
//! - [`config`], [`cli`]: validated command line.

pub mod cli;
pub mod config;
pub mod control;
pub mod controller;
pub mod demo;
pub mod discovery;
pub mod generation;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod state;
pub mod status;
pub mod steering;
pub mod supervisor;
