//! `POST /v1/messages`: one message to the agent, in an existing session or a new one, by the
//! model the message names, else the session's, else the default one.

use std::sync::Arc;

use trillium::{Conn, Handler, KnownHeaderName, Status};

use crate::{
    agent::AgentError,
    context::Context,
    gateway::{self, IncomingMessage, MessageError},
    http::{
        body, response, sessions,
        stream::{self, MessageSession},
    },
    metrics::Channel,
    sessions::{Session, SessionKind, is_session_id},
};

/// Serves `POST /v1/messages`.
#[derive(Debug, Clone)]
pub struct MessagesHandler {
    ctx: Arc<Context>,
}

impl MessagesHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> MessagesHandler {
        MessagesHandler { ctx }
    }
}

impl Handler for MessagesHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let ctx = &self.ctx;
        let (conn, message) = match body::read_json::<IncomingMessage>(ctx, conn).await {
            Ok(parsed) => parsed,
            Err(conn) => return conn,
        };
        if message.content.trim().is_empty() {
            return response::bad_request(ctx, conn, "bad_request", "content must not be empty");
        }
        let existing = match &message.session_id {
            Some(id) => match Some(id.as_str())
                .filter(|id| is_session_id(id))
                .and_then(|id| ctx.sessions.get(id))
            {
                Some(session) => Some(session),
                None => return sessions::not_found(ctx, conn),
            },
            None => None,
        };
        // An unknown model is refused before a session is opened for it or an upstream
        // called.
        let model = message
            .model
            .as_deref()
            .or_else(|| existing.as_deref().and_then(Session::model));
        if let Err(error) = gateway::check_model(ctx, model) {
            ctx.metrics.count_error(error.kind());
            return message_error(conn, &error);
        }
        // The session is held for the whole exchange. A new one stays open only when the
        // reply names it: after a failure the client never learns its id, so it would
        // linger as an orphan counting against `max_sessions`.
        let session = match existing {
            Some(session) => MessageSession::Existing(session),
            None => match ctx.open_session(SessionKind::Http) {
                Ok(guard) => MessageSession::Opened(guard),
                Err(rejected) => return sessions::rejection(ctx, conn, rejected),
            },
        };
        // Both exchanges are boxed: a future is as large as its largest state, and every
        // request waiting for its body (a slow or hostile client) holds this one. Boxed, the
        // exchange's state is allocated only once the body has arrived.
        if message.stream {
            return Box::pin(stream::respond(ctx, conn, session, message, message_error)).await;
        }
        let (session, opened) = match session {
            MessageSession::Existing(session) => (session, None),
            MessageSession::Opened(guard) => (Arc::clone(guard.session()), Some(guard)),
        };
        let IncomingMessage { content, model, .. } = message;
        let exchange = gateway::exchange(ctx, &session, content, model.as_deref(), Channel::Http);
        match Box::pin(exchange).await {
            Ok(reply) => {
                if let Some(opened) = opened {
                    opened.keep();
                }
                response::json(conn, Status::Ok, &reply.to_json())
            }
            // Dropping `opened` closes the session the failed message opened.
            Err(error) => message_error(conn, &error),
        }
    }
}

/// Answers a failed message with its status and `{"error", "message"}` (not counted here:
/// the caller or the exchange counts it).
fn message_error(mut conn: Conn, error: &MessageError) -> Conn {
    let status = match error {
        MessageError::NoAgent | MessageError::Storage => Status::ServiceUnavailable,
        MessageError::BudgetExhausted { retry_after } => {
            conn.insert_response_header(
                KnownHeaderName::RetryAfter,
                retry_after.as_secs().max(1).to_string(),
            );
            Status::TooManyRequests
        }
        MessageError::Agent(
            AgentError::Upstream(_) | AgentError::Rejected { .. } | AgentError::Malformed(_),
        ) => Status::BadGateway,
        MessageError::Agent(AgentError::Timeout) => Status::GatewayTimeout,
        MessageError::Agent(AgentError::UnknownModel(_)) => Status::NotFound,
        MessageError::Agent(AgentError::RateLimited { retry_after }) => {
            if let Some(retry_after) = retry_after {
                conn.insert_response_header(
                    KnownHeaderName::RetryAfter,
                    retry_after.as_secs().max(1).to_string(),
                );
            }
            Status::TooManyRequests
        }
    };
    // `exchange` already counted the error; answer without counting twice.
    response::json(
        conn,
        status,
        &serde_json::json!({ "error": error.code(), "message": error.to_string() }),
    )
}
