//! Reading JSON request bodies within `[gateway] max_message_bytes`.
//!
//! A declared `Content-Length` above the limit is refused before a byte of the body is read;
//! a chunked body is refused as soon as it passes the limit (trillium enforces it while
//! reading), so an oversized body is never buffered whole.
//!
//! JSON is UTF-8 (RFC 8259): the body is parsed from its bytes, so invalid UTF-8 is refused
//! with 400 `invalid_json` instead of being replaced, whatever charset the client claims.
//! serde_json's recursion limit (128) turns deeply nested input into the same 400 rather
//! than a stack overflow.

use serde::de::DeserializeOwned;
use trillium::{Conn, KnownHeaderName, Status};

use crate::{context::Context, http::response, metrics::ErrorKind};

/// Reads and parses the body; on failure returns the conn already answered with 4xx.
pub(crate) async fn read_json<T: DeserializeOwned>(
    ctx: &Context,
    mut conn: Conn,
) -> Result<(Conn, T), Conn> {
    let limit = ctx.config.gateway.max_message_bytes;
    let declared = conn
        .request_headers()
        .get_str(KnownHeaderName::ContentLength)
        .and_then(|length| length.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large(ctx, conn, limit));
    }
    let body = match conn.request_body().read_bytes().await {
        Ok(body) => body,
        Err(trillium::Error::ReceivedBodyTooLong(_)) => return Err(too_large(ctx, conn, limit)),
        // A chunked body passing the limit surfaces as an I/O error of kind `Unsupported`.
        Err(trillium::Error::Io(error)) if error.kind() == std::io::ErrorKind::Unsupported => {
            return Err(too_large(ctx, conn, limit));
        }
        Err(error) => {
            return Err(response::error(
                ctx,
                conn,
                Status::BadRequest,
                ErrorKind::BadRequest,
                "bad_request",
                format!("cannot read the request body: {error}"),
            ));
        }
    };
    if let Err(error) = std::str::from_utf8(&body) {
        return Err(response::error(
            ctx,
            conn,
            Status::BadRequest,
            ErrorKind::BadRequest,
            "invalid_json",
            format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                error.valid_up_to()
            ),
        ));
    }
    match serde_json::from_slice(&body) {
        Ok(value) => Ok((conn, value)),
        Err(error) => Err(response::error(
            ctx,
            conn,
            Status::BadRequest,
            ErrorKind::BadRequest,
            "invalid_json",
            format!("the body is not the expected JSON: {error}"),
        )),
    }
}

fn too_large(ctx: &Context, conn: Conn, limit: u64) -> Conn {
    response::error(
        ctx,
        conn.with_response_header(KnownHeaderName::Connection, "close"),
        Status::PayloadTooLarge,
        ErrorKind::PayloadTooLarge,
        "payload_too_large",
        format!("the body is larger than {limit} bytes ([gateway] max_message_bytes)"),
    )
}
