//! `GET /ws`: a WebSocket that is one session for its lifetime.
//!
//! Authentication (header, or the `bearer.<token>` subprotocol for browsers) and admission
//! control happen before the upgrade, so a refused client gets a plain 401 or 503. Text
//! frames carry the same JSON as `POST /v1/messages`; replies and errors come back as text
//! frames. The server pings more often than the connection deadline so quiet clients stay
//! connected, and closes with 1001 ("going away") on shutdown.

use std::{sync::Arc, time::Duration};

use async_io::Timer;
use futures_lite::{FutureExt, StreamExt};
use serde_json::{Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_websockets::{
    Message, WebSocket, WebSocketConfig, WebSocketConn, WebSocketHandler,
    tungstenite::protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::{
    context::Context,
    gateway::{self, IncomingMessage},
    http::{response, sessions},
    metrics::{Channel, ErrorKind},
    sessions::{Session, SessionGuard, SessionKind},
};

/// The subprotocol the server selects; browsers offer it next to `bearer.<token>`.
pub const SUBPROTOCOL: &str = "blufio.v1";

/// Returns the handler chain for `/ws` after authentication: admission, then the upgrade.
pub fn handler(ctx: Arc<Context>) -> impl Handler {
    let limit = usize::try_from(ctx.config.gateway.max_message_bytes).unwrap_or(usize::MAX);
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    (
        AdmissionHandler {
            ctx: Arc::clone(&ctx),
        },
        WebSocket::new(SessionSocket { ctx })
            .with_protocols(&[SUBPROTOCOL])
            .with_protocol_config(config),
    )
}

/// The session a WebSocket holds, carried from admission into the upgrade.
struct WsSession(SessionGuard);

/// Opens the session before the upgrade, so refusal is a 503 the client can read.
#[derive(Debug)]
struct AdmissionHandler {
    ctx: Arc<Context>,
}

impl Handler for AdmissionHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let is_upgrade = conn
            .request_headers()
            .get_str(KnownHeaderName::Upgrade)
            .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
        if !is_upgrade {
            return response::error(
                &self.ctx,
                conn.with_response_header(KnownHeaderName::Upgrade, "websocket"),
                Status::UpgradeRequired,
                ErrorKind::BadRequest,
                "upgrade_required",
                "/ws needs a WebSocket upgrade request",
            );
        }
        match self.ctx.open_session(SessionKind::WebSocket) {
            Ok(guard) => conn.with_state(WsSession(guard)),
            Err(rejected) => sessions::rejection(&self.ctx, conn, rejected),
        }
    }
}

struct SessionSocket {
    ctx: Arc<Context>,
}

enum Event {
    Inbound(Option<Result<Message, trillium_websockets::tungstenite::Error>>),
    Ping,
}

impl WebSocketHandler for SessionSocket {
    type OutboundStream = futures_lite::stream::Pending<Message>;

    async fn connect(
        &self,
        mut conn: WebSocketConn,
    ) -> Option<(WebSocketConn, Self::OutboundStream)> {
        let Some(WsSession(guard)) = conn.take_state::<WsSession>() else {
            log::error!("websocket upgraded without an admitted session");
            self.ctx.metrics.count_error(ErrorKind::Internal);
            return None;
        };
        let ctx = &self.ctx;
        // Held until the close frame is out, so shutdown waits for it before the listeners
        // stop.
        let closing_guard = ctx.closing.guard();
        // Half the connection deadline, so the client's pongs keep reads alive.
        let ping_every = Duration::from_secs(ctx.config.daemon.request_timeout_secs) / 2;
        loop {
            let next = async { Event::Inbound(conn.next().await) }.or(async {
                Timer::after(ping_every).await;
                Event::Ping
            });
            let Some(event) = ctx.closing.interrupt(next).await else {
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                };
                let _ = conn.send(Message::Close(Some(frame))).await;
                break;
            };
            let outcome = match event {
                Event::Ping => conn.send(Message::Ping(Vec::new().into())).await,
                Event::Inbound(Some(Ok(Message::Text(text)))) => {
                    let reply = on_text(ctx, guard.session(), text.as_str()).await;
                    conn.send_string(reply.to_string()).await
                }
                Event::Inbound(Some(Ok(Message::Binary(_)))) => {
                    ctx.metrics.count_error(ErrorKind::BadRequest);
                    let reply = error_frame("bad_request", "send JSON in text frames");
                    conn.send_string(reply.to_string()).await
                }
                Event::Inbound(Some(Ok(Message::Close(_)))) | Event::Inbound(None) => break,
                Event::Inbound(Some(Ok(_))) => Ok(()),
                Event::Inbound(Some(Err(error))) => {
                    log::debug!("websocket error: {error}");
                    break;
                }
            };
            if let Err(error) = outcome {
                log::debug!("websocket send failed: {error}");
                break;
            }
        }
        // Dropping the guard closes the session and releases its slot.
        drop(guard);
        let _ = conn.close().await;
        drop(closing_guard);
        None
    }
}

async fn on_text(ctx: &Context, session: &Arc<Session>, text: &str) -> Value {
    let message: IncomingMessage = match gateway::parse_message(text) {
        Ok(message) => message,
        Err(error) => {
            ctx.metrics.count_error(ErrorKind::BadRequest);
            return error_frame(
                "invalid_json",
                &format!("the frame is not the expected JSON: {error}"),
            );
        }
    };
    if message
        .session_id
        .as_deref()
        .is_some_and(|id| id != session.id())
    {
        ctx.metrics.count_error(ErrorKind::BadRequest);
        return error_frame(
            "session_mismatch",
            "a WebSocket is bound to its own session",
        );
    }
    if message.content.trim().is_empty() {
        ctx.metrics.count_error(ErrorKind::BadRequest);
        return error_frame("bad_request", "content must not be empty");
    }
    match gateway::exchange(ctx, session, message.content, Channel::WebSocket).await {
        Ok(reply) => reply.to_json(),
        Err(error) => error_frame(error.code(), &error.to_string()),
    }
}

fn error_frame(code: &str, message: &str) -> Value {
    json!({ "error": code, "message": message })
}
