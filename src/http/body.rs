//! Reading request bodies within a route's limit (`[gateway] max_message_bytes`, or
//! `max_request_bytes` for `/v1/chat/completions`), and parsing JSON ones.
//!
//! A declared `Content-Length` above the limit is refused before a byte of the body is read;
//! a chunked body is refused as soon as it passes the limit (trillium enforces it while
//! reading), so an oversized body is never buffered whole. The buffer grows with the bytes
//! that arrive, never with the length a client declares, and is charged to the connection
//! (`connection/`); a body that misses its deadline gets a 408 and the socket closes.
//!
//! JSON is UTF-8 (RFC 8259): the body is parsed from its bytes, so invalid UTF-8 is refused
//! with 400 `invalid_json` instead of being replaced, whatever charset the client claims.
//! serde_json's recursion limit (128) turns deeply nested input into the same 400 rather
//! than a stack overflow.

use std::{io, sync::Arc};

use futures_lite::{AsyncRead, AsyncReadExt};
use serde::de::DeserializeOwned;
use trillium::{Conn, KnownHeaderName, Status};

use crate::{
    connection::{ConnectionMemory, MemoryCharge, Phase, Tracked},
    context::Context,
    http::response,
    metrics::ErrorKind,
};

/// The first allocation for a body; it doubles as bytes arrive, so a body holds at most twice
/// what it received (and never what it merely declared).
const FIRST_READ_BYTES: usize = 1024;

/// Reads and parses the body within `[gateway] max_message_bytes`; on failure returns the
/// conn already answered with 4xx.
///
/// The buffer grows with the bytes received and is charged to the connection, which is in
/// [`Phase::Body`] meanwhile: the memory monitor sheds it like an incomplete head.
pub(crate) async fn read_json<T: DeserializeOwned>(
    ctx: &Context,
    mut conn: Conn,
) -> Result<(Conn, T), Conn> {
    let limit = Limit {
        bytes: ctx.config.gateway.max_message_bytes,
        key: "[gateway] max_message_bytes",
    };
    let body = match read(ctx, &mut conn, limit).await {
        Ok(body) => body,
        Err(failure) => return Err(failure.answer(ctx, conn)),
    };
    if let Err(error) = std::str::from_utf8(&body) {
        return Err(response::bad_request(
            ctx,
            conn,
            "invalid_json",
            format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                error.valid_up_to()
            ),
        ));
    }
    match serde_json::from_slice(&body) {
        Ok(value) => Ok((conn, value)),
        Err(error) => Err(response::bad_request(
            ctx,
            conn,
            "invalid_json",
            format!("the body is not the expected JSON: {error}"),
        )),
    }
}

/// A route's body limit and the setting that sets it (named in the 413).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    pub(crate) bytes: u64,
    pub(crate) key: &'static str,
}

/// Why a body could not be read, and what its client is told.
#[derive(Debug)]
pub(crate) struct BodyFailure {
    pub(crate) status: Status,
    /// How it is counted; `None` when the client only went away.
    pub(crate) kind: Option<ErrorKind>,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl BodyFailure {
    /// Answers in blufio's own error shape, closing the connection.
    pub(crate) fn answer(self, ctx: &Context, conn: Conn) -> Conn {
        let conn = conn.with_response_header(KnownHeaderName::Connection, "close");
        match self.kind {
            Some(kind) => response::error(ctx, conn, self.status, kind, self.code, self.message),
            None => response::json(
                conn,
                self.status,
                &serde_json::json!({ "error": self.code, "message": self.message }),
            ),
        }
    }
}

/// Reads the whole body within `limit`; on failure returns why (the conn is not yet
/// answered). The connection cannot be reused after a failure: the answer must close it.
///
/// The conn is borrowed, not moved in and out: a future holding a `Conn` by value in each
/// layer is larger, and every request waiting for its body holds one.
pub(crate) async fn read(
    ctx: &Context,
    conn: &mut Conn,
    limit: Limit,
) -> Result<Vec<u8>, BodyFailure> {
    let too_large = || BodyFailure {
        status: Status::PayloadTooLarge,
        kind: Some(ErrorKind::PayloadTooLarge),
        code: "payload_too_large",
        message: format!(
            "the body is larger than {} bytes ({})",
            limit.bytes, limit.key
        ),
    };
    let declared = conn
        .request_headers()
        .get_str(KnownHeaderName::ContentLength)
        .and_then(|length| length.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.bytes) {
        return Err(too_large());
    }
    let chunked = conn
        .request_headers()
        .has_header(KnownHeaderName::TransferEncoding);
    let tracked: Option<Arc<Tracked>> = conn
        .state::<ConnectionMemory>()
        .map(|memory| Arc::clone(&memory.0));
    if let Some(tracked) = &tracked {
        tracked.set_phase(Phase::Body);
    }
    let mut charge = MemoryCharge::new(tracked.clone());
    let read = read_bounded(conn.request_body(), limit.bytes, &mut charge).await;
    if let Some(tracked) = &tracked {
        tracked.set_phase(Phase::Busy);
    }
    let failure = match read {
        Ok(body) => return Ok(body),
        Err(error) if error.kind() == io::ErrorKind::FileTooLarge => too_large(),
        // A chunked body passing the limit surfaces as an I/O error of kind `Unsupported`.
        Err(error) if error.kind() == io::ErrorKind::Unsupported => too_large(),
        // The whole-body or stall deadline (`deadline/`): answer if it can be written at
        // once and close, rather than keep the socket for a body that is not coming.
        Err(error) if error.kind() == io::ErrorKind::TimedOut => {
            log::debug!("closing connection: {error}");
            BodyFailure {
                status: Status::RequestTimeout,
                kind: Some(ErrorKind::BodyTimeout),
                code: "body_timeout",
                message: format!(
                    "the request body did not arrive within {} s ([daemon] request_timeout_secs)",
                    ctx.config.daemon.request_timeout_secs
                ),
            }
        }
        // Not a malformed request: the client went away (a cancelled request, the end of a
        // flood). Neither counted nor charged to it; the answer is for a client that only
        // closed its sending side, and is lost otherwise.
        Err(error) if client_left(&error, chunked) => {
            log::debug!("request body cut short by its client: {error}");
            BodyFailure {
                status: Status::BadRequest,
                kind: None,
                code: "incomplete_body",
                message: format!("the connection closed before the whole body arrived: {error}"),
            }
        }
        Err(error) => BodyFailure {
            status: Status::BadRequest,
            kind: Some(ErrorKind::BadRequest),
            code: "bad_request",
            message: format!("cannot read the request body: {error}"),
        },
    };
    Err(failure)
}

/// Whether reading a body failed because its client closed or reset the connection, rather
/// than because the body was malformed. trillium-http reports a `Content-Length` body that
/// ends early as `InvalidData` (the only error it gives such a body), an early end of a
/// chunked body as `ConnectionAborted` or `UnexpectedEof`, while invalid chunked framing is
/// also `InvalidData`.
fn client_left(error: &io::Error, chunked: bool) -> bool {
    match error.kind() {
        io::ErrorKind::InvalidData => !chunked,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => true,
        _ => false,
    }
}

/// Reads `body` to its end into a buffer that grows with the bytes received, keeping `charge`
/// at its capacity. More than `limit` bytes is an error of kind `FileTooLarge`.
async fn read_bounded(
    mut body: impl AsyncRead + Unpin,
    limit: u64,
    charge: &mut MemoryCharge,
) -> io::Result<Vec<u8>> {
    // `bytes` is kept initialised to its whole length and `filled` counts what was read, so
    // each byte is zeroed once, when the buffer grows, not again before every read.
    let mut bytes: Vec<u8> = Vec::new();
    let mut filled = 0;
    loop {
        if filled == bytes.len() {
            bytes.reserve(FIRST_READ_BYTES);
            charge.set(bytes.capacity() as u64);
            bytes.resize(bytes.capacity(), 0);
        }
        let read = match bytes.get_mut(filled..) {
            Some(free) => body.read(free).await,
            None => Ok(0),
        };
        match read {
            Ok(0) => {
                bytes.truncate(filled);
                return Ok(bytes);
            }
            Ok(read) => {
                filled += read;
                if filled as u64 > limit {
                    return Err(io::ErrorKind::FileTooLarge.into());
                }
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_grows_with_the_bytes_received_not_the_limit() {
        let mut charge = MemoryCharge::new(None);
        let input = vec![b'x'; 3000];
        let read =
            futures_lite::future::block_on(read_bounded(input.as_slice(), 1 << 20, &mut charge))
                .unwrap();
        assert_eq!(read.len(), 3000);
        assert!(read.capacity() <= 2 * 3000, "{}", read.capacity());
        let empty: &[u8] = &[];
        let read =
            futures_lite::future::block_on(read_bounded(empty, 1 << 20, &mut charge)).unwrap();
        assert!(read.capacity() <= FIRST_READ_BYTES);
    }

    #[test]
    fn a_body_cut_short_is_a_hang_up_and_bad_chunked_framing_is_not() {
        let cut = |kind: io::ErrorKind| io::Error::new(kind, "x");
        assert!(client_left(&cut(io::ErrorKind::InvalidData), false));
        assert!(!client_left(&cut(io::ErrorKind::InvalidData), true));
        assert!(client_left(&cut(io::ErrorKind::ConnectionAborted), true));
        assert!(client_left(&cut(io::ErrorKind::UnexpectedEof), true));
        assert!(client_left(&cut(io::ErrorKind::ConnectionReset), false));
        assert!(!client_left(&cut(io::ErrorKind::Other), false));
    }

    #[test]
    fn more_than_the_limit_is_refused_while_reading() {
        let mut charge = MemoryCharge::new(None);
        let input = vec![b'x'; 5000];
        let error =
            futures_lite::future::block_on(read_bounded(input.as_slice(), 4096, &mut charge))
                .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::FileTooLarge);
    }
}
