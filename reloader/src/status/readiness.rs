//! [`Readiness`]: whether an instance serves every managed address now,
//! what `/readyz` answers (the owner's snapshot decides it).

use crate::listen::ListenerSpec;

/// Whether the instance serves every managed address now: what `/readyz`
/// answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The active generation listens on every managed address.
    Ready { generation: u64 },
    /// No generation is active: the first one is starting, or a crashed
    /// one is being replaced.
    NoneActive,
    /// The active generation holds no listener on `addr` (a replacement
    /// starts if it does not listen again within the bridge's hold).
    NotListening { generation: u64, addr: ListenerSpec },
    /// The instance is stopping: every generation drains.
    Stopping,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ready { generation } => {
                write!(
                    f,
                    "ready: generation {generation} is active on every listener"
                )
            }
            Self::NoneActive => f.write_str("not ready: no generation is active yet"),
            Self::NotListening { generation, addr } => write!(
                f,
                "not ready: the active generation {generation} does not listen on {addr}"
            ),
            Self::Stopping => f.write_str("not ready: the instance is stopping"),
        }
    }
}
