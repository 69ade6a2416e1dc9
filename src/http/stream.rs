//! Streamed replies: `POST /v1/messages` with `"stream": true` (server-sent events) and the
//! `/ws` delta frames share [`ReplyStream`].
//!
//! No task is spawned: the stream owns the gateway's exchange future and polls it whenever
//! the response body (or the WebSocket loop) asks for more. When the client goes away,
//! trillium drops the body, which drops the exchange and with it the upstream request.
//!
//! Event shapes (SSE `event:` name, then the `data:` JSON):
//!
//! | event | data |
//! |---|---|
//! | `delta` | `{"delta": "text"}`, one per upstream text delta, in order |
//! | `done` | the non-streamed reply: `{"session_id", "content", "model", "usage"}` |
//! | `error` | `{"error": code, "message": text}` after the stream started |
//!
//! While the upstream is silent, a comment line (`: keep-alive`) goes out every
//! [`HEARTBEAT`]: proxies keep the connection, and a client that left is noticed (only a
//! write reveals it) so the upstream call is cancelled within seconds.
//!
//! An error before the first delta (no agent, budget spent, upstream refused) is answered
//! as a plain JSON error with its status instead, as without streaming.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use async_io::Timer;
use futures_lite::{AsyncRead, Stream};
use serde_json::{Value, json};
use trillium::{Body, Conn, KnownHeaderName, Status, Swansong};

use crate::{
    agent::DeltaSender,
    context::Context,
    gateway::{self, IncomingMessage, MessageError, MessageReply},
    metrics::Channel,
    sessions::{Session, SessionGuard},
};

/// Deltas buffered between the upstream and a slow client, at most; the upstream read
/// waits beyond that (back-pressure, so a slow client cannot make the daemon buffer a reply).
const DELTA_BUFFER: usize = 32;

/// How often a silent stream writes something, so a departed client is noticed.
pub(crate) const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a session message's stream ends with.
pub(crate) type MessageResult = Result<MessageReply, MessageError>;

type Exchange<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One thing a streamed reply says; `T` is what the exchange ends with.
#[derive(Debug)]
pub(crate) enum StreamEvent<T = MessageResult> {
    /// A piece of text.
    Delta(String),
    /// The end: the whole reply, or why it failed.
    Finished(T),
    /// Nothing happened for [`HEARTBEAT`]; write something the client ignores.
    Heartbeat,
    /// The daemon is shutting down: the exchange was dropped (its partial output charged)
    /// and this is the stream's last event.
    ShuttingDown,
}

/// A streamed exchange: drives the gateway and yields its deltas and final result.
pub(crate) struct ReplyStream<T = MessageResult> {
    exchange: Option<Exchange<T>>,
    deltas: Pin<Box<async_channel::Receiver<String>>>,
    result: Option<T>,
    heartbeat: Timer,
    /// Fires when the daemon starts shutting down; `None` once it has.
    closing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl ReplyStream {
    /// Starts (lazily: nothing happens until polled) a streamed exchange; `model` is the
    /// message's own alias.
    pub(crate) fn new(
        ctx: Arc<Context>,
        session: Arc<Session>,
        content: String,
        model: Option<String>,
        channel: Channel,
    ) -> ReplyStream {
        ReplyStream::start(ctx, session, None, content, model, channel)
    }

    /// Like [`ReplyStream::new`] for the first message of a session opened for it: the
    /// session stays open only if the reply completes (only the final event names it).
    pub(crate) fn with_new_session(
        ctx: Arc<Context>,
        opened: SessionGuard,
        content: String,
        model: Option<String>,
        channel: Channel,
    ) -> ReplyStream {
        let session = Arc::clone(opened.session());
        ReplyStream::start(ctx, session, Some(opened), content, model, channel)
    }

    fn start(
        ctx: Arc<Context>,
        session: Arc<Session>,
        opened: Option<SessionGuard>,
        content: String,
        model: Option<String>,
        channel: Channel,
    ) -> ReplyStream {
        let closing = ctx.closing.clone();
        ReplyStream::of(&closing, move |sender| async move {
            let model = model.as_deref();
            let result =
                gateway::exchange_stream(&ctx, &session, content, model, channel, &sender).await;
            // A failed (or, by dropping, abandoned) first exchange closes its session.
            if let (Ok(_), Some(opened)) = (&result, opened) {
                opened.keep();
            }
            result
        })
    }
}

impl<T: Send + 'static> ReplyStream<T> {
    /// Starts (lazily) the exchange `exchange` makes of the delta sender it is given; it
    /// ends with a `ShuttingDown` event when `closing` fires first.
    pub(crate) fn of<F, Fut>(closing: &Swansong, exchange: F) -> ReplyStream<T>
    where
        F: FnOnce(DeltaSender) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (sender, deltas) = async_channel::bounded(DELTA_BUFFER);
        let closing = Box::pin(closing.shutting_down());
        ReplyStream {
            exchange: Some(Box::pin(exchange(DeltaSender::new(sender)))),
            deltas: Box::pin(deltas),
            result: None,
            heartbeat: Timer::interval(HEARTBEAT),
            closing: Some(closing),
        }
    }

    pub(crate) fn poll_event(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<StreamEvent<T>>> {
        // A reply can outlast any grace period: at shutdown the stream ends at once with a
        // word the client can act on (retry elsewhere), instead of being cut mid-body when
        // the grace period is over.
        if let Some(closing) = &mut self.closing
            && closing.as_mut().poll(cx).is_ready()
        {
            self.closing = None;
            // A reply already complete is still delivered.
            if self.exchange.is_some() {
                // Dropping the exchange cancels the upstream call and charges what it produced.
                self.exchange = None;
                return Poll::Ready(Some(StreamEvent::ShuttingDown));
            }
        }
        if self.closing.is_none() && self.exchange.is_none() && self.result.is_none() {
            return Poll::Ready(None);
        }
        if let Some(exchange) = &mut self.exchange
            && let Poll::Ready(result) = exchange.as_mut().poll(cx)
        {
            self.result = Some(result);
            self.exchange = None;
        }
        match self.deltas.as_mut().poll_next(cx) {
            Poll::Ready(Some(text)) => {
                self.heartbeat.set_interval(HEARTBEAT);
                Poll::Ready(Some(StreamEvent::Delta(text)))
            }
            // The sender lives inside the exchange, so a closed channel means it finished.
            Poll::Ready(None) => Poll::Ready(self.result.take().map(StreamEvent::Finished)),
            Poll::Pending => match Pin::new(&mut self.heartbeat).poll_next(cx) {
                Poll::Ready(_) => Poll::Ready(Some(StreamEvent::Heartbeat)),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// Returns the next event; `None` after the final one.
    pub(crate) async fn next(&mut self) -> Option<StreamEvent<T>> {
        futures_lite::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

/// The session a `POST /v1/messages` talks in.
#[derive(Debug)]
pub(crate) enum MessageSession {
    /// One the client named.
    Existing(Arc<Session>),
    /// One opened for this message, closed again unless the reply completes.
    Opened(SessionGuard),
}

/// Answers a streamed `POST /v1/messages`: waits for the first event, then either answers
/// a JSON error (nothing was streamed yet) or starts the event stream.
pub(crate) async fn respond(
    ctx: &Arc<Context>,
    conn: Conn,
    session: MessageSession,
    message: IncomingMessage,
    on_error: impl FnOnce(Conn, &MessageError) -> Conn,
) -> Conn {
    let ctx_for_stream = Arc::clone(ctx);
    let IncomingMessage { content, model, .. } = message;
    let mut stream = match session {
        MessageSession::Existing(session) => {
            ReplyStream::new(ctx_for_stream, session, content, model, Channel::Http)
        }
        MessageSession::Opened(opened) => {
            ReplyStream::with_new_session(ctx_for_stream, opened, content, model, Channel::Http)
        }
    };
    // Until the first event nothing is committed, so an early failure (no agent, budget
    // spent, upstream refused at once) keeps its status. A silent upstream commits the
    // stream at the first heartbeat: the client gets the headers and a keep-alive within
    // [`HEARTBEAT`], and a later failure arrives as an `error` event.
    let first = match stream.next().await {
        Some(StreamEvent::Finished(Err(error))) => return on_error(conn, &error),
        Some(StreamEvent::ShuttingDown) => return shutting_down(conn),
        Some(event) => event,
        None => return conn.with_status(Status::InternalServerError).halt(),
    };
    let first = sse_frame(&first);
    event_stream(conn, SseBody::new(stream, first, sse_frame))
}

/// Answers with `body` as a `text/event-stream`.
pub(crate) fn event_stream<T: Send + Unpin + 'static>(conn: Conn, body: SseBody<T>) -> Conn {
    conn.with_status(Status::Ok)
        .with_response_header(KnownHeaderName::ContentType, "text/event-stream")
        .with_response_header(KnownHeaderName::CacheControl, "no-store")
        // Reverse proxies (nginx) would otherwise hold deltas back.
        .with_response_header("x-accel-buffering", "no")
        .with_body(Body::new_streaming(body, None))
        .halt()
}

/// Answers a stream that had not started when shutdown began (not counted as an error:
/// neither the client nor the upstream did anything wrong).
fn shutting_down(conn: Conn) -> Conn {
    crate::http::response::json(
        conn.with_response_header(KnownHeaderName::Connection, "close"),
        Status::ServiceUnavailable,
        &json!({ "error": SHUTTING_DOWN, "message": SHUTTING_DOWN_MESSAGE }),
    )
}

/// The error code of a stream ended by shutdown.
const SHUTTING_DOWN: &str = "shutting_down";
const SHUTTING_DOWN_MESSAGE: &str =
    "the server is shutting down; the reply was cut short (send the message again)";

/// Returns the JSON a `/ws` client receives for an event (see the module docs of `ws.rs`).
pub(crate) fn ws_frame(event: &StreamEvent, session_id: &str) -> Value {
    match event {
        StreamEvent::Delta(text) => {
            json!({ "type": "delta", "session_id": session_id, "delta": text })
        }
        StreamEvent::Finished(Ok(reply)) => {
            let mut frame = reply.to_json();
            if let Value::Object(map) = &mut frame {
                map.insert("type".into(), json!("done"));
            }
            frame
        }
        StreamEvent::Finished(Err(error)) => {
            json!({ "type": "error", "error": error.code(), "message": error.to_string() })
        }
        StreamEvent::Heartbeat => json!({ "type": "heartbeat" }),
        StreamEvent::ShuttingDown => {
            json!({ "type": "error", "error": SHUTTING_DOWN, "message": SHUTTING_DOWN_MESSAGE })
        }
    }
}

fn sse_frame(event: &StreamEvent) -> Vec<u8> {
    let (name, data) = match event {
        StreamEvent::Heartbeat => return b": keep-alive\n\n".to_vec(),
        StreamEvent::Delta(text) => ("delta", json!({ "delta": text })),
        StreamEvent::Finished(Ok(reply)) => ("done", reply.to_json()),
        StreamEvent::Finished(Err(error)) => (
            "error",
            json!({ "error": error.code(), "message": error.to_string() }),
        ),
        StreamEvent::ShuttingDown => (
            "error",
            json!({ "error": SHUTTING_DOWN, "message": SHUTTING_DOWN_MESSAGE }),
        ),
    };
    // JSON never contains a raw newline, so one `data:` line carries it.
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

/// The response body of a streamed reply: each event framed by `frame` (which returns
/// nothing after the stream's last words, to end it).
pub(crate) struct SseBody<T = MessageResult> {
    stream: ReplyStream<T>,
    frame: Frame<T>,
    buffer: Vec<u8>,
    offset: usize,
    ended: bool,
}

type Frame<T> = Box<dyn FnMut(&StreamEvent<T>) -> Vec<u8> + Send>;

impl<T: Send + 'static> SseBody<T> {
    /// A body that starts with `first` (bytes already framed), then frames each event.
    pub(crate) fn new(
        stream: ReplyStream<T>,
        first: Vec<u8>,
        frame: impl FnMut(&StreamEvent<T>) -> Vec<u8> + Send + 'static,
    ) -> SseBody<T> {
        SseBody {
            stream,
            frame: Box::new(frame),
            buffer: first,
            offset: 0,
            ended: false,
        }
    }
}

impl<T: Send + Unpin + 'static> AsyncRead for SseBody<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let pending = this.buffer.get(this.offset..).unwrap_or_default();
            if !pending.is_empty() {
                let count = pending.len().min(out.len());
                if let (Some(target), Some(source)) = (out.get_mut(..count), pending.get(..count)) {
                    target.copy_from_slice(source);
                }
                this.offset += count;
                return Poll::Ready(Ok(count));
            }
            if this.ended {
                return Poll::Ready(Ok(0));
            }
            match this.stream.poll_event(cx) {
                Poll::Ready(Some(event)) => {
                    this.buffer = (this.frame)(&event);
                    this.offset = 0;
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
