//! One admitted connection: its transport stack, the HTTP/2 preface check, and the
//! trillium-http keep-alive loop with what happens when it ends.

use std::{io, sync::Arc, time::Duration};

use async_io::Timer;
use futures_lite::{AsyncReadExt, FutureExt};
use trillium::{Conn, Handler, Headers, KnownHeaderName};
use trillium_http::HttpContext;
use trillium_smol::{SmolTransport, async_net};

use crate::{
    connection::{ConnectionGuard, ConnectionMemory, Phase},
    context::Context,
    deadline::{DeadlineTransport, HEAD_BUFFER_INITIAL},
    metrics::ErrorKind,
    read_buffer::ReadBufferTransport,
    readiness,
    request_target::{self, RequestTargetTransport},
    transport::{async_read_into, forward_async_write, forward_transport},
};

use super::answer::{Malformed, answer, count_malformed};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection accepted before shutdown may take to send its first byte once the
/// listeners have stopped.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// The transport stack of one connection (request-line rewriting over the deadlines over the
/// socket), behind one pointer.
type ConnectionTransport = Boxed<
    ReadBufferTransport<
        RequestTargetTransport<DeadlineTransport<SmolTransport<async_net::TcpStream>>>,
    >,
>;

/// A transport behind a `Box`. trillium-http keeps its transport by value in each nested
/// future of a connection's keep-alive loop, and trillium moves it into a fresh `Box` for
/// every request's handlers; behind one pointer those copies and that allocation are eight
/// bytes instead of the whole stack (over 600 bytes): 26.2 -> 18.2 KB of RssAnon per idle
/// keep-alive connection, 5,000 of them against a release build.
struct Boxed<T>(Box<T>);

async_read_into!(Boxed<T>, forward 0, T: futures_lite::AsyncRead + Unpin);
forward_async_write!(Boxed<T>, 0, T: futures_lite::AsyncWrite + Unpin);
forward_transport!(Boxed<T>, 0, T: trillium::Transport);

/// Drives one admitted connection until it closes, is shed, or the listener shuts down.
/// `drain` (a guard on `ctx.shutdown`) makes the drain wait for the connection's requests;
/// it is released before a WebSocket takes over the connection.
pub(super) async fn serve_connection<H: Handler, D>(
    ctx: Arc<Context>,
    stream: async_net::TcpStream,
    guard: ConnectionGuard,
    drain: D,
    http: Arc<HttpContext>,
    handler: Arc<H>,
) {
    let ip = guard.tracked().ip();
    let _ = stream.set_nodelay(true);
    // A second handle on the socket, to answer after trillium-http has given up on it.
    let writer = stream.clone();
    let timeout = Duration::from_secs(ctx.config.daemon.request_timeout_secs);
    let tracked = Arc::clone(guard.tracked());
    let transport = Boxed(Box::new(ReadBufferTransport::new(
        RequestTargetTransport::new(
            DeadlineTransport::tracked(SmolTransport::from(stream), timeout, Arc::clone(&tracked)),
            Arc::clone(&tracked),
        ),
        tracked,
    )));
    let shed = async {
        guard.shed().await;
        if guard.tracked().head_closed() {
            // The drain closes incomplete heads; one that has just completed is a request
            // that reached the daemon, and is answered.
            if guard.tracked().phase() != Phase::Head {
                std::future::pending::<()>().await;
            }
            log::debug!("closing connection from {ip}: request head incomplete at shutdown");
        } else if guard.tracked().evicted() {
            ctx.metrics.count_error(ErrorKind::ConnectionEvicted);
            log::debug!("closing connection from {ip}: evicted at the connection limit");
        } else {
            ctx.metrics.count_error(ErrorKind::ConnectionShed);
            log::debug!("closing connection from {ip}: shed under memory pressure");
        }
    };
    let upgrade = drive(&ctx, transport, writer, &guard, drain, &http, &handler)
        .or(async {
            shed.await;
            None
        })
        .await;
    if let Some(mut upgrade) = upgrade {
        // The upgrade handler keeps the connection's place (and its charge) for the upgraded
        // socket's lifetime. /ws runs the socket in a task of its own, so this task, sized for
        // trillium-http's keep-alive loop, ends here.
        upgrade.state_mut().insert(guard);
        handler.upgrade(upgrade).await;
    }
}

async fn drive<H: Handler, D>(
    ctx: &Context,
    mut transport: ConnectionTransport,
    writer: async_net::TcpStream,
    guard: &ConnectionGuard,
    drain: D,
    http: &Arc<HttpContext>,
    handler: &Arc<H>,
) -> Option<trillium::Upgrade> {
    let tracked = guard.tracked();
    let ip = tracked.ip();
    // Waiting for a first byte ends at shutdown, but not at once: a client whose connection
    // was accepted is sending its request, and closing now would reset it.
    let shut_down = async {
        ctx.shutdown.interrupt(std::future::pending::<()>()).await;
        Timer::after(FIRST_REQUEST_GRACE).await;
        None
    };
    let peek = match async { Some(peek_preface(&mut transport).await) }
        .or(shut_down)
        .await
    {
        None => return None,
        Some(Ok(peek)) => peek,
        Some(Err(error)) if request_target::is_request_line_too_long(&error) => {
            answer(ctx, writer, ip, Malformed::UriTooLong).await;
            return None;
        }
        Some(Err(error)) => {
            if error.kind() == io::ErrorKind::TimedOut {
                count_timeout(ctx, Some(tracked.phase()));
            }
            log::debug!("connection from {ip} closed before its first request: {error}");
            return None;
        }
    };
    if peek.as_slice() == HTTP2_PREFACE {
        answer(ctx, writer, ip, Malformed::Http2).await;
        return None;
    }

    let peer_ip = Some(ip);
    let result = trillium_http::run_with_initial_bytes(
        Arc::clone(http),
        transport,
        peek,
        |mut conn| async move {
            tracked.set_phase(Phase::Busy);
            conn.set_peer_ip(peer_ip);
            let mut conn = Conn::from(conn);
            // Handlers that hold buffers for the connection (a body, a WebSocket) charge them
            // to its account. Only requests that can need one get it: a probe allocates
            // nothing for it.
            if carries_body_or_upgrade(conn.request_headers()) {
                conn.insert_state(ConnectionMemory(Arc::clone(tracked)));
            }
            let conn = handler.run(conn).await;
            let conn = handler.before_send(conn).await;
            let mut conn = conn.into_inner();
            // From the start of the drain every response closes its connection, so that no
            // client sends another request on a connection about to close (trillium-http does
            // so itself only once the listeners stop, after WebSockets have closed).
            if ctx.phase() == readiness::Phase::Draining && !conn.should_upgrade() {
                conn.response_headers_mut()
                    .insert(KnownHeaderName::Connection, "close");
            }
            // Marked before the 101 is written: once the client sees it, the connection is a
            // WebSocket and must never look idle (and sheddable) to the memory monitor.
            // The response is written after this returns: until the next read, the connection
            // is not idle, whatever its phase says (see `DeadlineTransport`).
            tracked.set_responding(true);
            tracked.set_phase(if conn.should_upgrade() {
                Phase::Upgraded
            } else {
                Phase::Idle
            });
            conn
        },
    )
    .await;

    match result {
        Ok(Some(upgrade)) => {
            // A WebSocket, which `closing` ends: the drain does not wait for it.
            drop(drain);
            tracked.set_phase(Phase::Upgraded);
            let upgrade = trillium::Upgrade::from(upgrade);
            if handler.has_upgrade(&upgrade) {
                return Some(upgrade);
            }
            log::debug!("upgrade from {ip} without an upgrade handler");
        }
        // A head the handler never saw: trillium-http answered it itself (400, or 501 for an
        // unknown method) and closed.
        Ok(None) if tracked.phase() == Phase::Head => {
            count_malformed(ctx, ip, ErrorKind::BadRequest);
            log::debug!("malformed request head from {ip}; the parser answered it");
        }
        // trillium-http's word for a connection that ended inside a head: a client that
        // went away (a cancel, the end of a flood), not a head the parser refused.
        Err(trillium_http::Error::InvalidHead) => {
            log::debug!("connection from {ip} closed inside a request head");
        }
        Ok(None) | Err(trillium_http::Error::Closed) => {}
        Err(trillium_http::Error::HeadersTooLong) => {
            answer(ctx, writer, ip, Malformed::HeadTooLarge).await;
        }
        Err(trillium_http::Error::Io(error))
            if request_target::is_request_line_too_long(&error) =>
        {
            answer(ctx, writer, ip, Malformed::UriTooLong).await;
        }
        Err(trillium_http::Error::Io(error)) => {
            // A timeout while a head or body was arriving is that phase's deadline (whole or
            // stalled); any other I/O error means the peer left.
            if error.kind() == io::ErrorKind::TimedOut {
                count_timeout(ctx, Some(tracked.phase()));
            }
            log::debug!("connection from {ip} closed: {error}");
        }
        Err(error) => {
            // Malformed framing the parser could not answer itself (smuggling attempts,
            // bad lengths): per-client detail at debug, the count in the metrics and the
            // client's malformed-request episode.
            count_malformed(ctx, ip, ErrorKind::BadRequest);
            log::debug!("http error from {ip}: {error}");
        }
    }
    None
}

fn count_timeout(ctx: &Context, expired: Option<Phase>) {
    match expired {
        Some(Phase::Head) => ctx.metrics.count_error(ErrorKind::HeadTimeout),
        Some(Phase::Busy | Phase::Body) => ctx.metrics.count_error(ErrorKind::BodyTimeout),
        _ => {}
    }
}

/// Returns true for a request with a body (a length or chunked framing) or an upgrade.
fn carries_body_or_upgrade(headers: &Headers) -> bool {
    headers
        .get_str(KnownHeaderName::ContentLength)
        .is_some_and(|length| length.trim() != "0")
        || headers.has_header(KnownHeaderName::TransferEncoding)
        || headers.has_header(KnownHeaderName::Upgrade)
}

/// Reads up to the 24 bytes of the HTTP/2 preface, stopping as soon as the bytes read can no
/// longer be its start (an HTTP/1.1 request may be shorter than 24 bytes).
async fn peek_preface<T: futures_lite::AsyncRead + Unpin>(
    transport: &mut T,
) -> io::Result<Vec<u8>> {
    // The peeked bytes start the buffer trillium-http reads the head into; its capacity is
    // where that buffer's growth starts (see `deadline::HeadReads`).
    let mut peek = [0u8; HTTP2_PREFACE.len()];
    let mut filled = 0;
    while filled < peek.len() {
        let Some(free) = peek.get_mut(filled..) else {
            break;
        };
        let read = transport.read(free).await?;
        if read == 0 {
            break;
        }
        filled += read;
        if !peek
            .get(..filled)
            .is_some_and(|prefix| HTTP2_PREFACE.starts_with(prefix))
        {
            break;
        }
    }
    let mut initial = Vec::with_capacity(HEAD_BUFFER_INITIAL);
    initial.extend_from_slice(peek.get(..filled).unwrap_or_default());
    Ok(initial)
}
