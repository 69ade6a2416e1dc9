//! JSON responses and errors: every answer carries a JSON body (or the metrics text), and
//! every error is counted in `blufio_errors_total` under a fixed type label. Malformed
//! requests are also counted per client, for the once-per-episode log line
//! ([`crate::client_fault`]).

use std::fmt;

use serde_json::{Value, json};
use trillium::{Conn, KnownHeaderName, Status};

use crate::{context::Context, metrics::ErrorKind, openai_api::ApiError};

/// Sends `body` as JSON with `status` and halts the handler chain.
pub(crate) fn json(conn: Conn, status: Status, body: &Value) -> Conn {
    conn.with_status(status)
        .with_response_header(KnownHeaderName::ContentType, "application/json")
        .with_response_header(KnownHeaderName::CacheControl, "no-store")
        .with_body(body.to_string())
        .halt()
}

/// Sends `{"error": code, "message": message}` with `status`, counts it under `kind` and
/// halts.
pub(crate) fn error(
    ctx: &Context,
    conn: Conn,
    status: Status,
    kind: ErrorKind,
    code: &str,
    message: impl fmt::Display,
) -> Conn {
    ctx.metrics.count_error(kind);
    if let Some(ip) = conn.peer_ip() {
        ctx.client_faults.malformed(ip, kind);
    }
    json(
        conn,
        status,
        &json!({ "error": code, "message": message.to_string() }),
    )
}

/// Sends a 400 with `{"error": code, "message": message}`, counted as a bad request.
pub(crate) fn bad_request(
    ctx: &Context,
    conn: Conn,
    code: &str,
    message: impl fmt::Display,
) -> Conn {
    error(
        ctx,
        conn,
        Status::BadRequest,
        ErrorKind::BadRequest,
        code,
        message,
    )
}

/// Sends an error in OpenAI's shape (`/v1/chat/completions` and `/v1/models` only), counted
/// under `kind` like [`error`]; `None` for an answer that is not the client's fault.
pub(crate) fn api_error(
    ctx: &Context,
    conn: Conn,
    error: &ApiError,
    kind: Option<ErrorKind>,
) -> Conn {
    if let Some(kind) = kind {
        ctx.metrics.count_error(kind);
        if let Some(ip) = conn.peer_ip() {
            ctx.client_faults.malformed(ip, kind);
        }
    }
    let status = Status::try_from(error.status).unwrap_or(Status::InternalServerError);
    conn.with_status(status)
        .with_response_header(KnownHeaderName::ContentType, "application/json")
        .with_response_header(KnownHeaderName::CacheControl, "no-store")
        .with_body(error.to_json())
        .halt()
}
