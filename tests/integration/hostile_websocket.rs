//! `/ws` against hostile and careless clients: fragment floods, dripped messages, memory held
//! by messages in assembly, frame shapes, and token rotation, over real sockets (a raw client
//! that writes frames byte for byte, and async-tungstenite where a real client will do).

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use async_tungstenite::tungstenite::Message;
use blufio::{Config, Provider, Secret};
use blufio_testkit::ws::client_frame;
use futures_lite::StreamExt;

use crate::{
    fake_provider::{self, FakeProvider},
    prometheus,
    support::{self, TOKEN, start_gateway},
};

/// A WebSocket client that writes frames as given and reads the server's frames raw.
struct RawWs {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// A frame from the server: opcode, FIN, payload.
#[derive(Debug)]
struct ServerFrame {
    opcode: u8,
    fin: bool,
    payload: Vec<u8>,
}

impl RawWs {
    fn connect(addr: SocketAddr) -> RawWs {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        // One write, as a browser sends it (the split heads are hostile_edge's business).
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {TOKEN}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buffer = Vec::new();
        let end = loop {
            if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let read = stream.read(&mut chunk).unwrap();
            assert!(read > 0, "closed during the handshake");
            buffer.extend_from_slice(&chunk[..read]);
        };
        assert!(buffer.starts_with(b"HTTP/1.1 101"), "{buffer:?}");
        buffer.drain(..end);
        RawWs { stream, buffer }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Returns the next frame within `within`; `None` on timeout, end of stream or reset.
    fn next_frame(&mut self, within: Duration) -> Option<ServerFrame> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    }

    /// Reads frames (skipping pings) until a close frame; returns its code.
    fn close_code(&mut self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let frame = self.next_frame(left)?;
            if frame.opcode == 8 {
                return Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
            }
        }
    }

    /// Returns the next text message's JSON (fragments joined).
    fn next_json(&mut self) -> serde_json::Value {
        let mut text = Vec::new();
        loop {
            let frame = self
                .next_frame(Duration::from_secs(10))
                .expect("a reply frame");
            match frame.opcode {
                9 | 10 => continue,
                1 | 0 => {
                    text.extend_from_slice(&frame.payload);
                    if frame.fin {
                        return serde_json::from_slice(&text).unwrap();
                    }
                }
                other => panic!("unexpected opcode {other}"),
            }
        }
    }
}

fn parse_server_frame(bytes: &[u8]) -> Option<(ServerFrame, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let (length, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        short => (short as usize, 2),
    };
    let payload = bytes.get(header..header + length)?.to_vec();
    Some((
        ServerFrame {
            opcode: first & 0x0f,
            fin: first & 0x80 != 0,
            payload,
        },
        header + length,
    ))
}

fn connection_memory(daemon: &support::TestDaemon) -> f64 {
    prometheus::parse(&daemon.get_ok("/metrics"))
        .value("blufio_connection_memory_bytes", &[])
        .unwrap()
}

fn error_count(daemon: &support::TestDaemon, kind: &str) -> f64 {
    prometheus::parse(&daemon.get_ok("/metrics"))
        .value("blufio_errors_total", &[("type", kind)])
        .unwrap_or(0.0)
}

#[test]
fn a_flood_of_empty_continuation_frames_is_closed_with_1009() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = RawWs::connect(daemon.gateway_addr());
    let mut flood = client_frame(1, false, b"{");
    for _ in 0..5_000 {
        flood.extend_from_slice(&client_frame(0, false, b""));
    }
    // The server may close before it has read all of it.
    let _ = ws.send(&flood);
    assert_eq!(ws.close_code(Duration::from_secs(10)), Some(1009));
    assert_eq!(error_count(&daemon, "payload_too_large"), 1.0);
    daemon.stop();
}

#[test]
fn a_message_dripped_in_one_byte_fragments_is_closed_at_the_request_timeout() {
    let daemon = support::start_gateway_with(|config| config.daemon.request_timeout_secs = 2);
    let mut ws = RawWs::connect(daemon.gateway_addr());
    let started = Instant::now();
    ws.send(&client_frame(1, false, b"{")).unwrap();
    let code = loop {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "the dripped message is still open after 12 s"
        );
        // Every fragment is progress, so the stall deadline alone never fires.
        if ws.send(&client_frame(0, false, b" ")).is_err() {
            break ws.close_code(Duration::from_secs(1));
        }
        if let Some(frame) = ws.next_frame(Duration::from_millis(200))
            && frame.opcode == 8
        {
            break Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
        }
    };
    let open_for = started.elapsed();
    assert_eq!(code, Some(1008));
    assert!(
        open_for >= Duration::from_millis(1500) && open_for < Duration::from_secs(8),
        "closed after {open_for:?} with a 2 s timeout"
    );
    assert_eq!(error_count(&daemon, "body_timeout"), 1.0);
    daemon.stop();
}

#[test]
fn fragmented_messages_within_the_bounds_are_answered() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = RawWs::connect(daemon.gateway_addr());
    let text = br#"{"content": "hello in pieces"}"#;
    let mut frames = Vec::new();
    for (index, chunk) in text.chunks(2).enumerate() {
        let opcode = if index == 0 { 1 } else { 0 };
        let fin = (index + 1) * 2 >= text.len();
        frames.extend_from_slice(&client_frame(opcode, fin, chunk));
        // A ping in the middle of a message is allowed and answered.
        if index == 3 {
            frames.extend_from_slice(&client_frame(9, true, b"mid"));
        }
    }
    ws.send(&frames).unwrap();
    let reply = ws.next_json();
    assert_eq!(reply["content"], "re: hello in pieces (history 0)");
    assert_eq!(reply["type"], "reply");
    daemon.stop();
}

#[test]
fn a_message_in_assembly_is_charged_as_connection_memory() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = RawWs::connect(daemon.gateway_addr());
    let idle = connection_memory(&daemon);
    let mut text = br#"{"content": "big"#.to_vec();
    text.resize(60_000, b'g');
    text.extend_from_slice(br#""}"#);
    let frame = client_frame(1, true, &text);
    // The header declares 60,002 bytes; tungstenite reserves them as soon as it reads it.
    ws.send(&frame[..100]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connection_memory(&daemon) < idle + 60_000.0 {
        assert!(
            Instant::now() < deadline,
            "connection memory stayed at {} (idle {idle})",
            connection_memory(&daemon)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ws.send(&frame[100..]).unwrap();
    let reply = ws.next_json();
    assert_eq!(reply["type"], "reply");
    // The scrape's own connection is charged too, and the previous scrape's may still be
    // closing on a loaded machine: wait for the charge to settle back to the idle figure.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = connection_memory(&daemon);
        if now == idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connection memory stayed at {now} after the message (idle {idle})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.stop();
}

#[test]
fn long_replies_go_out_in_frames_of_at_most_4_kib() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = RawWs::connect(daemon.gateway_addr());
    // Two-byte characters, so a 4 KiB cut would fall inside one unless it backs off.
    let content = "é".repeat(5_001);
    let message = serde_json::json!({ "content": content }).to_string();
    ws.send(&client_frame(1, true, message.as_bytes())).unwrap();
    let mut frames = Vec::new();
    loop {
        let frame = ws.next_frame(Duration::from_secs(10)).expect("a frame");
        if frame.opcode == 9 {
            continue;
        }
        let fin = frame.fin;
        frames.push(frame);
        if fin {
            break;
        }
    }
    assert!(frames.len() >= 3, "{} frame(s)", frames.len());
    assert_eq!(frames[0].opcode, 1);
    for frame in &frames {
        assert!(frame.payload.len() <= 4096, "{} bytes", frame.payload.len());
        assert!(std::str::from_utf8(&frame.payload).is_ok());
    }
    assert!(frames[1..].iter().all(|frame| frame.opcode == 0));
    let joined: Vec<u8> = frames.into_iter().flat_map(|frame| frame.payload).collect();
    let reply: serde_json::Value = serde_json::from_slice(&joined).unwrap();
    assert_eq!(reply["content"], format!("re: {content} (history 0)"));
    daemon.stop();
}

#[test]
fn every_frame_the_server_sends_names_its_type() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = support::ws_authed(&daemon);
    let reply = support::ws_exchange(&mut ws, r#"{"content": "hello"}"#);
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["content"], "re: hello (history 0)");
    assert!(reply["session_id"].is_string() && reply["usage"].is_object());
    for (frame, code) in [
        ("not json", "invalid_json"),
        (r#"{"content": "  "}"#, "bad_request"),
        (
            r#"{"session_id": "00000000000000000000000000000000", "content": "x"}"#,
            "session_mismatch",
        ),
        (r#"{"content": "upstream"}"#, "agent_upstream"),
    ] {
        let error = support::ws_exchange(&mut ws, frame);
        assert_eq!(error["type"], "error", "{frame}: {error}");
        assert_eq!(error["error"], code);
        assert!(error["message"].is_string());
    }
    let frames = async_io::block_on(async {
        ws.send(Message::binary(b"{}".to_vec())).await.unwrap();
        ws.send(Message::text(r#"{"content": "streamed", "stream": true}"#))
            .await
            .unwrap();
        let mut frames = Vec::new();
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message.unwrap() {
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                let done = frame["type"] == "done";
                frames.push(frame);
                if done {
                    return frames;
                }
            }
        }
        panic!("the stream ended without a done frame: {frames:?}");
    });
    assert_eq!(frames[0]["type"], "error", "binary: {}", frames[0]);
    assert_eq!(frames[0]["error"], "bad_request");
    assert!(frames[1..].iter().all(|frame| frame["type"].is_string()));
    daemon.stop();
}

#[test]
fn rotating_the_token_closes_websockets_opened_with_the_old_one() {
    let name = "ws-token-rotation";
    let dir = support::temp_dir(name);
    let token_path = dir.join("token");
    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    let port = support::free_port();
    let config = |warn_mb: u64| {
        format!(
            "[daemon]\nhealth_port = {port}\nmemory_warn_mb = {warn_mb}\n[gateway]\nport = {port}\n\
             token_file = {:?}\n[agent]\nprovider = \"echo\"\n",
            token_path.display().to_string()
        )
    };
    let mut daemon = support::serve(&config(100), name);
    let addr = daemon.addr();
    let expect_log = |needle: &str| daemon.wait_for_line(needle, Duration::from_secs(20));
    let hup = || {
        daemon.signal("HUP");
    };
    let auth = format!("Bearer {TOKEN}");
    let (mut ws, _) = support::ws_connect(addr, &[("Authorization", &auth)]).unwrap();
    assert_eq!(
        support::ws_exchange(&mut ws, r#"{"content": "before"}"#)["content"],
        "before"
    );

    // A reload that keeps the token keeps the socket.
    std::fs::write(daemon.config(), config(120)).unwrap();
    hup();
    expect_log("reloaded");
    assert_eq!(
        support::ws_exchange(&mut ws, r#"{"content": "same token"}"#)["content"],
        "same token"
    );

    std::fs::write(&token_path, "rotated-token-0987654321\n").unwrap();
    hup();
    let line = expect_log("reloaded");
    assert!(line.contains("[gateway] token"), "{line}");
    let started = Instant::now();
    let frame = async_io::block_on(futures_lite::future::or(
        async { support::ws_close_frame(&mut ws).await },
        async {
            async_io::Timer::after(Duration::from_secs(10)).await;
            panic!("the socket opened with the old token is still open 10 s after the reload");
        },
    ));
    assert_eq!(u16::from(frame.unwrap().code), 1008);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed {:?} after the reload",
        started.elapsed()
    );
    // The new token opens a new socket.
    let (mut fresh, _) = support::ws_connect(
        addr,
        &[("Authorization", "Bearer rotated-token-0987654321")],
    )
    .unwrap();
    assert_eq!(
        support::ws_exchange(&mut fresh, r#"{"content": "after"}"#)["content"],
        "after"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
}

/// Returns `/health`'s `memory_heap_bytes` from the first monitor tick that ran entirely after
/// this call: the value changes at every tick, so the second change seen is such a tick.
fn heap_after_next_tick(addr: SocketAddr) -> f64 {
    let heap = || {
        support::request(addr, "GET", "/health", &[], None).json()["memory_heap_bytes"]
            .as_f64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = heap();
    let mut changes = 0;
    while changes < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = heap();
        if now != last {
            changes += 1;
            last = now;
        }
    }
    last
}

fn gauge(addr: SocketAddr, name: &str) -> f64 {
    prometheus::parse(&support::request(addr, "GET", "/metrics", &[], None).body)
        .value(name, &[])
        .unwrap()
}

#[test]
fn idle_websockets_hold_at_most_16_kib_of_heap_each_and_are_charged_as_connections() {
    const SOCKETS: usize = 400;
    // The real binary, so the heap that `/health` reports is the daemon's alone.
    let name = "ws-idle-heap";
    let port = support::free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nmonitor_interval_secs = 1\n\
         max_connections_per_ip = 1000\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\nmax_sessions = 1000\n\
         [agent]\nprovider = \"echo\"\n"
    );
    let mut daemon = support::serve(&config, name);
    let addr = daemon.addr();
    // Warm up the allocator's caches and the session registry with sockets that come and go.
    drop((0..20).map(|_| RawWs::connect(addr)).collect::<Vec<_>>());
    support::request(addr, "GET", "/metrics", &[], None);
    let before = heap_after_next_tick(addr);
    let memory_before = gauge(addr, "blufio_connection_memory_bytes");

    let sockets: Vec<RawWs> = (0..SOCKETS).map(|_| RawWs::connect(addr)).collect();
    let during = heap_after_next_tick(addr);
    let per_socket = (during - before) / SOCKETS as f64;
    assert!(
        per_socket <= 16.0 * 1024.0,
        "an idle WebSocket holds {per_socket:.0} bytes of heap (before {before}, with \
         {SOCKETS} sockets {during})"
    );
    // Still open and tracked after the connection's own task has ended, and charged what
    // they hold (give or take a probe connection the daemon has not yet seen close).
    assert!(gauge(addr, "blufio_open_connections") >= SOCKETS as f64);
    let charged = (gauge(addr, "blufio_connection_memory_bytes") - memory_before) / SOCKETS as f64;
    let cost = blufio::internals::connection::UPGRADED_COST_BYTES as f64;
    assert!(
        (charged - cost).abs() < 1024.0,
        "each socket is charged {charged:.0} bytes, not {cost}"
    );

    drop(sockets);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge(addr, "blufio_connection_memory_bytes") > memory_before {
        assert!(
            Instant::now() < deadline,
            "closed sockets are still charged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
}

#[test]
fn shutdown_ends_a_websocket_stream_with_a_shutting_down_frame_then_1001() {
    let fake = FakeProvider::start();
    fake.push([fake_provider::anthropic_hanging(30)]);
    let mut config = support::config_with_token(TOKEN);
    config.agent.provider = Provider::Anthropic;
    config.agent.base_url = Some(fake.url());
    config.agent.model = Some("claude-sonnet-4-5".to_owned());
    config.agent.api_key = Some(Secret::new("sk-ws-shutdown-0123456789"));
    config.agent.timeout_secs = 10;
    let daemon = support::start(config);
    let mut ws = RawWs::connect(daemon.gateway_addr());
    ws.send(&client_frame(
        1,
        true,
        br#"{"content": "a long story", "stream": true}"#,
    ))
    .unwrap();
    while ws.next_json()["type"] != "delta" {}
    let stopping = std::thread::spawn(move || daemon.stop());
    let mut texts = Vec::new();
    let code = loop {
        let frame = ws
            .next_frame(Duration::from_secs(10))
            .expect("frames until a close, not a reset");
        match frame.opcode {
            1 => texts.push(serde_json::from_slice::<serde_json::Value>(&frame.payload).unwrap()),
            8 => break u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
            _ => {}
        }
    };
    let last = texts.last().expect("a frame before the close");
    assert_eq!(last["type"], "error", "{texts:?}");
    assert_eq!(last["error"], "shutting_down", "{texts:?}");
    assert_eq!(code, 1001);
    stopping.join().unwrap();
}
