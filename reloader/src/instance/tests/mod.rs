//! The run loop end to end, unprivileged: the [`Owner`] with real `sleep`
//! processes as servers, loopback sockets as their listeners, and the fake
//! steering. Requests arrive as the control server sends them ([`Event`]s
//! with a reply), and exits as `SIGCHLD` does (a small reaper task of the
//! test watches only the fake host's own children and says when one
//! exited).
//!
//! By area: reloads from start to exit (`reloads`), rollback and
//! promotion (`rollout`), status, metrics and the probes while the owner
//! is busy (`probes`), hand-overs (`handover`).

mod handover;
mod harness;
mod probes;
mod reloads;
mod rollout;
