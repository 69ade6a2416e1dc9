//! The label values of the daemon's metrics (error kinds, channels, shed reasons, token
//! types) and the counter handle one error kind is counted through.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use metrics::Counter;

/// The fixed set of `type` labels of `blufio_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A memory reader (heap or RSS) failed during a monitor tick.
    MemoryMonitor,
    /// A request was malformed (bad JSON, missing field).
    BadRequest,
    /// A request had no or a wrong bearer token.
    Unauthorized,
    /// A request named a path or object that does not exist.
    NotFound,
    /// A request used a method the path does not support.
    MethodNotAllowed,
    /// A request body was larger than allowed.
    PayloadTooLarge,
    /// A request was refused by admission control (memory or session limit).
    AdmissionRejected,
    /// The agent's upstream failed.
    AgentUpstream,
    /// The agent timed out.
    AgentTimeout,
    /// The agent refused for budget or rate limits.
    AgentRateLimit,
    /// No agent is configured.
    NoAgent,
    /// Something failed inside blufio.
    Internal,
    /// A WebSocket client broke the protocol (bad framing, a text frame that is not UTF-8);
    /// the connection was closed with 1002 or 1007.
    WebSocketProtocol,
    /// The model provider refused a request (a 4xx other than 429).
    AgentRejected,
    /// The model provider answered something that is not its documented JSON.
    AgentMalformed,
    /// The daily budget is spent.
    BudgetExhausted,
    /// A connection opened with the HTTP/2 preface, which blufio does not serve.
    Http2Refused,
    /// A connection was refused at `max_connections` or `max_connections_per_ip`.
    ConnectionLimit,
    /// Accepting a connection failed (out of file descriptors, usually).
    AcceptFailed,
    /// A request head was not complete within `request_timeout_secs` of its first byte.
    HeadTimeout,
    /// A request body was not complete within `request_timeout_secs` of its head.
    BodyTimeout,
    /// A request head was larger than the parser allows (answered 431).
    HeaderTooLarge,
    /// A connection was closed to relieve memory pressure it caused.
    ConnectionShed,
    /// Today's spend could not be saved to `<state_dir>/spend.json` (retried until it can).
    StateWrite,
    /// A request came from a client blocked after repeated failed authentications (429).
    AuthThrottled,
    /// A request line was longer than the head limit (answered 414).
    UriTooLong,
    /// A connection with an incomplete head (or none yet) was closed at `max_connections` to
    /// make room for a new one.
    ConnectionEvicted,
    /// The session store could not be written (a full disk, a read-only directory): the
    /// message failed with `storage_unavailable`.
    Storage,
}

impl ErrorKind {
    /// Every kind, in rendering order.
    pub const ALL: [ErrorKind; 28] = [
        ErrorKind::MemoryMonitor,
        ErrorKind::BadRequest,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::PayloadTooLarge,
        ErrorKind::AdmissionRejected,
        ErrorKind::AgentUpstream,
        ErrorKind::AgentTimeout,
        ErrorKind::AgentRateLimit,
        ErrorKind::NoAgent,
        ErrorKind::Internal,
        ErrorKind::WebSocketProtocol,
        ErrorKind::AgentRejected,
        ErrorKind::AgentMalformed,
        ErrorKind::BudgetExhausted,
        ErrorKind::Http2Refused,
        ErrorKind::ConnectionLimit,
        ErrorKind::AcceptFailed,
        ErrorKind::HeadTimeout,
        ErrorKind::BodyTimeout,
        ErrorKind::HeaderTooLarge,
        ErrorKind::ConnectionShed,
        ErrorKind::StateWrite,
        ErrorKind::AuthThrottled,
        ErrorKind::UriTooLong,
        ErrorKind::ConnectionEvicted,
        ErrorKind::Storage,
    ];

    /// Returns the label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MemoryMonitor => "memory_monitor",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::AdmissionRejected => "admission_rejected",
            ErrorKind::AgentUpstream => "agent_upstream",
            ErrorKind::AgentTimeout => "agent_timeout",
            ErrorKind::AgentRateLimit => "agent_rate_limit",
            ErrorKind::NoAgent => "no_agent",
            ErrorKind::Internal => "internal",
            ErrorKind::WebSocketProtocol => "websocket_protocol",
            ErrorKind::AgentRejected => "agent_rejected",
            ErrorKind::AgentMalformed => "agent_malformed",
            ErrorKind::BudgetExhausted => "budget_exhausted",
            ErrorKind::Http2Refused => "http2_refused",
            ErrorKind::ConnectionLimit => "connection_limit",
            ErrorKind::AcceptFailed => "accept_failed",
            ErrorKind::HeadTimeout => "head_timeout",
            ErrorKind::BodyTimeout => "body_timeout",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::ConnectionShed => "connection_shed",
            ErrorKind::StateWrite => "state_write",
            ErrorKind::AuthThrottled => "auth_throttled",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::ConnectionEvicted => "connection_evicted",
            ErrorKind::Storage => "storage",
        }
    }
}

/// One kind of `blufio_errors_total`, counted from wherever it is held.
#[derive(Debug, Clone)]
pub struct ErrorCounter {
    pub(super) counter: Counter,
    pub(super) count: Arc<AtomicU64>,
}

impl ErrorCounter {
    /// Returns a handle that counts nowhere (for tests and hosts without metrics).
    pub fn noop() -> ErrorCounter {
        ErrorCounter {
            counter: Counter::noop(),
            count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Counts one error.
    pub fn increment(&self) {
        self.counter.increment(1);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The channel a message arrived on (`blufio_messages_total{channel}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `POST /v1/messages`.
    Http,
    /// A `/ws` WebSocket frame.
    WebSocket,
}

/// Why the memory monitor shed something (`blufio_sessions_shed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// An idle session's history was trimmed under memory pressure.
    HistoryTrimmed,
    /// An idle session was closed under memory pressure.
    PressureEvicted,
    /// A session passed its idle timeout.
    IdleTimeout,
}

/// Token direction (`blufio_tokens_total{type}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Tokens sent to the model.
    Input,
    /// Tokens the model produced.
    Output,
}

impl TokenType {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            TokenType::Input => "input",
            TokenType::Output => "output",
        }
    }
}
