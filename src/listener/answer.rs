//! What the listener answers itself, for connections and requests no handler saw (503 at a
//! limit, 414, 431, 505), and how it closes after such an answer.

use std::{io, net::IpAddr, time::Duration};

use async_io::Timer;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use trillium_smol::async_net;

use crate::{connection::Refusal, context::Context, metrics::ErrorKind, request_target};

/// How long a refusal or error response may take to write before the socket is dropped.
const REFUSAL_WRITE_BUDGET: Duration = Duration::from_secs(1);

/// How long, and how many bytes, the rest of an oversized head is read and dropped after a
/// 431, so the client sees the response rather than a reset.
const LINGER_BUDGET: Duration = Duration::from_millis(500);
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Answers a connection refused at a limit with a 503 and closes it.
pub(super) async fn refuse(mut stream: async_net::TcpStream, refusal: Refusal) {
    let response = json_response(
        503,
        "Service Unavailable",
        "connection_limit",
        &format!("too many connections ({refusal}); retry later"),
    );
    let _ = stream
        .write_all(&response)
        .or(async {
            Timer::after(REFUSAL_WRITE_BUDGET).await;
            Ok(())
        })
        .await;
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Returns a complete HTTP/1.1 response with a `{"error", "message"}` body that closes the
/// connection.
fn json_response(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: blufio\r\nContent-Type: application/json\r\n\
         Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Counts a malformed request the handler never saw, in the metrics and for `ip`'s episode.
pub(super) fn count_malformed(ctx: &Context, ip: IpAddr, kind: ErrorKind) {
    ctx.metrics.count_error(kind);
    ctx.client_faults.malformed(ip, kind);
}

/// A request the listener answers itself, before any handler.
#[derive(Debug, Clone, Copy)]
pub(super) enum Malformed {
    /// An HTTP/2 prior-knowledge preface: 505.
    Http2,
    /// A request head over the size limit: 431.
    HeadTooLarge,
    /// A request line longer than the head limit: 414.
    UriTooLong,
}

/// Answers `malformed` from `ip` with its JSON status, counts it and closes.
pub(super) async fn answer(
    ctx: &Context,
    writer: async_net::TcpStream,
    ip: IpAddr,
    malformed: Malformed,
) {
    let (kind, status, reason, code, message) = match malformed {
        Malformed::Http2 => {
            log::debug!("refusing HTTP/2 prior-knowledge connection from {ip}");
            let message = "this server speaks HTTP/1.1 only".to_owned();
            (
                ErrorKind::Http2Refused,
                505,
                "HTTP Version Not Supported",
                "http2_not_supported",
                message,
            )
        }
        Malformed::HeadTooLarge => {
            log::debug!("request head from {ip} too large; answering 431");
            let message = "the request head is larger than the server accepts".to_owned();
            (
                ErrorKind::HeaderTooLarge,
                431,
                "Request Header Fields Too Large",
                "header_too_large",
                message,
            )
        }
        Malformed::UriTooLong => {
            log::debug!("request line from {ip} too long; answering 414");
            let message = format!(
                "the request line is longer than the server accepts ({} bytes)",
                request_target::MAX_LINE
            );
            (
                ErrorKind::UriTooLong,
                414,
                "URI Too Long",
                "uri_too_long",
                message,
            )
        }
    };
    count_malformed(ctx, ip, kind);
    write_and_close(writer, &json_response(status, reason, code, &message)).await;
}

/// Writes `response`, then reads and drops what the client still sends for a moment, so
/// closing does not reset the connection before the client has read the response.
async fn write_and_close(mut writer: async_net::TcpStream, response: &[u8]) {
    let written = writer
        .write_all(response)
        .or(async {
            Timer::after(REFUSAL_WRITE_BUDGET).await;
            Err(io::ErrorKind::TimedOut.into())
        })
        .await;
    if written.is_err() {
        return;
    }
    let _ = writer.shutdown(std::net::Shutdown::Write);
    let linger = async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_MAX_BYTES {
            match writer.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    linger
        .or(async {
            Timer::after(LINGER_BUDGET).await;
        })
        .await;
}
