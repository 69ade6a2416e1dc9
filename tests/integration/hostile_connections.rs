//! Connections that hold memory without finishing a request: partial heads, declared bodies
//! that never arrive. Their heap is charged to them as measured, they are shed before any
//! session is touched (also when the heap reading lags behind their closing), and a body that
//! misses its deadline is answered and closed at once. Real sockets throughout; the charge is
//! checked against the real binary's jemalloc.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use blufio::{ManualHeap, internals::connection::CONNECTION_BASE_BYTES};
use blufio_testkit::http;

use crate::{
    prometheus,
    support::{self, TOKEN, TestDaemon},
};

const MIB: u64 = 1024 * 1024;

fn connect(addr: SocketAddr) -> TcpStream {
    http::connect_with_timeout(addr, Duration::from_secs(10))
}

fn exposition(addr: SocketAddr) -> prometheus::Exposition {
    let response = support::request(addr, "GET", "/metrics", &[], None);
    assert_eq!(response.status, 200, "{}", response.body);
    prometheus::parse(&response.body)
}

fn error_count(daemon: &TestDaemon, kind: &str) -> f64 {
    exposition(daemon.addr())
        .value("blufio_errors_total", &[("type", kind)])
        .unwrap_or_else(|| panic!("no blufio_errors_total{{type={kind:?}}}"))
}

/// A request head that stops inside a 6,000-byte header, as a slow-head flood sends it.
fn partial_head() -> Vec<u8> {
    let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 6000));
    head.extend_from_slice(b"\r\n");
    head
}

/// An authenticated request head declaring a 64 KiB body, of which nothing is sent.
fn declared_body_head() -> Vec<u8> {
    format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 65536\r\n\r\n"
    )
    .into_bytes()
}

/// Waits until `condition` holds, checking every 10 ms for up to 10 s.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Counts the streams the server closes (end of stream or reset) within `within` in all.
fn count_closed(streams: &mut [TcpStream], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut closed = 0;
    for stream in streams {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(20));
        stream.set_read_timeout(Some(left)).unwrap();
        let mut sink = [0u8; 4096];
        loop {
            match stream.read(&mut sink) {
                Ok(0) => closed += 1,
                Ok(_) => continue,
                Err(error) if error.kind() == ErrorKind::ConnectionReset => closed += 1,
                Err(_) => {}
            }
            break;
        }
    }
    closed
}

/// The heap the real binary allocates, and what it charges to connections, after a fresh
/// monitor sample.
struct Reading {
    heap: f64,
    charged: f64,
}

fn read_after_fresh_sample(addr: SocketAddr) -> Reading {
    let ticks = |exposition: &prometheus::Exposition| {
        exposition
            .value("blufio_monitor_ticks_total", &[])
            .unwrap_or(0.0)
    };
    let start = ticks(&exposition(addr));
    wait_until("a monitor tick", || ticks(&exposition(addr)) > start);
    let exposition = exposition(addr);
    Reading {
        heap: exposition.value("blufio_memory_heap_bytes", &[]).unwrap(),
        charged: exposition
            .value("blufio_connection_memory_bytes", &[])
            .unwrap(),
    }
}

/// Reads once the connections have settled: the charge (a live gauge) did not move over a
/// whole sampling period, so the heap sample taken in it saw them as they are.
fn read_settled(addr: SocketAddr) -> Reading {
    let mut previous = read_after_fresh_sample(addr);
    for _ in 0..20 {
        let reading = read_after_fresh_sample(addr);
        if reading.charged == previous.charged {
            return reading;
        }
        previous = reading;
    }
    panic!("the connection charge never settled");
}

#[test]
fn the_memory_charged_to_connections_covers_what_the_real_binary_allocates_for_them() {
    const HELD: usize = 300;
    let port = support::free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nmonitor_interval_secs = 1\nmemory_warn_mb = 900\n\
         memory_limit_mb = 1000\nmax_connections = 1000\nmax_connections_per_ip = 1000\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n[agent]\nprovider = \"echo\"\n"
    );
    let mut daemon = support::serve(&config, "connection-charge");
    let addr = daemon.addr();
    // A request line in pieces is collected by the request-target transport, not trillium.
    let mut partial_line = b"GET /".to_vec();
    partial_line.extend(std::iter::repeat_n(b'a', 6000));
    let states: [(&str, Vec<u8>); 4] = [
        (
            "idle kept-alive",
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("partial 6,000-byte head", partial_head()),
        ("declared 64 KiB body, none sent", declared_body_head()),
        ("partial 6,000-byte request line", partial_line),
    ];
    let mut per_connection = Vec::new();
    for (state, bytes) in &states {
        let before = read_settled(addr);
        let mut held: Vec<TcpStream> = (0..HELD).map(|_| connect(addr)).collect();
        for stream in &mut held {
            stream.write_all(bytes).unwrap();
        }
        if *state == "idle kept-alive" {
            for stream in &mut held {
                let mut response = [0u8; 1024];
                assert!(stream.read(&mut response).unwrap() > 0);
            }
        }
        let after = read_settled(addr);
        let heap = (after.heap - before.heap) / HELD as f64;
        let charged = (after.charged - before.charged) / HELD as f64;
        per_connection.push((*state, heap, charged));
        drop(held);
    }
    daemon.kill();
    let report = format!("(state, heap, charged) per connection: {per_connection:?}");
    eprintln!("{report}");
    for (state, heap, charged) in &per_connection {
        // What the sessions see is the heap less the charge: an under-charge is session heap.
        assert!(*charged >= heap - 512.0, "{state}: under-charged; {report}");
        assert!(*charged <= 2.0 * heap, "{state}: over-charged; {report}");
    }
    // A declared body reserves nothing: the connection holds far less than 64 KiB.
    let (_, body_heap, _) = per_connection[2];
    assert!(body_heap < 40_000.0, "{report}");
}

/// The shared idle-session daemon: sessions count as idle for shedding after 2 s, and the
/// rest of the test has 6 s before the session would be closed as idle.
fn daemon_with_an_idle_session() -> (TestDaemon, Arc<ManualHeap>, String) {
    support::daemon_with_an_idle_session(8, Duration::from_millis(2200))
}

/// Opens `count` connections to the gateway that each send `head` and then wait.
fn hold(daemon: &TestDaemon, count: usize, head: &[u8]) -> Vec<TcpStream> {
    let mut held: Vec<TcpStream> = (0..count).map(|_| connect(daemon.gateway_addr())).collect();
    for stream in &mut held {
        stream.write_all(head).unwrap();
    }
    held
}

fn assert_session_untouched(daemon: &TestDaemon, id: &str) {
    let info = daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .json();
    assert_eq!(info["history_messages"], 6, "session trimmed: {info}");
    let exposition = exposition(daemon.addr());
    let shed = |reason| exposition.value("blufio_sessions_shed_total", &[("reason", reason)]);
    assert_eq!(shed("history_trimmed"), Some(0.0));
    assert_eq!(shed("pressure_evicted"), Some(0.0));
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(0.0));
}

#[test]
fn sessions_are_not_trimmed_when_shed_connections_still_show_in_the_next_heap_reading() {
    let (daemon, heap, id) = daemon_with_an_idle_session();
    let mut held = hold(&daemon, 150, &partial_head());
    // Each holds at least its base and the 6,000 header bytes it sent.
    let floor = 150 * (CONNECTION_BASE_BYTES + 6000);
    wait_until("the partial heads to be charged", || {
        daemon.ctx.connections.memory_bytes() >= floor
    });
    let charged = daemon.ctx.connections.memory_bytes();
    // 18 MiB of sessions, pushed past the 20 MiB warn threshold by the connections alone.
    let reading = 18 * MIB + charged;
    heap.set(reading);
    daemon.tick();
    wait_until("the shed connections to close", || {
        daemon.ctx.connections.open() == 0
    });
    let closed = count_closed(&mut held, Duration::from_secs(5));
    assert_eq!(closed, 150, "every partial head was shed");

    // The allocator has not returned their memory by the next sample (thread caches, frees
    // racing the read): that heap is still the connections', not the sessions'.
    daemon.tick();
    assert_session_untouched(&daemon, &id);
    let opened = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
    assert_eq!(opened.status, 201, "{}", opened.body);

    // The allowance lasts one period more, not for ever: a heap that stays up is the
    // sessions' own, and pressure follows.
    daemon.tick();
    daemon.tick();
    let exposition = exposition(daemon.addr());
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(1.0));
    assert!(
        error_count(&daemon, "connection_shed") >= 150.0,
        "every shed connection counted"
    );
    daemon.stop();
}

#[test]
fn connections_waiting_on_a_declared_body_are_shed_like_partial_heads() {
    let (daemon, heap, id) = daemon_with_an_idle_session();
    let mut held = hold(&daemon, 40, &declared_body_head());
    // Reading a body, each is charged its base and the request's state.
    let floor = 40
        * blufio::internals::connection::fixed_cost(
            blufio::internals::connection::Phase::Body,
            true,
        );
    wait_until("the body readers to be charged", || {
        daemon.ctx.connections.memory_bytes() >= floor
    });
    let charged = daemon.ctx.connections.memory_bytes();
    // 19.5 MiB of sessions, pushed past the 20 MiB warn threshold by the connections alone.
    heap.set(19 * MIB + MIB / 2 + charged);
    daemon.tick();
    let closed = count_closed(&mut held, Duration::from_secs(5));
    assert_eq!(closed, 40, "every body reader was shed");
    assert!(error_count(&daemon, "connection_shed") >= 40.0);
    heap.set(10 * MIB);
    assert_session_untouched(&daemon, &id);
    let answer = daemon.authed(
        TOKEN,
        "POST",
        "/v1/messages",
        Some(&format!(r#"{{"session_id": "{id}", "content": "four"}}"#)),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    daemon.stop();
}

#[test]
fn a_body_past_its_deadline_gets_408_and_the_socket_closes_at_once() {
    let daemon = support::start_gateway_with(|config| config.daemon.request_timeout_secs = 1);
    let mut stream = connect(daemon.gateway_addr());
    stream
        .write_all(
            format!(
                "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
    // One body byte every 100 ms: never a stall, so only the whole-body deadline ends it. The
    // client keeps sending after the answer, as a slow uploader would.
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut answered_at = None;
    let mut closed_at = None;
    stream.set_nonblocking(true).unwrap();
    while started.elapsed() < Duration::from_secs(8) {
        let _ = stream.write_all(b" ");
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => {
                closed_at = Some(started.elapsed());
                break;
            }
            Ok(read) => {
                raw.extend_from_slice(&buf[..read]);
                answered_at.get_or_insert(started.elapsed());
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {
                closed_at = Some(started.elapsed());
                break;
            }
        }
    }
    let response = support::parse_response(&raw);
    response.assert_error(408, "body_timeout");
    assert_eq!(response.header("connection"), Some("close"));
    let answered_at = answered_at.expect("an answer");
    let closed_at = closed_at.expect("the socket was never closed");
    assert!(
        answered_at < Duration::from_millis(2500),
        "answered after {answered_at:?}"
    );
    assert!(
        closed_at - answered_at < Duration::from_millis(600),
        "answered at {answered_at:?}, closed at {closed_at:?}"
    );
    assert_eq!(error_count(&daemon, "body_timeout"), 1.0);
    assert_eq!(error_count(&daemon, "bad_request"), 0.0);
    daemon.stop();
}
