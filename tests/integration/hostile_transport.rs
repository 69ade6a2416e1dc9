//! Hostile clients at the transport: HTTP/2 prefaces, drip-fed heads, slow bodies, floods past
//! the connection caps and the file-descriptor limit, oversized heads, odd request targets,
//! smuggling, and connections that hold memory. Real sockets throughout; every test also
//! checks that the daemon keeps serving and that the counters tell the story.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use blufio::{Config, Context, FixedRss, ManualHeap};
use blufio_testkit::http;

use crate::{
    prometheus,
    support::{self, TOKEN, TestDaemon, start_gateway},
};

const MIB: u64 = 1024 * 1024;

fn error_count(daemon: &TestDaemon, kind: &str) -> f64 {
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    exposition
        .value("blufio_errors_total", &[("type", kind)])
        .unwrap_or_else(|| panic!("no blufio_errors_total{{type={kind:?}}}"))
}

/// Asserts `/health` on `addr` answers 200 in under 50 ms: the best of three probes, since
/// the whole suite shares a few cores and one descheduled probe proves nothing about blufio.
fn assert_health_is_fast(addr: SocketAddr) {
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let response = support::request(addr, "GET", "/health", &[], None);
        fastest = fastest.min(started.elapsed());
        assert_eq!(response.status, 200, "{}", response.body);
    }
    assert!(
        fastest < Duration::from_millis(50),
        "/health took {fastest:?}"
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    http::connect_with_timeout(addr, Duration::from_secs(10))
}

/// Reads until the server closes; returns what it sent.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return raw,
            Ok(read) => raw.extend_from_slice(&buf[..read]),
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return raw,
            Err(error) => panic!("read failed after {} bytes: {error}", raw.len()),
        }
    }
}

/// Asserts a JSON error response naming no framework in any header.
fn assert_json_error(raw: &[u8], status: u16, code: &str) {
    let response = support::parse_response(raw);
    response.assert_error(status, code);
    assert_no_framework_header(&response);
}

fn assert_no_framework_header(response: &support::Response) {
    for (name, value) in &response.headers {
        assert!(
            !value.to_ascii_lowercase().contains("trillium"),
            "{name}: {value}"
        );
    }
}

fn short_timeouts() -> Config {
    let mut config = support::config_with_token(TOKEN);
    config.daemon.request_timeout_secs = 1;
    config
}

#[test]
fn http2_prior_knowledge_is_refused_with_505_json_and_counted() {
    let daemon = support::start(Config::for_tests());
    let mut stream = connect(daemon.addr());
    // The preface, an empty SETTINGS frame, then a rapid-reset burst: HEADERS + RST_STREAM
    // pairs on odd stream ids, as in CVE-2023-44487.
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    attack.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for stream_id in (1u32..2000).step_by(2) {
        let id = stream_id.to_be_bytes();
        attack.extend_from_slice(&[0, 0, 1, 1, 5, id[0], id[1], id[2], id[3], 0x82]);
        attack.extend_from_slice(&[0, 0, 4, 3, 0, id[0], id[1], id[2], id[3], 0, 0, 0, 8]);
    }
    // The server may close before reading it all; a failed write is part of the refusal.
    let _ = stream.write_all(&attack);
    let raw = read_to_close(&mut stream);
    assert_json_error(&raw, 505, "http2_not_supported");
    assert_eq!(error_count(&daemon, "http2_refused"), 1.0);
    assert_health_is_fast(daemon.addr());
    daemon.stop();
}

#[test]
fn a_drip_fed_head_is_closed_within_the_head_deadline() {
    let daemon = support::start(short_timeouts());
    let mut stream = connect(daemon.addr());
    let head =
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    // One byte every 200 ms: never a stall of a whole second, so only the head deadline
    // (1 s from the first byte) can end it.
    let mut closed_after = None;
    for byte in head {
        if stream.write_all(&[*byte]).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut probe = [0u8; 1];
        stream.set_nonblocking(true).unwrap();
        let peeked = stream.peek(&mut probe);
        stream.set_nonblocking(false).unwrap();
        if matches!(peeked, Ok(0)) || matches!(&peeked, Err(e) if e.kind() != ErrorKind::WouldBlock)
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the drip-fed head was never closed");
    assert!(
        closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}"
    );
    assert_eq!(error_count(&daemon, "head_timeout"), 1.0);
    assert_health_is_fast(daemon.addr());
    daemon.stop();
}

#[test]
fn a_slow_body_is_closed_within_the_body_deadline() {
    let daemon = start_gateway(short_timeouts());
    let mut stream = connect(daemon.gateway_addr());
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    let mut closed_after = None;
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(200));
        if stream.write_all(b" ").is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        stream.set_nonblocking(true).unwrap();
        let peeked = stream.peek(&mut probe);
        stream.set_nonblocking(false).unwrap();
        if !matches!(&peeked, Err(e) if e.kind() == ErrorKind::WouldBlock) {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow body was never closed");
    assert!(
        closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}"
    );
    // The handler may answer the truncated body itself (a 4xx) or the transport may close it.
    let timeouts = error_count(&daemon, "body_timeout") + error_count(&daemon, "bad_request");
    assert!(timeouts >= 1.0, "{timeouts}");
    assert_health_is_fast(daemon.addr());
    daemon.stop();
}

fn flood_config(max_connections: usize, per_ip: usize) -> Config {
    let mut config = Config::for_tests();
    config.separate_listeners = true;
    config.daemon.max_connections = max_connections;
    config.daemon.max_connections_per_ip = per_ip;
    config
}

/// Opens `count` idle connections to `addr` and waits until the daemon counts `expected` open.
fn hold(daemon: &TestDaemon, addr: SocketAddr, count: usize, expected: usize) -> Vec<TcpStream> {
    let held: Vec<TcpStream> = (0..count).map(|_| connect(addr)).collect();
    for _ in 0..200 {
        if daemon.ctx.connections.open() >= expected {
            return held;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "only {} of {expected} connections admitted",
        daemon.ctx.connections.open()
    );
}

#[test]
fn a_flood_past_max_connections_gets_503_json_and_health_still_answers() {
    let daemon = start_gateway(flood_config(40, 1000));
    let gateway_share = 40 - blufio::internals::connection::PROBE_RESERVE;
    // Requests in progress (the scripted agent sleeps 3 s): connections that nothing may close
    // to make room, unlike idle ones or incomplete heads (see `hostile_edge.rs`).
    let gateway = daemon.gateway_addr();
    let _busy: Vec<_> = (0..gateway_share)
        .map(|_| {
            std::thread::spawn(move || {
                let auth = format!("Bearer {TOKEN}");
                let headers = [
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                ];
                support::request(
                    gateway,
                    "POST",
                    "/v1/messages",
                    &headers,
                    Some(r#"{"content":"slow"}"#),
                )
            })
        })
        .collect();
    support::wait_for_active_sessions(&daemon, gateway_share as u64);
    let mut refused = connect(daemon.gateway_addr());
    let raw = read_to_close(&mut refused);
    assert_json_error(&raw, 503, "connection_limit");
    // The probe listener's reserve keeps /health answering.
    for _ in 0..5 {
        assert_health_is_fast(daemon.addr());
    }
    assert_eq!(error_count(&daemon, "connection_limit"), 1.0);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert!(exposition.value("blufio_open_connections", &[]).unwrap() >= gateway_share as f64);
    daemon.stop();
}

#[test]
fn a_flood_from_one_address_past_the_per_ip_cap_gets_503_json() {
    let daemon = support::start(flood_config(1000, 8));
    let _held = hold(&daemon, daemon.gateway_addr(), 8, 8);
    let mut refused = connect(daemon.gateway_addr());
    let raw = read_to_close(&mut refused);
    assert_json_error(&raw, 503, "connection_limit");
    // Per listener: the same address still reaches /health on the probe listener.
    assert_health_is_fast(daemon.addr());
    assert_eq!(error_count(&daemon, "connection_limit"), 1.0);
    daemon.stop();
}

#[test]
fn oversized_heads_get_431_json_instead_of_a_reset() {
    let daemon = support::start(Config::for_tests());
    let big_header = http::big_head(64 * 1024);
    let many_headers = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Many: a\r\n".repeat(10_000)
    );
    for head in [big_header, many_headers] {
        let mut stream = connect(daemon.addr());
        let _ = stream.write_all(head.as_bytes());
        let raw = read_to_close(&mut stream);
        assert_json_error(&raw, 431, "header_too_large");
    }
    assert_eq!(error_count(&daemon, "header_too_large"), 2.0);
    assert_health_is_fast(daemon.addr());
    daemon.stop();
}

#[test]
fn a_large_head_sent_at_once_is_served() {
    let daemon = support::start(Config::for_tests());
    // Just under trillium's 8 KiB head limit: several doublings of the head buffer, each a
    // read (dripped and oversized heads are in `hostile_edge.rs`).
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(7 * 1024)
    );
    let response = support::send_raw(daemon.addr(), head.as_bytes());
    assert_eq!(response.status, 200, "{}", response.body);
    daemon.stop();
}

#[test]
fn absolute_form_targets_are_served() {
    let daemon = support::start(Config::for_tests());
    let addr = daemon.addr();
    let raw =
        format!("GET http://{addr}/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response = support::send_raw(addr, raw.as_bytes());
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response.json()["uptime_secs"].is_u64(), "{}", response.body);
    // RFC 9112 §3.2.2: the target's authority wins over a different Host, on every request
    // of a kept-alive connection.
    let mut stream = connect(addr);
    let two = "GET http://elsewhere.example/health HTTP/1.1\r\nHost: x\r\n\r\n\
               GET HTTP://elsewhere.example:8080/metrics HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n";
    for part in two.split_inclusive("\r\n\r\n") {
        stream.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert_eq!(sent.matches("HTTP/1.1 200 OK").count(), 2, "{sent}");
    assert!(sent.contains("# HELP"), "{sent}");
    daemon.stop();
}

#[test]
fn parser_level_errors_name_no_framework() {
    let daemon = support::start(Config::for_tests());
    let addr = daemon.addr();
    for raw in [
        "GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_owned(),
    ] {
        let mut stream = connect(addr);
        stream.write_all(raw.as_bytes()).unwrap();
        let response = support::parse_response(&read_to_close(&mut stream));
        assert!((400..500).contains(&response.status), "{raw:?}");
        assert_eq!(response.header("server"), Some("blufio"), "{raw:?}");
        assert_no_framework_header(&response);
    }
    assert_health_is_fast(addr);
    daemon.stop();
}

#[test]
fn smuggling_attempts_are_still_refused() {
    let daemon = support::start(Config::for_tests());
    let addr = daemon.addr();
    for raw in [
        // CL+TE: a front end using Content-Length would see one request, we must not see two.
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    ] {
        let mut stream = connect(addr);
        stream.write_all(raw.as_bytes()).unwrap();
        let sent = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
        assert!(
            !sent.contains("# HELP"),
            "a smuggled request was served: {raw:?} → {sent}"
        );
        assert!(
            sent.is_empty() || sent.starts_with("HTTP/1.1 4"),
            "{raw:?} → {sent}"
        );
    }
    assert_health_is_fast(addr);
    daemon.stop();
}

#[test]
fn connections_holding_memory_are_shed_instead_of_sessions() {
    // A real user's session with some history, idle long enough to be trimmed under pressure
    // (sessions count as idle for shedding after a quarter of 4 s: 1 s).
    let (daemon, heap, id) = support::daemon_with_an_idle_session(4, Duration::from_millis(1200));

    // 150 anonymous connections each holding a partial head: about 3 MiB charged to them.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..150 {
        let mut stream = connect(daemon.gateway_addr());
        stream
            .write_all(b"GET /health HTTP/1.1\r\nX-Partial: aaaaaaaa")
            .unwrap();
        held.push(stream);
    }
    for _ in 0..200 {
        if daemon.ctx.connections.open() >= 150 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let charged = daemon.ctx.connections.memory_bytes();
    assert!(
        charged >= 150 * blufio::internals::connection::CONNECTION_BASE_BYTES,
        "{charged}"
    );
    // The heap is over the warn threshold only because of them.
    heap.set(20 * MIB + charged / 2);
    daemon.tick();

    let info = daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .json();
    assert_eq!(
        info["history_messages"], 6,
        "no real history trimmed: {info}"
    );
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    let shed = |reason| exposition.value("blufio_sessions_shed_total", &[("reason", reason)]);
    assert_eq!(shed("history_trimmed"), Some(0.0));
    assert_eq!(shed("pressure_evicted"), Some(0.0));
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(0.0));
    let shed_connections = exposition
        .value("blufio_errors_total", &[("type", "connection_shed")])
        .unwrap();
    assert!(shed_connections >= 1.0, "{shed_connections}");
    assert!(
        exposition
            .value("blufio_connection_memory_bytes", &[])
            .unwrap()
            > 0.0
    );
    // Shed connections were really closed.
    let closed = held
        .iter_mut()
        .map(|stream| {
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            matches!(stream.read(&mut [0u8; 64]), Ok(0) | Err(_))
        })
        .filter(|closed| *closed)
        .count();
    assert!(closed >= 1, "no held connection was closed");
    // Admission is untouched: a real client still opens a session.
    let opened = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
    assert_eq!(opened.status, 201, "{}", opened.body);
    daemon.stop();
}

#[test]
fn resident_memory_over_the_limit_purges_and_reports_degraded() {
    let heap = Arc::new(ManualHeap::new(2 * MIB));
    let mut config = Config::for_tests();
    config.daemon.memory_warn_mb = 20;
    config.daemon.memory_limit_mb = 30;
    let daemon = support::start_with(
        Context::builder(config)
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(200 * MIB))),
    );
    let purges_before = heap.purges();
    daemon.tick();
    assert!(heap.purges() > purges_before, "RSS over warn purges");
    assert_eq!(daemon.get("/health").json()["status"], "degraded");
    daemon.stop();
}

/// A child daemon whose file-descriptor limit drops to 256 while it runs (as `prlimit` would
/// do), flooded past it: it backs off instead of spinning, logs the episode once, counts it,
/// and serves again afterwards. The limit is lowered after start, because at start the daemon
/// fits `max_connections` to the limit and would never reach it.
#[test]
#[cfg(target_os = "linux")]
fn a_child_daemon_flooded_past_its_fd_limit_backs_off_and_recovers() {
    use blufio_testkit::process::Spawned;

    let port = support::free_port();
    let dir = support::temp_dir("fd-limit");
    let path = dir.join("blufio.toml");
    // max_connections above the lowered fd limit, so the limit and not the cap is what is hit.
    std::fs::write(
        &path,
        format!(
            "[daemon]\nhealth_port = {port}\nmax_connections = 2000\nrequest_timeout_secs = 5\n\
             max_connections_per_ip = 2000\n[gateway]\nport = {port}\n"
        ),
    )
    .unwrap();
    // Under `cargo xtask test-cross` the binary is foreign: run it through cargo's runner
    // (qemu-user), as the CLI tests do; `$RUNNER` is empty otherwise.
    let binary = support::binary();
    let mut child = Spawned::spawn(
        Command::new("bash")
            .args(["-c", "exec $RUNNER \"$0\" serve --config \"$1\""])
            .arg(binary.path())
            .arg(&path)
            .env("RUNNER", binary.runner())
            .env("BLUFIO_LOG", "info")
            .env_remove("BLUFIO_GATEWAY_TOKEN"),
    );
    let addr = child.wait_for_addr();
    let lowered = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    let pid = libc::pid_t::try_from(child.pid()).unwrap();
    // SAFETY: `lowered` is a valid rlimit and the old-limit pointer may be null.
    let status = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lowered, std::ptr::null_mut()) };
    assert_eq!(status, 0, "prlimit: {}", std::io::Error::last_os_error());
    let cpu_seconds = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
    };

    let flood: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let cpu_before = cpu_seconds(child.pid());
    std::thread::sleep(Duration::from_secs(1));
    let cpu_during = cpu_seconds(child.pid()) - cpu_before;
    assert!(
        cpu_during < 0.5,
        "accept loop spun: {cpu_during} s CPU in 1 s"
    );
    drop(flood);

    // Back to serving once the flood is gone (the backoff is at most 1 s).
    let mut health = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let mut stream = http::connect_with_timeout(addr, Duration::from_secs(3));
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut raw = Vec::new();
        if stream.read_to_end(&mut raw).is_ok() && raw.starts_with(b"HTTP/1.1 200") {
            health = Some(String::from_utf8_lossy(&raw).into_owned());
            break;
        }
    }
    let metrics_text = health.expect("the daemon serves again after the flood");
    let body = metrics_text.split_once("\r\n\r\n").unwrap().1;
    let failures = prometheus::parse(body)
        .value("blufio_errors_total", &[("type", "accept_failed")])
        .unwrap();
    assert!(failures >= 1.0, "{failures}");

    terminate(child.child());
    let logged: Vec<String> = child.lines().iter().collect();
    // One line per episode, not per failure: the backlog the flood leaves may start a second
    // short episode after the first recovery, but never one line per failed accept.
    let episodes = logged
        .iter()
        .filter(|line| line.contains("accept failed") && !line.contains("more like this"))
        .count();
    assert!((1..=3).contains(&episodes), "{logged:#?}");
    assert!(
        (episodes as f64) < failures,
        "{failures} failures, {logged:#?}"
    );
    assert!(logged.len() < 30, "{logged:#?}");
    assert!(
        logged.iter().any(|line| line.contains("accept recovered")),
        "{logged:#?}"
    );
}

/// Stops the child with SIGTERM through `kill(1)` and waits for it, so its stderr is complete.
#[cfg(target_os = "linux")]
fn terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
}
