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
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use async_io::Timer;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use trillium::{Conn, Handler, Headers, HttpConfig, Info, KnownHeaderName, Swansong};
use trillium_http::HttpContext;
use trillium_smol::{SmolTransport, async_net};

use crate::{
    connection::{ConnectionGuard, Episode, Listener, Phase, Refusal},
    context::Context,
    deadline::{DeadlineTransport, HEAD_BUFFER_INITIAL},
    metrics::ErrorKind,
    request_target::RequestTargetTransport,
};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first pause after a failed `accept`; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
    while let Some(accepted) = swansong.interrupt(listener.accept()).await {
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
                 refusing new connections with 503",
                ctx.connections.max_connections(),
                ctx.connections.max_per_ip()
            ),
            Episode::Ended { refused, lasted } => {
                log::warn!("accepting connections again after refusing {refused} in {lasted:.1?}")
            }
        }
        match admitted {
            Ok(guard) => {
                let ctx = Arc::clone(&ctx);
                let http = Arc::clone(&http);
                let handler = Arc::clone(&handler);
                runtime.spawn_detached(serve_connection(ctx, stream, ip, guard, http, handler));
            }
            Err(refusal) => {
                ctx.metrics.count_error(ErrorKind::ConnectionLimit);
                log::debug!("refusing connection from {ip}: {refusal} reached");
                runtime.spawn_detached(refuse(stream, refusal));
            }
        }
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
type ConnectionTransport =
    Boxed<RequestTargetTransport<DeadlineTransport<SmolTransport<async_net::TcpStream>>>>;

/// A transport behind a `Box`. trillium-http keeps its transport by value in each nested
/// future of a connection's keep-alive loop, and trillium moves it into a fresh `Box` for
/// every request's handlers; behind one pointer those copies and that allocation are eight
/// bytes instead of the whole stack (over 600 bytes): 26.2 -> 18.2 KB of RssAnon per idle
/// keep-alive connection, 5,000 of them against a release build.
struct Boxed<T>(Box<T>);

impl<T: futures_lite::AsyncRead + Unpin> futures_lite::AsyncRead for Boxed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for Boxed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_close(cx)
    }
}

impl<T: trillium::Transport> trillium::Transport for Boxed<T> {
    fn set_linger(&mut self, linger: Option<Duration>) -> io::Result<()> {
        self.0.set_linger(linger)
    }

    fn set_nodelay(&mut self, nodelay: bool) -> io::Result<()> {
        self.0.set_nodelay(nodelay)
    }

    fn set_ip_ttl(&mut self, ttl: u32) -> io::Result<()> {
        self.0.set_ip_ttl(ttl)
    }

    fn peer_addr(&self) -> io::Result<Option<std::net::SocketAddr>> {
        self.0.peer_addr()
    }

    fn negotiated_alpn(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.0.negotiated_alpn()
    }
}

/// Drives one admitted connection until it closes, is shed, or the listener shuts down.
async fn serve_connection<H: Handler>(
    ctx: Arc<Context>,
    stream: async_net::TcpStream,
    ip: IpAddr,
    guard: ConnectionGuard,
    http: Arc<HttpContext>,
    handler: Arc<H>,
) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket, to answer after trillium-http has given up on it.
    let writer = stream.clone();
    let timeout = Duration::from_secs(ctx.config.daemon.request_timeout_secs);
    let tracked = Arc::clone(guard.tracked());
    let transport = Boxed(Box::new(RequestTargetTransport::new(
        DeadlineTransport::tracked(SmolTransport::from(stream), timeout, Arc::clone(&tracked)),
        tracked,
    )));
    let shed = async {
        guard.shed().await;
        ctx.metrics.count_error(ErrorKind::ConnectionShed);
        log::debug!("closing connection from {ip}: shed under memory pressure");
    };
    let upgrade = drive(&ctx, transport, writer, ip, &guard, &http, &handler)
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

async fn drive<H: Handler>(
    ctx: &Context,
    mut transport: ConnectionTransport,
    writer: async_net::TcpStream,
    ip: IpAddr,
    guard: &ConnectionGuard,
    http: &Arc<HttpContext>,
    handler: &Arc<H>,
) -> Option<trillium::Upgrade> {
    let tracked = guard.tracked();
    // Like trillium-http's own first read, waiting for a first byte ends at shutdown.
    let peek = match http
        .swansong()
        .interrupt(peek_preface(&mut transport))
        .await
    {
        None => return None,
        Some(Ok(peek)) => peek,
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
            let conn = Conn::from(conn);
            let conn = handler.run(conn).await;
            let conn = handler.before_send(conn).await;
            let conn = conn.into_inner();
            // Marked before the 101 is written: once the client sees it, the connection is a
            // WebSocket and must never look idle (and sheddable) to the memory monitor.
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

fn count_timeout(ctx: &Context, expired: Option<Phase>) {
    match expired {
        Some(Phase::Head) => ctx.metrics.count_error(ErrorKind::HeadTimeout),
        Some(Phase::Busy) => ctx.metrics.count_error(ErrorKind::BodyTimeout),
        _ => {}
    }
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
    // where that buffer's growth starts (see `deadline::MAX_HEAD_READS`).
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
