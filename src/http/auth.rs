//! Bearer-token authentication for `/v1/*` and `/ws`.
//!
//! The token is compared in constant time. There is no open mode: with no token configured
//! every protected route answers 503 with an explanation. Browsers cannot set headers on a
//! WebSocket, so `/ws` also accepts the subprotocol `bearer.<token>`; a query-string token is
//! never accepted because it ends up in access logs.
//!
//! Failed checks are counted per client (`crate::client_fault`): a client that fails too
//! often is answered `429` with `Retry-After` and `Connection: close` for a while, before its
//! token is looked at.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use trillium::{Conn, Handler, KnownHeaderName, Status};

use crate::{
    client_fault::Blocked, context::Context, http::response, metrics::ErrorKind,
    openai_api::ApiError,
};

/// The WebSocket subprotocol prefix that carries a bearer token.
pub const SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Halts with 401 unless the request carries the configured bearer token.
#[derive(Debug, Clone)]
pub struct BearerAuthHandler {
    ctx: Arc<Context>,
    allow_subprotocol: bool,
    openai_errors: bool,
}

impl BearerAuthHandler {
    /// Accepts only `Authorization: Bearer <token>`.
    pub fn new(ctx: Arc<Context>) -> BearerAuthHandler {
        BearerAuthHandler {
            ctx,
            allow_subprotocol: false,
            openai_errors: false,
        }
    }

    /// Answers refusals in OpenAI's error shape (for `/v1/chat/completions` and
    /// `/v1/models`, whose clients are OpenAI SDKs).
    pub fn with_openai_errors(mut self) -> BearerAuthHandler {
        self.openai_errors = true;
        self
    }

    fn refuse(&self, conn: Conn, refusal: Refusal) -> Conn {
        if !self.openai_errors {
            return response::error(
                &self.ctx,
                conn,
                refusal.status,
                refusal.kind,
                refusal.code,
                refusal.message,
            );
        }
        let error = match refusal.status {
            Status::Unauthorized => ApiError::invalid_api_key(),
            Status::TooManyRequests => ApiError::rate_limited(refusal.message),
            status => ApiError {
                status: status as u16,
                message: refusal.message,
                kind: "server_error",
                param: None,
                code: Some(refusal.code),
            },
        };
        response::api_error(&self.ctx, conn, &error, Some(refusal.kind))
    }

    /// Also accepts the `Sec-WebSocket-Protocol: bearer.<token>` form (for `/ws`).
    pub fn with_subprotocol(mut self) -> BearerAuthHandler {
        self.allow_subprotocol = true;
        self
    }
}

impl Handler for BearerAuthHandler {
    async fn run(&self, conn: Conn) -> Conn {
        // The live configuration: a reload (SIGHUP) can rotate the token.
        let live = self.ctx.live();
        let Some(expected) = &live.token else {
            return self.refuse(
                conn,
                Refusal {
                    status: Status::ServiceUnavailable,
                    kind: ErrorKind::Unauthorized,
                    code: "auth_not_configured",
                    message: "no gateway token is configured; set [gateway] token_file or \
                              BLUFIO_GATEWAY_TOKEN"
                        .to_owned(),
                },
            );
        };
        let peer = conn.peer_ip();
        if let Some(blocked) = peer.and_then(|ip| self.ctx.client_faults.check(ip)) {
            return self.too_many_failures(conn, blocked);
        }
        let presented = bearer_token(&conn).or_else(|| {
            self.allow_subprotocol
                .then(|| subprotocol_token(&conn))
                .flatten()
        });
        if presented.is_some_and(|token| tokens_match(token, expected.expose())) {
            return conn;
        }
        // Only a token presented and refused is a guess. A request with no credentials learns
        // nothing (a scanner, a client not yet configured), and counting it would let any
        // anonymous neighbour behind the same address lock a real user out for free.
        if let Some(blocked) = presented.and(peer).and_then(|ip| {
            self.ctx
                .client_faults
                .auth_failed(ip, live.auth_failure_limit)
        }) {
            return self.too_many_failures(conn, blocked);
        }
        self.refuse(
            conn.with_response_header(KnownHeaderName::WwwAuthenticate, "Bearer realm=\"blufio\""),
            Refusal {
                status: Status::Unauthorized,
                kind: ErrorKind::Unauthorized,
                code: "unauthorized",
                message: "a valid bearer token is required".to_owned(),
            },
        )
    }
}

impl BearerAuthHandler {
    /// Answers a client blocked for failed authentications: 429, `Retry-After`, and the
    /// connection closed, so each further guess costs a new connection.
    fn too_many_failures(&self, conn: Conn, blocked: Blocked) -> Conn {
        self.refuse(
            conn.with_response_header(
                KnownHeaderName::RetryAfter,
                blocked.retry_after_secs.to_string(),
            )
            .with_response_header(KnownHeaderName::Connection, "close"),
            Refusal {
                status: Status::TooManyRequests,
                kind: ErrorKind::AuthThrottled,
                code: "too_many_auth_failures",
                message: format!(
                    "too many failed authentications from this address; retry in {} s",
                    blocked.retry_after_secs
                ),
            },
        )
    }
}

/// Why a request is refused before its handler runs.
struct Refusal {
    status: Status,
    kind: ErrorKind,
    code: &'static str,
    message: String,
}

/// Returns the token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(conn: &Conn) -> Option<&str> {
    let value = conn
        .request_headers()
        .get_str(KnownHeaderName::Authorization)?
        .trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Returns the token of a `bearer.<token>` entry in `Sec-WebSocket-Protocol`.
fn subprotocol_token(conn: &Conn) -> Option<&str> {
    conn.request_headers()
        .get_str(KnownHeaderName::SecWebsocketProtocol)?
        .split(',')
        .map(str::trim)
        .find_map(|protocol| protocol.strip_prefix(SUBPROTOCOL_PREFIX))
        .filter(|token| !token.is_empty())
}

/// Compares in time independent of where the strings differ.
fn tokens_match(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::tokens_match;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("s3cret", "s3cret"));
        assert!(!tokens_match("s3cret", "s3cre"));
        assert!(!tokens_match("S3cret", "s3cret"));
        assert!(!tokens_match("", "s3cret"));
    }
}
