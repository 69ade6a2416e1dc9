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
//! frame and the connection stays open. A message split into too many frames, or not complete
//! within `request_timeout_secs`, is closed with 1009 or 1008 (see `ws_limit.rs`).
//!
//! Every frame the server sends is a JSON object with a `type`: `{"type": "reply",
//! "session_id", "content", "model", "usage"}` answers a message (`model`, the alias that
//! answered, when the agent names it), `{"type": "error", "error", "message"}` reports a
//! failure (`model_not_found` for a `"model"` the daemon does not route, before any upstream
//! call). A frame with `"stream": true` is answered with `{"type": "delta", "session_id",
//! "delta"}` frames, then `{"type": "done", "session_id", "content", "model", "usage"}` (or
//! an error frame); see `stream.rs`. A send that fails mid-stream cancels the
//! upstream call.
//!
//! An idle socket holds little (about 7.6 KB of heap, its session included): it runs in a task
//! of its own rather than inside its HTTP connection's (see `SocketHandler`), tungstenite's
//! defaults read into 128 KiB allocated up front, here 1 KiB (see [`READ_BUFFER_BYTES`]), and
//! replies go out in frames of at most [`REPLY_FRAME_BYTES`], so the write buffers a socket
//! keeps after a long reply stay small.
//! After a reload that changes the gateway token, sockets authenticated with the old token
//! close with 1008.

use std::{sync::Arc, time::Duration};

use async_io::Timer;
use futures_lite::{FutureExt, StreamExt};
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use trillium::{Conn, Handler, Info, KnownHeaderName, Status, Upgrade};
use trillium_websockets::{
    Message, Role, WebSocket, WebSocketConfig, WebSocketConn, WebSocketHandler,
    tungstenite::{
        self, Bytes,
        error::ProtocolError,
        protocol::{
            CloseFrame,
            frame::{
                Frame,
                coding::{CloseCode, Data, OpCode},
            },
        },
    },
};

use crate::{
    connection::ConnectionGuard,
    context::Context,
    gateway::{self, IncomingMessage},
    http::{
        response, sessions,
        stream::{ReplyStream, StreamEvent, ws_frame},
        ws_limit::{MessageLimit, MessageLimitTransport},
    },
    live::Live,
    metrics::{Channel, ErrorKind},
    sessions::{Session, SessionGuard, SessionKind},
};

/// How long a stream under way at shutdown has to send its `shutting_down` frame.
const SHUTDOWN_FRAME_GRACE: Duration = Duration::from_secs(1);
/// The subprotocol the server selects; browsers offer it next to `bearer.<token>`.
pub const SUBPROTOCOL: &str = "blufio.v1";

/// Bytes each socket read takes into the buffer trillium-websockets allocates per socket for
/// its lifetime (tungstenite's default, 128 KiB, was most of an idle socket's heap). tungstenite
/// pulls 1 KiB at a time from it anyway, and grows its own buffer to a frame's length only
/// while that frame arrives, so a larger read buffer only saves syscalls on large messages.
pub const READ_BUFFER_BYTES: usize = 1024;

/// Largest frame a reply is sent in. The write buffers keep the capacity of the largest frame
/// they have held for the socket's lifetime, so a long reply goes out in fragments this size.
pub const REPLY_FRAME_BYTES: usize = 4096;

/// Returns the handler chain for `/ws` after authentication: admission, then the upgrade.
pub fn handler(ctx: Arc<Context>) -> impl Handler {
    let limit = usize::try_from(ctx.config.gateway.max_message_bytes).unwrap_or(usize::MAX);
    // Output is written out before each new frame is queued (`write_buffer_size` 0), so
    // nothing accumulates behind a slow reader beyond the frame being written.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    (
        AdmissionHandler {
            ctx: Arc::clone(&ctx),
        },
        SocketHandler {
            timeout: Duration::from_secs(ctx.config.daemon.request_timeout_secs),
            config,
            handshake: WebSocket::new(RunsElsewhere).with_protocols(&[SUBPROTOCOL]),
            ctx,
        },
    )
}

/// The session a WebSocket holds and the live settings it authenticated against, carried from
/// admission into the upgrade.
struct WsSession {
    guard: SessionGuard,
    authenticated: Arc<Live>,
}

/// Answers the handshake with trillium-websockets, then runs each upgraded socket in a task of
/// its own, with [`MessageLimitTransport`] slipped under tungstenite so every inbound message
/// is bounded in frames and time.
///
/// trillium-websockets would run the socket inside the upgrade future, which lives in the
/// connection's task (sized for trillium-http's keep-alive loop, about 8.5 KB) and under
/// trillium-router's boxed copy of the whole handler chain's upgrade future (about 14 KB):
/// over 22 KB per idle socket that the socket never uses. The task spawned here holds the
/// socket's loop alone, and the connection's task ends with the upgrade.
struct SocketHandler {
    ctx: Arc<Context>,
    timeout: Duration,
    config: WebSocketConfig,
    handshake: WebSocket<RunsElsewhere>,
}

/// The handler trillium-websockets would run the socket with; never called, because
/// [`SocketHandler::upgrade`] runs the socket itself.
struct RunsElsewhere;

impl WebSocketHandler for RunsElsewhere {
    type OutboundStream = futures_lite::stream::Pending<Message>;

    async fn connect(&self, _conn: WebSocketConn) -> Option<(WebSocketConn, Self::OutboundStream)> {
        None
    }
}

impl Handler for SocketHandler {
    async fn run(&self, conn: Conn) -> Conn {
        self.handshake.run(conn).await
    }

    async fn init(&mut self, info: &mut Info) {
        self.handshake.init(info).await;
    }

    fn has_upgrade(&self, upgrade: &Upgrade) -> bool {
        self.handshake.has_upgrade(upgrade)
    }

    async fn upgrade(&self, mut upgrade: Upgrade) {
        let ctx = &self.ctx;
        // The listener hands over the connection's place in the registry: the socket stays
        // counted, and charged as connection memory, until its task ends.
        let connection = upgrade.state_mut().take::<ConnectionGuard>();
        let session = upgrade.state_mut().take::<WsSession>();
        // The socket never reads its request headers or other state again; the upgrade would
        // keep them (and their allocations) for the socket's lifetime.
        drop(upgrade.take_request_headers());
        drop(upgrade.take_state());
        let Some(session) = session else {
            log::error!("websocket upgraded without an admitted session");
            ctx.metrics.count_error(ErrorKind::Internal);
            return;
        };
        let tracked = connection.as_ref().map(|guard| Arc::clone(guard.tracked()));
        let (buffer, transport) = upgrade.as_mut().buffer_and_transport_mut();
        // A placeholder for the moment the transport is out of its slot.
        let inner = std::mem::replace(
            transport,
            Box::new(trillium_http::Synthetic::from(())) as Box<dyn trillium::Transport>,
        );
        *transport = Box::new(MessageLimitTransport::new(
            inner,
            buffer,
            self.timeout,
            tracked,
        ));
        // Taken before this returns, so shutdown waits for the socket's close frame even if
        // `closing` fires before its task first runs.
        let closing = ctx.closing.guard();
        let conn = WebSocketConn::new(upgrade, Some(self.config), Role::Server).await;
        let ctx = Arc::clone(ctx);
        ctx.runtime.clone().spawn_detached(async move {
            let shed = async {
                match &connection {
                    Some(guard) => guard.shed().await,
                    None => futures_lite::future::pending().await,
                }
                ctx.metrics.count_error(ErrorKind::ConnectionShed);
                log::debug!("closing a websocket: shed under memory pressure");
            };
            serve_socket(&ctx, conn, session).or(shed).await;
            drop(closing);
            drop(connection);
        });
    }
}

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
            // The token was checked against this configuration just before (auth runs first).
            Ok(guard) => conn.with_state(WsSession {
                guard,
                authenticated: self.ctx.live(),
            }),
            Err(rejected) => sessions::rejection(&self.ctx, conn, rejected),
        }
    }
}

enum Event {
    Inbound(Option<Result<Message, trillium_websockets::tungstenite::Error>>),
    Ping,
    Reloaded,
}

/// Returns whether the live settings still accept the token `authenticated` held, in
/// time independent of where the tokens differ.
fn token_still_valid(authenticated: &Live, live: &Live) -> bool {
    match (&authenticated.token, &live.token) {
        (Some(old), Some(new)) => old
            .expose()
            .as_bytes()
            .ct_eq(new.expose().as_bytes())
            .into(),
        _ => false,
    }
}

/// Runs one upgraded socket: its session's messages, pings, the token check after a reload,
/// and the close frame at the end.
async fn serve_socket(ctx: &Arc<Context>, mut conn: WebSocketConn, session: WsSession) {
    let WsSession {
        guard,
        mut authenticated,
    } = session;
    // Half the connection deadline, so the client's pongs keep reads alive.
    let ping_every = Duration::from_secs(ctx.config.daemon.request_timeout_secs) / 2;
    loop {
        // Listen before reading the live token, so a reload in between still wakes us.
        let reloaded = ctx.next_reload();
        let live = ctx.live();
        if !Arc::ptr_eq(&live, &authenticated) {
            if !token_still_valid(&authenticated, &live) {
                log::debug!("closing a websocket: the token it authenticated with changed");
                ctx.metrics.count_error(ErrorKind::Unauthorized);
                let frame = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "the gateway token changed; reconnect with the new one".into(),
                };
                let _ = conn.send(Message::Close(Some(frame))).await;
                break;
            }
            authenticated = live;
        }
        let next = async { Event::Inbound(conn.next().await) }
            .or(async {
                Timer::after(ping_every).await;
                Event::Ping
            })
            .or(async {
                reloaded.await;
                Event::Reloaded
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
            Event::Reloaded => Ok(()),
            Event::Inbound(Some(Ok(Message::Text(text)))) => {
                // Boxed: the exchange's future (the agent call, a stream) exists only while
                // a message is answered, instead of inline in every idle socket's future.
                match Box::pin(on_text(ctx, guard.session(), text.as_str(), &mut conn)).await {
                    TextOutcome::Frame(reply) => send_text(&mut conn, reply.to_string()).await,
                    TextOutcome::Streamed(outcome) => outcome,
                }
            }
            Event::Inbound(Some(Ok(Message::Binary(_)))) => {
                ctx.metrics.count_error(ErrorKind::BadRequest);
                let reply = error_frame("bad_request", "send JSON in text frames");
                send_text(&mut conn, reply.to_string()).await
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
            let frames = stream_frames(ctx, session, message, conn);
            // At shutdown the stream itself ends with a `shutting_down` error frame (see
            // `ReplyStream`); a client that stops reading cannot hold it past a moment more.
            // Dropping the stream cancels the upstream call; the loop then closes with 1001.
            let cut_off = async {
                ctx.closing.interrupt(std::future::pending::<()>()).await;
                Timer::after(SHUTDOWN_FRAME_GRACE).await;
                Ok(())
            };
            TextOutcome::Streamed(frames.or(cut_off).await)
        }
        Ok(message) => TextOutcome::Frame(
            match gateway::exchange(
                ctx,
                session,
                message.content,
                message.model.as_deref(),
                Channel::WebSocket,
            )
            .await
            {
                Ok(reply) => typed("reply", reply.to_json()),
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
    message: IncomingMessage,
    conn: &mut WebSocketConn,
) -> Result<(), trillium_websockets::Error> {
    let mut stream = ReplyStream::new(
        Arc::clone(ctx),
        Arc::clone(session),
        message.content,
        message.model,
        Channel::WebSocket,
    );
    while let Some(event) = stream.next().await {
        if let StreamEvent::Heartbeat = event {
            // A ping reveals a departed client without a frame the client must parse.
            conn.send(Message::Ping(Vec::new().into())).await?;
            continue;
        }
        send_text(conn, ws_frame(&event, session.id()).to_string()).await?;
    }
    Ok(())
}

/// Sends `text` as one message, in frames of at most [`REPLY_FRAME_BYTES`] (split on
/// character boundaries, so each fragment is valid UTF-8 on its own too).
async fn send_text(
    conn: &mut WebSocketConn,
    text: String,
) -> Result<(), trillium_websockets::Error> {
    if text.len() <= REPLY_FRAME_BYTES {
        return conn.send(Message::text(text)).await;
    }
    let bytes = Bytes::from(text.into_bytes());
    let mut start = 0;
    let mut opcode = Data::Text;
    while start < bytes.len() {
        let mut end = (start + REPLY_FRAME_BYTES).min(bytes.len());
        // Back off UTF-8 continuation bytes (10xxxxxx) to the start of a character; a
        // character is at most 4 bytes, far less than a frame.
        while bytes.get(end).is_some_and(|byte| byte & 0xc0 == 0x80) {
            end -= 1;
        }
        let last = end == bytes.len();
        let frame = Frame::message(bytes.slice(start..end), OpCode::Data(opcode), last);
        // Each feed writes out the frame before it (no write buffer), so only one frame is
        // ever queued.
        conn.feed(Message::Frame(frame)).await?;
        opcode = Data::Continue;
        start = end;
    }
    conn.flush().await
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
    let model = message.model.as_deref().or(session.model());
    if let Err(error) = gateway::check_model(ctx, model) {
        ctx.metrics.count_error(error.kind());
        return Err(error_frame(error.code(), &error.to_string()));
    }
    Ok(message)
}

/// Returns the close code, error kind and reason for a read error the client caused; `None`
/// when the peer is gone (nothing can be sent) or the fault is not the client's.
fn close_for(error: &tungstenite::Error) -> Option<(CloseCode, ErrorKind, &'static str)> {
    match error {
        tungstenite::Error::Io(io) => match MessageLimit::of(io)? {
            MessageLimit::TooManyFrames => Some((
                CloseCode::Size,
                ErrorKind::PayloadTooLarge,
                "message split into too many frames",
            )),
            MessageLimit::TooSlow => Some((
                CloseCode::Policy,
                ErrorKind::BodyTimeout,
                "message not complete within the request timeout",
            )),
        },
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
    json!({ "type": "error", "error": code, "message": message })
}

/// Returns `fields` (an object) with `"type": kind` in front, so every frame names its kind.
fn typed(kind: &str, fields: Value) -> Value {
    let mut frame = Map::new();
    frame.insert("type".into(), json!(kind));
    if let Value::Object(fields) = fields {
        frame.extend(fields);
    }
    Value::Object(frame)
}
