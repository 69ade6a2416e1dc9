//! Hostile clients at the edge of a connection: a slow-head flood and pipelining clients that
//! never read at the connection cap on the single port, request heads and request lines of
//! every size and split, and clients that keep posting on keep-alive connections (or drip
//! heads) through a SIGTERM drain. Real sockets throughout, extra
//! client addresses from 127.0.0.0/8.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use blufio::Config;
use blufio_testkit::http;

use crate::{
    prometheus,
    support::{self, TOKEN, TestDaemon},
};

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("set timeout");
    stream.set_nodelay(true).expect("set nodelay");
    stream
}

/// Connects to `addr` from `source`: on Linux every 127.0.0.0/8 address is the loopback, so
/// one machine can play many clients. std has no bind-before-connect, hence the raw socket.
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    connect_from_with(source, addr, None)
}

/// [`connect_from`], with the socket's receive buffer set to `receive_buffer` before it
/// connects (so the window it advertises is that small).
pub(crate) fn connect_from_with(
    source: Ipv4Addr,
    addr: SocketAddr,
    receive_buffer: Option<libc::c_int>,
) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;

    let SocketAddr::V4(target) = addr else {
        panic!("IPv4 only: {addr}");
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket creation; the descriptor is owned by the stream right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the stream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sockaddr(source, 0);
    // SAFETY: `local` is a valid sockaddr_in of `length` bytes for the call's duration.
    if unsafe { libc::bind(fd, (&raw const local).cast(), length) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(size) = receive_buffer {
        // SAFETY: `size` is a c_int that outlives the call, passed with its length.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let remote = sockaddr(*target.ip(), target.port());
    // SAFETY: as above; a blocking connect on a socket this function owns.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), length) } < 0 {
        return Err(io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    Ok(stream)
}

/// Returns whether the server has neither closed `stream` nor written to it.
fn still_waiting(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    stream.set_nonblocking(true).unwrap();
    let peeked = stream.peek(&mut probe);
    stream.set_nonblocking(false).unwrap();
    matches!(&peeked, Err(error) if error.kind() == ErrorKind::WouldBlock)
}

/// Reads one response framed by `Content-Length`; `None` when the connection closed or was
/// reset first.
fn read_response(stream: &mut TcpStream) -> Option<support::Response> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if raw.len() >= end + 4 + length {
                return Some(support::parse_response(&raw[..end + 4 + length]));
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(read) => raw.extend_from_slice(&buf[..read]),
        }
    }
}

/// Reads until the server closes; a reset or a timeout is a failure.
fn read_to_close(stream: &mut TcpStream) -> Result<Vec<u8>, io::Error> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map(|_| raw)
}

fn error_count(daemon: &TestDaemon, kind: &str) -> f64 {
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    exposition
        .value("blufio_errors_total", &[("type", kind)])
        .unwrap_or_else(|| panic!("no blufio_errors_total{{type={kind:?}}}"))
}

// A7: at the connection cap on the single port, probes and real clients still get through.

/// The drip an attacker starts and never finishes.
const INCOMPLETE_HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Drip: a";

#[test]
fn a_slow_head_flood_at_the_cap_leaves_room_for_probes_and_real_clients() {
    let daemon = support::start_gateway_with(|config| config.daemon.max_connections = 48);
    let addr = daemon.addr();

    // A real client kept alive from before the flood, idle while it lasts.
    let mut kept_alive = connect(addr);
    kept_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept_alive).map(|r| r.status), Some(200));

    // Eight addresses hold twelve incomplete heads each (twice what the port admits) and
    // re-dial whatever the daemon closes, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (2..10u8)
        .map(|last| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let source = Ipv4Addr::new(127, 0, 0, last);
                let mut held: Vec<TcpStream> = Vec::new();
                let mut dialled = 0u32;
                while !stop.load(Ordering::Acquire) {
                    held.retain(still_waiting);
                    while held.len() < 12 {
                        let Ok(mut stream) = connect_from(source, addr) else {
                            break;
                        };
                        let _ = stream.write_all(INCOMPLETE_HEAD);
                        held.push(stream);
                        dialled += 1;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                dialled
            })
        })
        .collect();
    let started = Instant::now();
    while daemon.ctx.connections.open() < 32 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood never filled the port: {} open",
            daemon.ctx.connections.open()
        );
        thread::sleep(Duration::from_millis(10));
    }

    // Probes through the flood, for a second and a half of re-dialling.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        for path in ["/health", "/ready", "/metrics"] {
            let response = support::request(addr, "GET", path, &[], None);
            statuses.push((path, response.status, response.body));
        }
        thread::sleep(Duration::from_millis(300));
    }
    let authed = daemon.authed(TOKEN, "GET", "/v1/health", None);
    kept_alive
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let kept_alive_status = read_response(&mut kept_alive).map(|r| r.status);
    stop.store(true, Ordering::Release);
    let dialled: u32 = attackers.into_iter().map(|a| a.join().unwrap()).sum();
    let summary: Vec<(&str, u16)> = statuses.iter().map(|(p, s, _)| (*p, *s)).collect();
    eprintln!(
        "during the flood: {summary:?}, /v1/health {}, kept-alive {kept_alive_status:?}, \
         {dialled} attacker dials",
        authed.status
    );

    for (path, status, body) in &statuses {
        assert_eq!(*status, 200, "GET {path} during the flood: {body}");
    }
    assert_eq!(authed.status, 200, "authenticated client: {}", authed.body);
    assert_eq!(
        kept_alive_status,
        Some(200),
        "the real client's kept-alive connection was closed"
    );
    assert!(dialled > 96, "the attackers only dialled {dialled} times");
    assert!(error_count(&daemon, "connection_evicted") >= 1.0);
    daemon.stop();
}

#[test]
fn clients_that_never_read_their_responses_leave_room_for_probes_and_real_clients() {
    let mut config = support::config_with_token(TOKEN);
    config.daemon.max_connections = 64;
    config.daemon.max_connections_per_ip = 1000;
    let daemon = support::start_gateway(config);
    let addr = daemon.addr();
    // Each attacker pipelines far more responses than the socket buffers hold, advertises
    // the smallest receive window the kernel allows and never reads, so the daemon's writes
    // block for good. They hold what the daemon admits, more than it admits in all.
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    let held: Vec<TcpStream> = (0..72u8)
        .filter_map(|index| {
            let source = Ipv4Addr::new(127, 0, 1, index % 8 + 2);
            let mut stream = connect_from_with(source, addr, Some(1)).ok()?;
            stream.write_all(pipelined.as_bytes()).ok()?;
            Some(stream)
        })
        .collect();
    // Until the daemon has answered what fits in the buffers and the writes have been
    // blocked long enough to tell a client that stopped reading from flow control.
    let started = Instant::now();
    while daemon.ctx.connections.stalled_readers() < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writes never blocked: {} of {} open",
            daemon.ctx.connections.stalled_readers(),
            daemon.ctx.connections.open()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let open = daemon.ctx.connections.open();
    assert!(open >= 48, "the port is not full: {open} open");

    let mut statuses = Vec::new();
    for _ in 0..5 {
        for path in ["/health", "/metrics"] {
            let response = support::request(addr, "GET", path, &[], None);
            statuses.push((path, response.status, response.body));
        }
        thread::sleep(Duration::from_millis(200));
    }
    let authed = daemon.authed(TOKEN, "GET", "/v1/health", None);
    let session = daemon.authed(TOKEN, "POST", "/v1/sessions", Some("{}"));
    let summary: Vec<(&str, u16)> = statuses.iter().map(|(p, s, _)| (*p, *s)).collect();
    eprintln!(
        "{} non-reading clients dialled, {open} open: {summary:?}, /v1/health {}, \
         POST /v1/sessions {}",
        held.len(),
        authed.status,
        session.status
    );
    for (path, status, body) in &statuses {
        assert_eq!(*status, 200, "GET {path} during the flood: {body}");
    }
    assert_eq!(authed.status, 200, "authenticated client: {}", authed.body);
    assert_eq!(session.status, 201, "authenticated POST: {}", session.body);
    assert!(error_count(&daemon, "connection_evicted") >= 1.0);
    drop(held);
    daemon.stop();
}

#[test]
fn eviction_at_the_cap_spares_requests_in_progress() {
    let daemon = support::start_gateway_with(|config| config.daemon.max_connections = 40);
    let addr = daemon.addr();
    // A request in progress (its handler sleeps 3 s) from the busiest address.
    let busy_source = Ipv4Addr::new(127, 0, 0, 20);
    let mut busy = connect_from(busy_source, addr).unwrap();
    let body = r#"{"content":"slow"}"#;
    busy.write_all(http::message_request(TOKEN, body).as_bytes())
        .unwrap();
    // The message opens a session: from then on its handler runs.
    support::wait_for_active_sessions(&daemon, 1);
    // The same address then fills the port with incomplete heads, and more arrive.
    let mut held = Vec::new();
    for _ in 0..60 {
        let mut stream = connect_from(busy_source, addr).unwrap();
        stream.write_all(INCOMPLETE_HEAD).unwrap();
        held.push(stream);
    }
    let response = read_response(&mut busy).expect("the busy request was answered");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["content"], "late");
    drop(held);
    daemon.stop();
}

// A8: heads are bounded by bytes and time, however they are split.

fn served_in_pieces(daemon: &TestDaemon, head: &[u8], pieces: usize, pause: Duration) -> u16 {
    let mut stream = connect(daemon.addr());
    for piece in head.chunks(head.len().div_ceil(pieces)) {
        stream.write_all(piece).unwrap();
        thread::sleep(pause);
    }
    let raw = read_to_close(&mut stream).expect("the response, then a clean close");
    assert!(!raw.is_empty(), "closed without a response");
    support::parse_response(&raw).status
}

#[test]
fn a_head_sent_one_byte_at_a_time_is_served() {
    let daemon = support::start(Config::for_tests());
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let status = served_in_pieces(&daemon, head, head.len(), Duration::from_millis(5));
    assert_eq!(status, 200);
    daemon.stop();
}

#[test]
fn a_100_byte_head_in_eight_writes_50_ms_apart_is_served() {
    let daemon = support::start(Config::for_tests());
    let mut head = b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ".to_vec();
    head.resize(96, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    assert_eq!(head.len(), 100);
    let status = served_in_pieces(&daemon, &head, 8, Duration::from_millis(50));
    assert_eq!(status, 200);
    daemon.stop();
}

#[test]
fn request_lines_of_every_length_sent_at_once_get_a_json_status() {
    let daemon = support::start(Config::for_tests());
    let mut outcomes = Vec::new();
    for length in [6_123usize, 8_000, 8_192, 9_000, 20_000, 100_000] {
        let target = format!("/{}", "a".repeat(length - 1));
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut stream = connect(daemon.addr());
        // Above the limit the daemon may answer before reading everything.
        let _ = stream.write_all(head.as_bytes());
        let outcome = match read_to_close(&mut stream) {
            Ok(raw) if raw.is_empty() => "closed without a response".to_owned(),
            Ok(raw) => {
                let response = support::parse_response(&raw);
                let code = if response.status == 404 {
                    "not_found"
                } else {
                    "uri_too_long"
                };
                response.assert_error(response.status, code);
                response.status.to_string()
            }
            Err(error) => format!("{:?}", error.kind()),
        };
        outcomes.push((length, outcome));
    }
    let expected: Vec<(usize, String)> = [
        (6_123, "404"),
        (8_000, "404"),
        (8_192, "414"),
        (9_000, "414"),
        (20_000, "414"),
        (100_000, "414"),
    ]
    .into_iter()
    .map(|(length, outcome)| (length, outcome.to_owned()))
    .collect();
    assert_eq!(outcomes, expected);
    assert!(error_count(&daemon, "uri_too_long") >= 4.0);
    daemon.stop();
}

#[test]
fn oversized_headers_split_into_pieces_still_get_431() {
    let daemon = support::start(Config::for_tests());
    let head = http::big_head(10_000);
    let status = served_in_pieces(&daemon, head.as_bytes(), 40, Duration::from_millis(5));
    assert_eq!(status, 431);
    daemon.stop();
}

/// The heap the binary's allocator reports at its latest monitor tick, after a fresh tick.
#[cfg(feature = "jemalloc")]
fn heap_after_a_tick(addr: SocketAddr) -> f64 {
    let ticks = |body: &str| {
        prometheus::parse(body)
            .value("blufio_monitor_ticks_total", &[])
            .unwrap()
    };
    let first = ticks(&support::request(addr, "GET", "/metrics", &[], None).body);
    let started = Instant::now();
    loop {
        let body = support::request(addr, "GET", "/metrics", &[], None).body;
        if ticks(&body) >= first + 2.0 {
            return prometheus::parse(&body)
                .value("blufio_memory_heap_bytes", &[])
                .expect("a heap reading");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no monitor tick"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(feature = "jemalloc")]
#[test]
fn dripped_heads_hold_no_more_memory_than_their_bytes() {
    const CONNECTIONS: usize = 64;
    const PIECES: usize = 64;
    let port = support::free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nmonitor_interval_secs = 1\nrequest_timeout_secs = 60\n\
         max_connections_per_ip = 256\n[gateway]\nport = {port}\n"
    );
    let mut daemon = support::serve(&config, "dripped-heads");
    let addr = daemon.addr();
    let before = heap_after_a_tick(addr);
    // A head of 7,000 bytes, all but its last two bytes dripped in 64 pieces to each of 64
    // connections, one round of pieces every 20 ms.
    let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Drip: ".to_vec();
    head.resize(6_998, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    let (dripped, last) = head.split_at(head.len() - 2);
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS).map(|_| connect(addr)).collect();
    for piece in dripped.chunks(dripped.len().div_ceil(PIECES)) {
        for stream in &mut streams {
            stream.write_all(piece).unwrap();
        }
        thread::sleep(Duration::from_millis(20));
    }
    let during = heap_after_a_tick(addr);
    for stream in &mut streams {
        stream.write_all(last).unwrap();
    }
    let statuses: Vec<Option<u16>> = streams
        .iter_mut()
        .map(|stream| read_response(stream).map(|response| response.status))
        .collect();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status();
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
    assert!(
        statuses.iter().all(|status| *status == Some(200)),
        "{statuses:?}"
    );
    // Each connection may hold its head twice over (the parser's buffer doubles) plus the
    // transport's staging and the connection's own state: far below the geometric growth of
    // a buffer doubled on every read.
    let per_connection = (during - before) / CONNECTIONS as f64;
    eprintln!("{per_connection:.0} bytes of heap per connection holding a dripped head");
    assert!(
        per_connection < 64.0 * 1024.0,
        "{per_connection:.0} bytes of heap per connection holding a 7,000-byte head"
    );
}

// A10: SIGTERM while keep-alive clients keep posting.

#[derive(Debug, Default)]
struct Tally {
    responses: u64,
    /// Requests written in full that got no response (a reset, or a close before it).
    dropped: u64,
    /// Keep-alive responses to requests sent after the drain was seen (`/ready` said so, or
    /// some client got `Connection: close`).
    kept_alive_in_drain: u64,
}

fn keep_posting(addr: SocketAddr, index: usize, drain_seen: &AtomicBool) -> Tally {
    let bearer = format!("Bearer {TOKEN}");
    let session = support::request(
        addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", &bearer)],
        Some("{}"),
    )
    .json()["id"]
        .as_str()
        .expect("a session id")
        .to_owned();
    let body = format!(r#"{{"session_id":"{session}","content":"client {index}"}}"#);
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut tally = Tally::default();
    let started = Instant::now();
    // Until the daemon stops listening (connect is refused) or 30 s pass.
    while started.elapsed() < Duration::from_secs(30) {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            break;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut reused = false;
        loop {
            let after_drain = drain_seen.load(Ordering::Acquire);
            // As HTTP client pools do, a kept-alive connection the server has closed is not
            // reused: a request sent on it never reached the daemon.
            if reused && !still_waiting(&stream) {
                break;
            }
            reused = true;
            if stream.write_all(request.as_bytes()).is_err() {
                // Closed before the request left: it never reached the daemon.
                break;
            }
            let Some(response) = read_response(&mut stream) else {
                tally.dropped += 1;
                break;
            };
            assert_eq!(response.status, 200, "{}", response.body);
            tally.responses += 1;
            let close = response
                .header("connection")
                .is_some_and(|value| value.eq_ignore_ascii_case("close"));
            if close {
                drain_seen.store(true, Ordering::Release);
                break;
            }
            if after_drain {
                tally.kept_alive_in_drain += 1;
            }
        }
    }
    tally
}

#[test]
fn sigterm_while_keep_alive_clients_post_answers_every_request_with_connection_close() {
    let mut daemon = support::serve_drain(20, "sigterm-keep-alive");
    let addr = daemon.addr();
    // A WebSocket that never answers the close frame keeps the first stage of the drain open
    // for its whole budget, as a busy daemon's sockets do.
    let bearer = format!("Bearer {TOKEN}");
    let (_socket, _) = support::ws_connect(addr, &[("Authorization", &bearer)])
        .unwrap_or_else(|(status, _)| panic!("websocket refused with {status}"));
    let drain_seen = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..64)
        .map(|index| {
            let drain_seen = Arc::clone(&drain_seen);
            thread::spawn(move || keep_posting(addr, index, &drain_seen))
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    daemon.signal("TERM");
    // `/ready` turns 503 when the drain begins: any request sent after that must be answered
    // with `Connection: close`.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) && !drain_seen.load(Ordering::Acquire) {
        let Ok(mut probe) = TcpStream::connect(addr) else {
            break;
        };
        let _ = probe.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if read_response(&mut probe).is_some_and(|response| response.status == 503) {
            drain_seen.store(true, Ordering::Release);
        }
        thread::sleep(Duration::from_millis(2));
    }
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
    let responses: u64 = tallies.iter().map(|t| t.responses).sum();
    let dropped: u64 = tallies.iter().map(|t| t.dropped).sum();
    let kept_alive: u64 = tallies.iter().map(|t| t.kept_alive_in_drain).sum();
    eprintln!("{responses} responses, {dropped} dropped, {kept_alive} kept alive in the drain");
    assert!(responses >= 64, "only {responses} responses");
    // A request written just as the drain closes an idle keep-alive connection can meet the
    // close: HTTP/1.1's own race (RFC 9112 section 9.3.1 has clients retry such a request).
    // The drain's last call (250 ms) makes it rare; it takes a client starved of CPU for that
    // long to hit it. Under emulation (`cargo xtask test-cross`, qemu-user) the daemon runs
    // about ten times slower than its native clients and it happens (3 of 425 once in CI);
    // natively it happened twice, both times with a parallel release build starving the
    // clients. So the emulated run checks the `Connection: close` promise, and the native run
    // also that at most 2 of the hundreds of requests met the race: more is a drain that
    // drops requests, not a client that came late.
    if !emulated() {
        assert!(
            dropped <= 2,
            "{dropped} requests left unanswered ({responses} answered)"
        );
    }
    assert_eq!(
        kept_alive, 0,
        "responses during the drain without Connection: close"
    );
}

#[test]
fn sigterm_during_a_slow_head_flood_exits_without_waiting_for_the_heads() {
    let mut daemon = support::serve_drain(1500, "sigterm-slow-heads");
    let addr = daemon.addr();
    let heads: Vec<TcpStream> = (0..32u8)
        .map(|index| {
            let mut stream = connect_from(Ipv4Addr::new(127, 0, 2, index % 8 + 1), addr).unwrap();
            stream.write_all(INCOMPLETE_HEAD).unwrap();
            stream
        })
        .collect();
    // A request the daemon is answering when the drain begins (its reply takes 1.5 s).
    let mut in_flight = connect(addr);
    let body = r#"{"content":"in flight"}"#;
    in_flight
        .write_all(http::message_request(TOKEN, body).as_bytes())
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    daemon.signal("TERM");
    let response = read_response(&mut in_flight);
    let exit = daemon.wait(support::EXIT_TIMEOUT);
    let took = signalled.elapsed();
    eprintln!(
        "exited {exit:?} {took:?} after SIGTERM with {} slow heads open",
        heads.len()
    );
    let response = response.expect("the request in flight was answered");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        took < Duration::from_secs(5),
        "the drain waited {took:?} for heads that never complete (grace 10 s)"
    );
    assert_eq!(exit.code(), Some(0));
}

/// Returns whether the daemon under test runs through cargo's target runner (qemu-user).
fn emulated() -> bool {
    let runner = format!(
        "CARGO_TARGET_{}_RUNNER",
        env!("BLUFIO_TARGET").to_uppercase().replace('-', "_")
    );
    std::env::var(runner).is_ok_and(|value| !value.trim().is_empty())
}
