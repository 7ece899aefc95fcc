//! reloader: zero-drop reloads for servers that listen with `SO_REUSEPORT`.
//!
//! See the README for how the pieces fit together.

pub mod steering;
