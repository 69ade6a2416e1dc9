//! The session registry and admission control.
//!
//! Every live [`Session`] holds a count token, so `blufio_active_sessions` and `/health`'s
//! `active_sessions` equal the number of live sessions by construction: deletes, evictions,
//! dropped WebSockets and panicking handlers all release the token when the last reference
//! goes. New sessions pass [`Sessions::open`], which refuses them above the memory limit or at
//! `max_sessions` without touching the sessions already open.

use std::fmt;

mod registry;
mod session;

pub use self::{
    registry::{SessionCounters, SessionGuard, Sessions},
    session::{Limits, Session, SessionInfo, SessionKind, is_session_id},
};
pub use crate::agent::{Role, Turn};

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The heap is above `memory_limit_mb`.
    MemoryLimit,
    /// `max_sessions` sessions are open.
    SessionLimit,
}

impl Rejected {
    /// Returns the machine-readable error code used in JSON bodies.
    pub fn code(self) -> &'static str {
        match self {
            Rejected::MemoryLimit => "memory_limit",
            Rejected::SessionLimit => "session_limit",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejected::MemoryLimit => {
                f.write_str("new sessions are refused while memory is above the limit")
            }
            Rejected::SessionLimit => f.write_str("the maximum number of sessions is open"),
        }
    }
}
