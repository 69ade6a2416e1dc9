//! The session registry and admission control.
//!
//! Every live [`Session`] holds a count token, so `blufio_active_sessions` and `/health`'s
//! `active_sessions` equal the number of live sessions by construction: deletes, evictions,
//! dropped WebSockets and panicking handlers all release the token when the last reference
//! goes. New sessions pass [`Sessions::open`], which refuses them above the memory limit or at
//! `max_sessions` without touching the sessions already open.

mod registry;
mod session;

pub use self::{
    registry::{Rejected, SessionCounters, SessionGuard, Sessions},
    session::{
        Limits, Session, SessionInfo, SessionKind, SessionOptions, SessionRecord, is_session_id,
    },
};
pub use crate::agent::{Role, Turn};
