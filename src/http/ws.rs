//! `GET /ws`: a WebSocket that is one session for its lifetime.
//!
//! Authentication (header, or the `bearer.<token>` subprotocol for browsers) and admission
//! control happen before the upgrade, so a refused client gets a plain 401 or 503. Text
//! frames carry the same JSON as `POST /v1/messages`; replies and errors come back as text
//! frames. The server pings more often than the connection deadline so quiet clients stay
//! connected, and closes with 1001 ("going away") on shutdown.
//!
//! A client that breaks the protocol gets the close code RFC 6455 names for it, counted in
//! `blufio_errors_total`: 1002 for bad framing (an unmasked frame, reserved bits, a
//! fragmented control frame), 1007 for a text frame that is not UTF-8, 1009 for a message or
//! frame over `max_message_bytes` (refused from its header, before the payload is read).
//! Text that is UTF-8 but not the expected JSON is an application error: it gets an error
//! frame and the connection stays open.
//!
//! A frame with `"stream": true` is answered with `{"type": "delta", "session_id", "delta"}`
//! frames, then `{"type": "done", "session_id", "content", "usage"}` (or `{"type": "error",
//! "error", "message"}`); see `stream.rs`. A send that fails mid-stream cancels the upstream
//! call.

use std::{sync::Arc, time::Duration};

use async_io::Timer;
use futures_lite::{FutureExt, StreamExt};
use serde_json::{Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_websockets::{
    Message, WebSocket, WebSocketConfig, WebSocketConn, WebSocketHandler,
    tungstenite::{
        self,
        error::ProtocolError,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use crate::{
    context::Context,
    gateway::{self, IncomingMessage},
    http::{
        response, sessions,
        stream::{ReplyStream, StreamEvent, ws_frame},
    },
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
                    match on_text(ctx, guard.session(), text.as_str(), &mut conn).await {
                        TextOutcome::Frame(reply) => conn.send_string(reply.to_string()).await,
                        TextOutcome::Streamed(outcome) => outcome,
                    }
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
                    if let Some((code, kind, reason)) = close_for(&error) {
                        ctx.metrics.count_error(kind);
                        if let Some(ip) = conn.peer_ip() {
                            ctx.client_faults.malformed(ip, kind);
                        }
                        let frame = CloseFrame {
                            code,
                            reason: reason.into(),
                        };
                        let _ = conn.send(Message::Close(Some(frame))).await;
                    }
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

/// What a text frame led to: one reply frame to send, or a stream already sent.
enum TextOutcome {
    Frame(Value),
    Streamed(Result<(), trillium_websockets::Error>),
}

async fn on_text(
    ctx: &Arc<Context>,
    session: &Arc<Session>,
    text: &str,
    conn: &mut WebSocketConn,
) -> TextOutcome {
    match parse_frame(ctx, session, text) {
        Ok(message) if message.stream => {
            let frames = stream_frames(ctx, session, message.content, conn);
            // Shutdown drops the stream (cancelling the upstream call); the loop then closes.
            TextOutcome::Streamed(ctx.closing.interrupt(frames).await.unwrap_or(Ok(())))
        }
        Ok(message) => TextOutcome::Frame(
            match gateway::exchange(ctx, session, message.content, Channel::WebSocket).await {
                Ok(reply) => reply.to_json(),
                Err(error) => error_frame(error.code(), &error.to_string()),
            },
        ),
        Err(frame) => TextOutcome::Frame(frame),
    }
}

/// Sends a streamed reply as delta frames and a final frame.
async fn stream_frames(
    ctx: &Arc<Context>,
    session: &Arc<Session>,
    content: String,
    conn: &mut WebSocketConn,
) -> Result<(), trillium_websockets::Error> {
    let mut stream = ReplyStream::new(
        Arc::clone(ctx),
        Arc::clone(session),
        content,
        Channel::WebSocket,
    );
    while let Some(event) = stream.next().await {
        if let StreamEvent::Heartbeat = event {
            // A ping reveals a departed client without a frame the client must parse.
            conn.send(Message::Ping(Vec::new().into())).await?;
            continue;
        }
        conn.send_string(ws_frame(&event, session.id()).to_string())
            .await?;
    }
    Ok(())
}

/// Parses and checks a text frame; `Err` is the error frame to send back.
fn parse_frame(
    ctx: &Context,
    session: &Arc<Session>,
    text: &str,
) -> Result<IncomingMessage, Value> {
    let message: IncomingMessage = match gateway::parse_message(text) {
        Ok(message) => message,
        Err(error) => {
            ctx.metrics.count_error(ErrorKind::BadRequest);
            return Err(error_frame(
                "invalid_json",
                &format!("the frame is not the expected JSON: {error}"),
            ));
        }
    };
    if message
        .session_id
        .as_deref()
        .is_some_and(|id| id != session.id())
    {
        ctx.metrics.count_error(ErrorKind::BadRequest);
        return Err(error_frame(
            "session_mismatch",
            "a WebSocket is bound to its own session",
        ));
    }
    if message.content.trim().is_empty() {
        ctx.metrics.count_error(ErrorKind::BadRequest);
        return Err(error_frame("bad_request", "content must not be empty"));
    }
    Ok(message)
}

/// Returns the close code, error kind and reason for a read error the client caused; `None`
/// when the peer is gone (nothing can be sent) or the fault is not the client's.
fn close_for(error: &tungstenite::Error) -> Option<(CloseCode, ErrorKind, &'static str)> {
    match error {
        tungstenite::Error::Capacity(_) => Some((
            CloseCode::Size,
            ErrorKind::PayloadTooLarge,
            "message larger than [gateway] max_message_bytes",
        )),
        tungstenite::Error::Utf8(_) => Some((
            CloseCode::Invalid,
            ErrorKind::WebSocketProtocol,
            "text frame is not UTF-8",
        )),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        tungstenite::Error::Protocol(_) => Some((
            CloseCode::Protocol,
            ErrorKind::WebSocketProtocol,
            "protocol error",
        )),
        _ => None,
    }
}

fn error_frame(code: &str, message: &str) -> Value {
    json!({ "error": code, "message": message })
}
