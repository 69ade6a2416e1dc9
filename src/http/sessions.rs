//! `/v1/sessions`: create, list, get and delete sessions.
//!
//! Creation goes through admission control: above `memory_limit_mb` or at `max_sessions`
//! it answers 503 with `Retry-After`, and the sessions already open are not touched.

use std::sync::Arc;

use serde_json::{Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_router::RouterConnExt;

use crate::{
    context::Context,
    http::response,
    metrics::ErrorKind,
    sessions::{Rejected, SessionInfo, SessionKind, is_session_id},
};

/// What a `/v1/sessions` route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAction {
    /// `POST /v1/sessions`.
    Create,
    /// `GET /v1/sessions`.
    List,
    /// `GET /v1/sessions/:id`.
    Get,
    /// `DELETE /v1/sessions/:id`.
    Delete,
}

/// Serves the `/v1/sessions` routes.
#[derive(Debug, Clone)]
pub struct SessionsHandler {
    ctx: Arc<Context>,
    action: SessionAction,
}

impl SessionsHandler {
    /// Creates the handler for one route.
    pub fn new(ctx: Arc<Context>, action: SessionAction) -> SessionsHandler {
        SessionsHandler { ctx, action }
    }
}

impl Handler for SessionsHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let ctx = &self.ctx;
        match self.action {
            SessionAction::Create => match ctx.open_session(SessionKind::Http) {
                Ok(guard) => {
                    let info = guard.keep().info();
                    response::json(
                        conn,
                        Status::Created,
                        &json!({ "id": info.id, "created_at": info.created_at }),
                    )
                }
                Err(rejected) => rejection(ctx, conn, rejected),
            },
            SessionAction::List => {
                let sessions: Vec<Value> = ctx.sessions.list().iter().map(session_json).collect();
                response::json(conn, Status::Ok, &json!({ "sessions": sessions }))
            }
            SessionAction::Get => {
                let session = conn
                    .param("id")
                    .filter(|id| is_session_id(id))
                    .and_then(|id| ctx.sessions.get(id));
                match session {
                    Some(session) => {
                        response::json(conn, Status::Ok, &session_json(&session.info()))
                    }
                    None => not_found(ctx, conn),
                }
            }
            SessionAction::Delete => {
                let closed = conn
                    .param("id")
                    .filter(|id| is_session_id(id))
                    .is_some_and(|id| ctx.sessions.close(id));
                if closed {
                    conn.with_status(Status::NoContent).halt()
                } else {
                    not_found(ctx, conn)
                }
            }
        }
    }
}

/// Answers a refused session with 503, `Retry-After` and the reason.
pub(crate) fn rejection(ctx: &Context, conn: Conn, rejected: Rejected) -> Conn {
    // Memory is re-sampled every monitor interval; a slot may free up any time.
    let retry_after = match rejected {
        Rejected::MemoryLimit => ctx.config.daemon.monitor_interval_secs,
        Rejected::SessionLimit => 5,
    };
    response::error(
        ctx,
        conn.with_response_header(KnownHeaderName::RetryAfter, retry_after.to_string()),
        Status::ServiceUnavailable,
        ErrorKind::AdmissionRejected,
        rejected.code(),
        rejected,
    )
}

pub(crate) fn not_found(ctx: &Context, conn: Conn) -> Conn {
    response::error(
        ctx,
        conn,
        Status::NotFound,
        ErrorKind::NotFound,
        "session_not_found",
        "no session with that id",
    )
}

fn session_json(info: &SessionInfo) -> Value {
    json!({
        "id": info.id,
        "created_at": info.created_at,
        "last_active_at": info.last_active_at,
        "message_count": info.message_count,
        "history_messages": info.history_messages,
        "history_bytes": info.history_bytes,
        "kind": match info.kind {
            SessionKind::Http => "http",
            SessionKind::WebSocket => "websocket",
        },
    })
}
