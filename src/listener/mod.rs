//! blufio's own accept loop and connection driver, in front of trillium-http.
//!
//! trillium-smol's loop logs every failed `accept` and retries at once, so running out of file
//! descriptors spins a core and floods the log; it also serves HTTP/2 to any client that sends
//! the prior-knowledge preface, answers an oversized head with a reset and names the framework
//! version in parser-level errors. Here blufio accepts itself, admits each connection through
//! the [`Connections`](crate::connection::Connections) registry, refuses HTTP/2, and hands
//! HTTP/1.1 to `trillium_http::run_with_initial_bytes` with blufio's handler. It does not
//! parse HTTP: trillium-http does.

mod answer;
mod connection;

use std::{
    io,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use async_io::Timer;
use trillium::{Handler, Headers, HttpConfig, Info, KnownHeaderName, Swansong};
use trillium_http::HttpContext;
use trillium_smol::async_net;

use crate::{
    connection::{EVICTION_SLACK, Episode, Listener},
    context::Context,
    metrics::ErrorKind,
};

use answer::refuse;
use connection::serve_connection;

/// The first pause after a failed `accept`; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often, and at most how long, the accept loop waits for connections closed to make room.
const EVICTION_WAIT_STEP: Duration = Duration::from_millis(1);
const EVICTION_WAIT_MAX: Duration = Duration::from_millis(100);

/// Request headers a connection's map has room for before it grows (trillium's default: 32).
const REQUEST_HEADER_CAPACITY: usize = 8;
/// The send buffer of a streamed response body (see `http_context`).
const STREAM_CHUNK_BYTES: usize = 1024;
/// The most a response buffers for a client that is not reading.
const RESPONSE_BUFFER_MAX_BYTES: usize = 64 * 1024;

/// Response headers a connection's map has room for before it grows (trillium's default: 32).
const RESPONSE_HEADER_CAPACITY: usize = 8;

/// Builds the trillium-http context shared by every connection of one listener: blufio's
/// HTTP limits, the listener's shutdown signal, and `Server: blufio` as the only default
/// header, so even responses the parser writes itself name no framework or version.
pub(crate) async fn http_context(ctx: &Context, handler: &mut impl Handler) -> Arc<HttpContext> {
    let mut http_config = HttpConfig::default();
    // Bodies above the limit are refused while being read, never buffered whole.
    // Each route holds its body to its own limit (`http/body.rs`); this is the larger one.
    let gateway = &ctx.config.gateway;
    http_config.set_received_body_max_len(gateway.max_message_bytes.max(gateway.max_request_bytes));
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
    // A streamed body (SSE) is framed into a send buffer of this size, held for the whole
    // stream: the default 8 KiB (which then doubles) was 16 KiB of every stream in flight,
    // for events of a few hundred bytes. Bodies already in memory are written whole anyway.
    http_config.set_body_write_chunk_len(STREAM_CHUNK_BYTES);
    // What a response may buffer while its client does not read (default 2 MiB per
    // connection): a client that stops reading gets back-pressure at this, not megabytes.
    http_config.set_response_buffer_max_len(RESPONSE_BUFFER_MAX_BYTES);
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
