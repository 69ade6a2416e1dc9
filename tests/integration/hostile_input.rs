//! Bad input from an anonymous or careless world, over real sockets and the real binary:
//! oversized and special config files, bad tokens, credentials in trace logs, floods of
//! failing clients in the log, malformed request lines, invalid UTF-8 and abusive JSON,
//! WebSocket protocol violations. Each case checks the answer, the counter and that the
//! daemon keeps serving.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use async_tungstenite::tungstenite::Message;
use blufio::Config;
use blufio_testkit::assert_contains;
use blufio_testkit::http;
use blufio_testkit::process::{Daemon, write_config};

use crate::{
    prometheus,
    support::{
        self, TOKEN, TestDaemon, free_port, start_gateway, temp_dir, wait_for_active_sessions,
    },
};

fn error_count(daemon: &TestDaemon, kind: &str) -> f64 {
    prometheus::parse(&daemon.get_ok("/metrics"))
        .value("blufio_errors_total", &[("type", kind)])
        .unwrap_or(0.0)
}

/// The daemon still answers its probe (its status may be "degraded" when the whole test
/// process, which hosts many daemons, and qemu on ARM, is over the RSS limit).
fn assert_serving(daemon: &TestDaemon) {
    let response = daemon.get("/health");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response.json()["status"].is_string());
}

/// Sends an authenticated `POST /v1/messages` whose body is raw bytes.
fn post_bytes(daemon: &TestDaemon, content_type: &str, body: &[u8]) -> support::Response {
    let mut raw = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    support::send_raw(daemon.gateway_addr(), &raw)
}

#[test]
fn invalid_utf8_in_a_json_body_gets_400_invalid_json() {
    let daemon = start_gateway(Config::for_tests());
    let body = b"{\"content\": \"caf\xe9 au lait\"}";
    for content_type in ["application/json", "application/json; charset=iso-8859-1"] {
        let response = post_bytes(&daemon, content_type, body);
        response.assert_error(400, "invalid_json");
        let message = response.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("not UTF-8"), "{message}");
        assert!(message.contains("offset 16"), "{message}");
    }
    assert_eq!(error_count(&daemon, "bad_request"), 2.0);
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    assert_serving(&daemon);
    daemon.stop();
}

#[test]
fn deeply_nested_json_gets_400_without_overflowing_the_stack() {
    let daemon = support::start_gateway_with(|config| config.gateway.max_message_bytes = 400_000);
    let deep = "[".repeat(100_000);
    let bodies = [
        deep.clone(),
        format!("{{\"content\": {deep}"),
        format!("{{\"content\": \"x\", \"session_id\": {deep}"),
        format!("{}{}", "{\"a\":".repeat(60_000), "1"),
    ];
    for body in &bodies {
        post_bytes(&daemon, "application/json", body.as_bytes()).assert_error(400, "invalid_json");
    }
    assert_eq!(error_count(&daemon, "bad_request"), bodies.len() as f64);
    assert_serving(&daemon);
    daemon.stop();
}

#[test]
fn abusive_json_gets_400_and_a_huge_string_within_the_limit_is_served() {
    let daemon = start_gateway(Config::for_tests());
    let refused = [
        (r#"{"content": 5}"#, "invalid type"),
        (r#"{"content": null}"#, "invalid type"),
        (r#"{"content": ["a"]}"#, "invalid type"),
        (r#"{"session_id": 7, "content": "x"}"#, "invalid type"),
        (
            r#"{"content": "a", "content": "b"}"#,
            "duplicate field `content`",
        ),
        (
            r#"{"content": "x", "admin": true}"#,
            "unknown field `admin`",
        ),
        (
            r#"{"content": "x"} {"content": "y"}"#,
            "trailing characters",
        ),
        (r#"{"content": "\ud800"}"#, "escape"),
        (r#"{"content": "x""#, "EOF"),
        ("", "EOF"),
    ];
    for (body, expected) in refused {
        let response = post_bytes(&daemon, "application/json", body.as_bytes());
        response.assert_error(400, "invalid_json");
        let message = response.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(expected), "{body}: {message}");
    }
    assert_eq!(error_count(&daemon, "bad_request"), refused.len() as f64);

    // A string just under the body limit is an ordinary message.
    let content = "a".repeat(60_000);
    let response = post_bytes(
        &daemon,
        "application/json",
        format!("{{\"content\": \"{content}\"}}").as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", &response.body[..200]);
    assert_eq!(
        response.json()["content"],
        format!("re: {content} (history 0)")
    );
    assert_eq!(error_count(&daemon, "bad_request"), refused.len() as f64);
    assert_serving(&daemon);
    daemon.stop();
}

#[test]
fn malformed_request_lines_and_header_lines_get_400_and_the_daemon_keeps_serving() {
    let daemon = start_gateway(Config::for_tests());
    let malformed: [&[u8]; 9] = [
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n folded continuation\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /he\x7flth HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for request in malformed {
        let response = support::send_raw(daemon.addr(), request);
        assert_eq!(
            response.status,
            400,
            "{:?}: {response:?}",
            String::from_utf8_lossy(request)
        );
        assert_eq!(response.header("connection"), Some("close"), "{response:?}");
        assert_serving(&daemon);
    }
    daemon.stop();
}

/// Reads `count` responses (with `Content-Length` bodies) from one connection.
fn read_responses(stream: &mut TcpStream, count: usize) -> Vec<support::Response> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let mut responses = Vec::new();
    let mut rest = raw.as_slice();
    while responses.len() < count {
        let head_end = rest
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{} responses only", responses.len()))
            + 4;
        let head = support::parse_response(&rest[..head_end]);
        let length: usize = head
            .header("content-length")
            .map_or(0, |length| length.parse().unwrap());
        responses.push(support::parse_response(&rest[..head_end + length]));
        rest = &rest[head_end + length..];
    }
    responses
}

#[test]
fn pipelined_requests_with_a_bad_body_in_the_middle_are_answered_in_order() {
    let daemon = start_gateway(Config::for_tests());
    let bad_body = b"{\"content\": \"\xff\"}";
    let mut raw = Vec::new();
    raw.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    raw.extend_from_slice(
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            bad_body.len()
        )
        .as_bytes(),
    );
    raw.extend_from_slice(bad_body);
    raw.extend_from_slice(
        format!(
            "GET /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let mut stream = TcpStream::connect(daemon.gateway_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&raw).unwrap();
    let responses = read_responses(&mut stream, 3);
    assert_eq!(responses[0].status, 200);
    assert!(responses[0].json()["status"].is_string());
    responses[1].assert_error(400, "invalid_json");
    assert_eq!(responses[2].status, 200);
    assert_eq!(responses[2].json()["sessions"], serde_json::json!([]));
    assert_eq!(error_count(&daemon, "bad_request"), 1.0);
    daemon.stop();
}

#[test]
fn the_token_is_in_no_response() {
    let daemon = start_gateway(Config::for_tests());
    let wrong = format!("Bearer {}x", &TOKEN[..TOKEN.len() - 1]);
    let auth = format!("Bearer {TOKEN}");
    let subprotocol = format!("blufio.v1, bearer.{TOKEN}");
    let responses = [
        daemon.gateway("GET", "/v1/health", &[], None),
        daemon.gateway("GET", "/v1/sessions", &[("Authorization", &wrong)], None),
        daemon.authed(TOKEN, "GET", "/v1/health", None),
        daemon.authed(TOKEN, "POST", "/v1/messages", Some("{not json")),
        daemon.authed(TOKEN, "GET", "/v1/sessions/nope", None),
        daemon.gateway("GET", "/ws", &[("Authorization", &auth)], None),
        daemon.gateway(
            "GET",
            "/ws",
            &[("Sec-WebSocket-Protocol", &subprotocol)],
            None,
        ),
    ];
    for response in &responses {
        assert!(!format!("{response:?}").contains(TOKEN), "{response:?}");
    }
    assert_eq!(responses[0].status, 401);
    assert_eq!(responses[1].status, 401);
    assert_eq!(responses[2].status, 200);

    let (mut ws, selected) = support::ws_connect(
        daemon.gateway_addr(),
        &[("Sec-WebSocket-Protocol", &subprotocol)],
    )
    .unwrap();
    assert_eq!(selected.as_deref(), Some("blufio.v1"));
    let reply = support::ws_exchange(&mut ws, "{broken");
    assert!(!reply.to_string().contains(TOKEN), "{reply}");
    daemon.stop();
}

/// Opens `/ws` by hand, so the test can write frames no client library would.
fn raw_websocket(addr: SocketAddr) -> TcpStream {
    let mut stream = http::connect_with_timeout(addr, Duration::from_secs(30));
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Encodes a client frame: `first` is FIN/RSV/opcode; `declared` overrides the length.
fn frame(first: u8, payload: &[u8], masked: bool, declared: Option<u64>) -> Vec<u8> {
    let length = declared.unwrap_or(payload.len() as u64);
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    if length < 126 {
        out.push(mask_bit | length as u8);
    } else if length <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(length as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&length.to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads server frames until a close frame and returns its status code.
fn close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).unwrap();
        let mut length = u64::from(header[1] & 0x7f);
        if length == 126 {
            let mut bytes = [0u8; 2];
            stream.read_exact(&mut bytes).unwrap();
            length = u64::from(u16::from_be_bytes(bytes));
        } else if length == 127 {
            let mut bytes = [0u8; 8];
            stream.read_exact(&mut bytes).unwrap();
            length = u64::from_be_bytes(bytes);
        }
        let mut payload = vec![0u8; length as usize];
        stream.read_exact(&mut payload).unwrap();
        if header[0] & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[test]
fn websocket_protocol_errors_close_with_1002_1007_and_1009() {
    let daemon = start_gateway(Config::for_tests());
    let cases: [(&str, Vec<u8>, u16); 5] = [
        // Declares 1 MB against the 64 KiB limit: refused from the header alone.
        (
            "oversized frame",
            frame(0x81, &[], true, Some(1_000_000)),
            1009,
        ),
        (
            "text frame that is not UTF-8",
            frame(0x81, b"{\"content\": \"\xff\xfe\"}", true, None),
            1007,
        ),
        (
            "unmasked client frame",
            frame(0x81, b"{\"content\": \"hi\"}", false, None),
            1002,
        ),
        (
            "reserved bit set",
            frame(0xc1, b"{\"content\": \"hi\"}", true, None),
            1002,
        ),
        ("fragmented ping", frame(0x09, b"ping", true, None), 1002),
    ];
    for (name, bytes, expected) in &cases {
        let mut stream = raw_websocket(daemon.gateway_addr());
        stream.write_all(bytes).unwrap();
        assert_eq!(close_code(&mut stream), Some(*expected), "{name}");
    }
    // A message split into frames that together pass the limit gets 1009 from a real client.
    let mut ws = support::ws_authed(&daemon);
    let close = async_io::block_on(async {
        ws.send(Message::text("a".repeat(70_000))).await.unwrap();
        support::ws_close_frame(&mut ws).await
    });
    assert_eq!(u16::from(close.unwrap().code), 1009);

    wait_for_active_sessions(&daemon, 0);
    assert_eq!(error_count(&daemon, "websocket_protocol"), 4.0);
    assert_eq!(error_count(&daemon, "payload_too_large"), 2.0);
    // The daemon keeps serving WebSockets.
    let mut ws = support::ws_authed(&daemon);
    let reply = support::ws_exchange(&mut ws, r#"{"content": "still here"}"#);
    assert_eq!(reply["content"], "re: still here (history 0)");
    assert_serving(&daemon);
    daemon.stop();
}

/// Starts `blufio serve` on `config` (written next to any files the test put in `dir`), with
/// `BLUFIO_LOG` set to `log_env` or unset, and waits for its "listening on" line.
fn start_binary(dir: &std::path::Path, config: &str, log_env: Option<&str>) -> Daemon {
    let path = write_config(dir, config);
    let mut command = support::binary().serve_command(&path);
    command.env_remove("BLUFIO_LOG");
    if let Some(filter) = log_env {
        command.env("BLUFIO_LOG", filter);
    }
    Daemon::start(&mut command, path)
}

/// Sends SIGTERM, waits for exit 0 and returns everything the daemon wrote to stderr.
fn stop_binary(mut daemon: Daemon) -> String {
    daemon.shut_down(Duration::from_secs(30)).join("\n")
}

#[test]
fn trace_logs_carry_no_token_in_headers_subprotocols_or_messages() {
    let dir = temp_dir("trace-redaction");
    let token = "trace-secret-0123456789abcdef";
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    let port = free_port();
    let binary = start_binary(
        &dir,
        &format!(
            "[daemon]\nhealth_port = {port}\nlog_level = \"trace\"\n\
             [gateway]\nport = {port}\ntoken_file = \"token\"\n[agent]\nprovider = \"echo\"\n"
        ),
        None,
    );
    let addr = binary.addr();
    let auth = format!("Bearer {token}");
    let response = support::request(
        addr,
        "POST",
        "/v1/messages",
        &[
            ("Authorization", &auth),
            ("X-Api-Key", token),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"content": "hello"}"#),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let wrong = support::request(
        addr,
        "GET",
        "/v1/health",
        &[("Authorization", "Bearer presented-but-wrong-0123456789")],
        None,
    );
    assert_eq!(wrong.status, 401);
    let protocols = format!("blufio.v1, bearer.{token}");
    let (mut ws, _) = support::ws_connect(addr, &[("Sec-WebSocket-Protocol", &protocols)]).unwrap();
    let reply = support::ws_exchange(&mut ws, r#"{"content": "over ws"}"#);
    assert_eq!(reply["content"], "over ws");
    async_io::block_on(ws.close(None)).unwrap();

    let log = stop_binary(binary);
    assert!(!log.contains(token), "token in the log:\n{log}");
    assert!(!log.contains("presented-but-wrong"), "{log}");
    // The heads were logged (trace is on) with their credentials replaced.
    assert!(log.contains("received:"), "{log}");
    assert!(log.contains("Authorization: <redacted>"), "{log}");
    assert!(log.contains("bearer.<redacted>"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_flood_of_stalled_clients_logs_at_most_one_error_line() {
    let dir = temp_dir("error-flood");
    let port = free_port();
    let binary = start_binary(
        &dir,
        &format!(
            "[daemon]\nhealth_port = {port}\nrequest_timeout_secs = 1\n[gateway]\nport = {port}\n"
        ),
        Some("info"),
    );
    let clients: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut stream = TcpStream::connect(binary.addr()).unwrap();
            stream.write_all(b"GET /hea").unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            stream
        })
        .collect();
    for mut stream in clients {
        // The stall deadline closes each one.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    assert_eq!(
        support::request(binary.addr(), "GET", "/health", &[], None).status,
        200
    );
    let log = stop_binary(binary);
    let error_lines: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.starts_with("[ERROR")
                && line.contains("http error from")
                && !line.contains("more like this")
        })
        .collect();
    assert!(error_lines.len() <= 1, "{log}");
    if error_lines.len() == 1 {
        // The rest were counted, and the count was written at exit.
        assert!(
            log.lines()
                .any(|line| line.starts_with("[ERROR") && line.contains("39 more like this")),
            "{log}"
        );
    }
    assert!(log.lines().count() < 10, "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_config_of_dev_zero_fails_fast_with_exit_78() {
    for command in ["serve", "check-config"] {
        let started = Instant::now();
        let output = support::binary().run(&[command, "--config", "/dev/zero"]);
        let elapsed = started.elapsed();
        assert_eq!(output.status.code(), Some(78));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim(),
            "blufio: cannot read config file /dev/zero: is a character device, not a regular file"
        );
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        eprintln!("{command} --config /dev/zero: exit 78 in {elapsed:?}");
    }
}

#[test]
fn token_problems_name_their_source_exit_78_and_never_echo_the_token() {
    let dir = temp_dir("token-problems");
    let check = |config: &str, env_token: Option<&str>| {
        let path = dir.join("blufio.toml");
        std::fs::write(&path, config).unwrap();
        let mut command = support::binary().command();
        command.args(["check-config", "--config"]).arg(&path);
        match env_token {
            Some(token) => command.env("BLUFIO_GATEWAY_TOKEN", token),
            None => command.env_remove("BLUFIO_GATEWAY_TOKEN"),
        };
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), text)
    };
    let token_path = dir.join("token").display().to_string();

    let (code, text) = check("[gateway]\ntoken_file = \"token\"\n", None);
    assert_eq!(code, Some(78));
    assert_contains(&text, &format!("cannot read token file {token_path}: "));

    std::fs::write(dir.join("token"), "nul-inside-\0-0123456789\n").unwrap();
    let (code, text) = check("[gateway]\ntoken_file = \"token\"\n", None);
    assert_eq!(code, Some(78));
    assert!(
        text.contains(&format!(
            "[gateway] token_file: the token in {token_path} contains a NUL byte at byte 11"
        )),
        "{text}"
    );
    assert!(!text.contains("nul-inside"), "{text}");

    std::fs::write(dir.join("token"), "first-line-0123456789\nsecond-line\n").unwrap();
    let (code, text) = check("[gateway]\ntoken_file = \"token\"\n", None);
    assert_eq!(code, Some(78));
    assert!(text.contains("contains a line break at byte 21"), "{text}");
    assert!(!text.contains("first-line"), "{text}");

    let (code, text) = check("[gateway]\ntoken = \"hunter2\"\n", None);
    assert_eq!(code, Some(78));
    assert_contains(
        &text,
        "[gateway] token: the token is 7 bytes long; use at least 16",
    );
    assert!(!text.contains("hunter2"), "{text}");

    let (code, text) = check("", Some("two words-0123456789"));
    assert_eq!(code, Some(78));
    assert_contains(
        &text,
        "environment: BLUFIO_GATEWAY_TOKEN: the token contains whitespace at byte 3",
    );
    assert!(!text.contains("two words"), "{text}");

    std::fs::write(dir.join("token"), "fine-token-0123456789\n").unwrap();
    let (code, text) = check("[gateway]\ntoken_file = \"token\"\n", None);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("gateway token set"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
