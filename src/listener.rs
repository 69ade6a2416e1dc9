//! blufio's own accept loop and connection driver, in front of trillium-http.
//!
//! trillium-smol's loop logs every failed `accept` and retries at once, so running out of file
//! descriptors spins a core and floods the log; it also serves HTTP/2 to any client that sends
//! the prior-knowledge preface, answers an oversized head with a reset and names the framework
//! version in parser-level errors. Here blufio accepts itself, admits each connection through
//! the [`Connections`](crate::connection::Connections) registry, refuses HTTP/2, and hands
//! HTTP/1.1 to `trillium_http::run_with_initial_bytes` with blufio's handler. It does not
//! parse HTTP: trillium-http does.

use std::{
    io,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use async_io::Timer;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use trillium::{Conn, Handler, Headers, HttpConfig, Info, KnownHeaderName, Swansong};
use trillium_http::HttpContext;
use trillium_smol::{SmolTransport, async_net};

use crate::{
    connection::{
        ConnectionGuard, ConnectionMemory, EVICTION_SLACK, Episode, Listener, Phase, Refusal,
    },
    context::Context,
    deadline::{DeadlineTransport, HEAD_BUFFER_INITIAL},
    metrics::ErrorKind,
    read_buffer::ReadBufferTransport,
    readiness,
    request_target::{self, RequestTargetTransport},
    transport::{async_read_into, forward_async_write, forward_transport},
};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first pause after a failed `accept`; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often, and at most how long, the accept loop waits for connections closed to make room.
const EVICTION_WAIT_STEP: Duration = Duration::from_millis(1);
const EVICTION_WAIT_MAX: Duration = Duration::from_millis(100);

/// How long a connection accepted before shutdown may take to send its first byte once the
/// listeners have stopped.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How long a refusal or error response may take to write before the socket is dropped.
const REFUSAL_WRITE_BUDGET: Duration = Duration::from_secs(1);

/// How long, and how many bytes, the rest of an oversized head is read and dropped after a
/// 431, so the client sees the response rather than a reset.
const LINGER_BUDGET: Duration = Duration::from_millis(500);
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Request headers a connection's map has room for before it grows (trillium's default: 32).
const REQUEST_HEADER_CAPACITY: usize = 8;
/// Response headers a connection's map has room for before it grows (trillium's default: 32).
const RESPONSE_HEADER_CAPACITY: usize = 8;

/// Builds the trillium-http context shared by every connection of one listener: blufio's
/// HTTP limits, the listener's shutdown signal, and `Server: blufio` as the only default
/// header, so even responses the parser writes itself name no framework or version.
pub(crate) async fn http_context(ctx: &Context, handler: &mut impl Handler) -> Arc<HttpContext> {
    let mut http_config = HttpConfig::default();
    // Bodies above the limit are refused while being read, never buffered whole.
    http_config.set_received_body_max_len(ctx.config.gateway.max_message_bytes);
    // trillium-http's `read_bytes` would reserve a declared length (up to 1 MiB) before a byte
    // arrives; `http/body.rs` reads with its own growing buffer, and this keeps any other
    // reader from reserving more than one small allocation for a length merely declared.
    http_config.set_received_body_max_preallocate(1024);
    // Header maps are allocated per connection at this size and kept while it is open; the
    // default (32 + 32) costs about 20 KiB per idle keep-alive connection. Probes and API
    // clients send and get fewer than ten headers; larger requests grow the map as needed.
    http_config
        .set_request_header_initial_capacity(REQUEST_HEADER_CAPACITY)
        .set_response_header_initial_capacity(RESPONSE_HEADER_CAPACITY);
    let mut context = HttpContext::new();
    context.set_config(http_config);
    context.set_swansong(ctx.shutdown.clone());
    let mut info = Info::from(context).with_shared_state(ctx.runtime.clone());
    info.shared_state_entry::<Headers>()
        .or_default()
        .insert(KnownHeaderName::Server, "blufio");
    handler.init(&mut info).await;
    Arc::new(HttpContext::from(info))
}

/// Accepts connections on `listener` until `ctx.shutdown` fires, spawning one task each.
pub(crate) async fn accept_loop<H: Handler>(
    ctx: Arc<Context>,
    listener: async_net::TcpListener,
    kind: Listener,
    http: Arc<HttpContext>,
    handler: Arc<H>,
) {
    let runtime = ctx.runtime.clone();
    let swansong: Swansong = ctx.shutdown.clone();
    // Shutdown completes only once the loop has stopped and the listener is closed.
    let _running = swansong.guard();
    let mut failures: Option<(Instant, u64, Duration)> = None;
    loop {
        // Connections closed to make room hold their descriptors until they have closed; while
        // too many are closing, new connections wait in the kernel's backlog (briefly) rather
        // than be refused, so a burst of attackers cannot crowd a probe out.
        let mut waited = Duration::ZERO;
        while ctx.connections.evicting() >= EVICTION_SLACK && waited < EVICTION_WAIT_MAX {
            Timer::after(EVICTION_WAIT_STEP).await;
            waited += EVICTION_WAIT_STEP;
        }
        let Some(accepted) = swansong.interrupt(listener.accept()).await else {
            take_backlog(&ctx, &listener, kind, &http, &handler).await;
            break;
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // Per-client failures: the peer went away between SYN and accept.
            Err(error) if is_per_client(&error) => {
                log::debug!("accept: {error}");
                continue;
            }
            Err(error) => {
                // Out of descriptors (EMFILE/ENFILE) or kernel memory: retrying at once would
                // spin. Count every failure, log the first of an episode, and back off.
                ctx.metrics.count_error(ErrorKind::AcceptFailed);
                let (_, count, delay) = failures.get_or_insert_with(|| {
                    log::error!(
                        "accept failed: {error}; backing off and refusing new connections \
                         until it recovers (raise the file-descriptor limit or lower \
                         [daemon] max_connections)"
                    );
                    (Instant::now(), 0, ACCEPT_BACKOFF_MIN)
                });
                *count += 1;
                let pause = *delay;
                *delay = (*delay * 2).min(ACCEPT_BACKOFF_MAX);
                if swansong.interrupt(Timer::after(pause)).await.is_none() {
                    break;
                }
                continue;
            }
        };
        if let Some((started, count, _)) = failures.take() {
            log::warn!(
                "accept recovered after {count} failures in {:.1?}",
                started.elapsed()
            );
        }
        let ip = unmap(peer.ip());
        let (admitted, episode) = ctx.connections.admit(kind, ip);
        match episode {
            Episode::Quiet => {}
            Episode::Started => log::warn!(
                "connection limit reached (max_connections {}, max_connections_per_ip {}); \
                 closing the oldest incomplete heads of the busiest addresses to make room, \
                 refusing with 503 when there is none",
                ctx.connections.max_connections(),
                ctx.connections.max_per_ip()
            ),
            Episode::Ended {
                refused,
                evicted,
                lasted,
            } => log::warn!(
                "below the connection limit again after {lasted:.1?}: {evicted} connections \
                 closed to make room, {refused} refused"
            ),
        }
        match admitted {
            Ok(guard) => {
                let ctx = Arc::clone(&ctx);
                let http = Arc::clone(&http);
                let handler = Arc::clone(&handler);
                // Taken here, not in the task: shutdown must not find the count at zero
                // between this accept and the task's first poll.
                let drain = ctx.shutdown.guard();
                let serve = serve_connection(ctx, stream, guard, drain, http, handler);
                runtime.spawn_detached(serve);
            }
            Err(refusal) => {
                ctx.metrics.count_error(ErrorKind::ConnectionLimit);
                log::debug!("refusing connection from {ip}: {refusal} reached");
                runtime.spawn_detached(refuse(stream, refusal));
            }
        }
    }
}

/// Takes the connections the kernel has already completed when the listener stops (closing
/// it would reset them, and their requests with them) and serves their first request, which
/// gets `Connection: close`. Later clients find the port closed before they send anything.
async fn take_backlog<H: Handler>(
    ctx: &Arc<Context>,
    listener: &async_net::TcpListener,
    kind: Listener,
    http: &Arc<HttpContext>,
    handler: &Arc<H>,
) {
    let mut taken = 0;
    while let Some(Ok((stream, peer))) = futures_lite::future::poll_once(listener.accept()).await {
        let ip = unmap(peer.ip());
        match ctx.connections.admit(kind, ip).0 {
            Ok(guard) => {
                let serve = serve_connection(
                    Arc::clone(ctx),
                    stream,
                    guard,
                    ctx.shutdown.guard(),
                    Arc::clone(http),
                    Arc::clone(handler),
                );
                ctx.runtime.spawn_detached(serve);
            }
            Err(refusal) => ctx.runtime.spawn_detached(refuse(stream, refusal)),
        }
        taken += 1;
    }
    if taken > 0 {
        log::debug!("took {taken} connections from the backlog at shutdown");
    }
}

/// Accept errors caused by one client, not by the daemon's resources.
fn is_per_client(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Answers a connection refused at a limit with a 503 and closes it.
async fn refuse(mut stream: async_net::TcpStream, refusal: Refusal) {
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
async fn serve_connection<H: Handler, D>(
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
            answer_uri_too_long(ctx, writer, ip).await;
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
        count_malformed(ctx, ip, ErrorKind::Http2Refused);
        log::debug!("refusing HTTP/2 prior-knowledge connection from {ip}");
        let response = json_response(
            505,
            "HTTP Version Not Supported",
            "http2_not_supported",
            "this server speaks HTTP/1.1 only",
        );
        write_and_close(writer, &response).await;
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
            count_malformed(ctx, ip, ErrorKind::HeaderTooLarge);
            log::debug!("request head from {ip} too large; answering 431");
            let response = json_response(
                431,
                "Request Header Fields Too Large",
                "header_too_large",
                "the request head is larger than the server accepts",
            );
            write_and_close(writer, &response).await;
        }
        Err(trillium_http::Error::Io(error))
            if request_target::is_request_line_too_long(&error) =>
        {
            answer_uri_too_long(ctx, writer, ip).await;
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

/// Counts a malformed request the handler never saw, in the metrics and for `ip`'s episode.
fn count_malformed(ctx: &Context, ip: IpAddr, kind: ErrorKind) {
    ctx.metrics.count_error(kind);
    ctx.client_faults.malformed(ip, kind);
}

/// Answers a request line longer than the head limit with a JSON 414 and closes.
async fn answer_uri_too_long(ctx: &Context, writer: async_net::TcpStream, ip: IpAddr) {
    count_malformed(ctx, ip, ErrorKind::UriTooLong);
    log::debug!("request line from {ip} too long; answering 414");
    let response = json_response(
        414,
        "URI Too Long",
        "uri_too_long",
        &format!(
            "the request line is longer than the server accepts ({} bytes)",
            request_target::MAX_LINE
        ),
    );
    write_and_close(writer, &response).await;
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
