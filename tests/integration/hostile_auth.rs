//! Hostile clients against authentication and the log: token guessing is throttled per
//! address and reported once per episode, malformed requests leave one line per episode, and
//! nothing below the configured log level is ever printed.

use std::{net::SocketAddr, time::Duration};
// Other loopback addresses than 127.0.0.1 exist by default on Linux only.
#[cfg(target_os = "linux")]
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
};

#[cfg(target_os = "linux")]
use blufio::{Config, internals::client_fault::AUTH_FAILURE_LIMIT};

use blufio_testkit::process::{Daemon, write_config};

use crate::support::{self, free_port, temp_dir};
#[cfg(target_os = "linux")]
use crate::{
    prometheus,
    support::{Response, start_gateway},
};

const TOKEN: &str = "hostile-auth-token-0123456789";

/// Starts the binary with `config` and without `BLUFIO_LOG`, so `[daemon] log_level` (and a
/// reload of it) is what filters the log; returns the daemon, which knows its
/// address, its stderr lines and the config path (rewritten by reload tests).
fn start_configured_binary(config: &str, name: &str) -> Daemon {
    let dir = temp_dir(name);
    let path = write_config(&dir, config);
    let mut command = support::binary().serve_command(&path);
    command
        .env_remove("BLUFIO_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("OPENAI_API_KEY");
    Daemon::start(&mut command, path).keeping(dir)
}

/// Sends SIGTERM, collects the log up to "shut down" and asserts a clean exit.
fn stop_and_log(daemon: &mut Daemon) -> Vec<String> {
    daemon.signal("TERM");
    let log = daemon.lines_until("shut down", Duration::from_secs(30));
    let exit = daemon.wait(support::EXIT_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    log
}

/// The lines of `log` about client `who` (an address).
#[cfg(target_os = "linux")]
fn mentioning<'a>(log: &'a [String], who: &str) -> Vec<&'a String> {
    log.iter()
        .filter(|line| line.contains(&format!("{who}:")) || line.contains(&format!("{who} ")))
        .collect()
}

/// Health and gateway on `port` with `TOKEN`, logging at info.
fn info_config(port: u16) -> String {
    format!(
        "[daemon]\nlog_level = \"info\"\nhealth_port = {port}\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n"
    )
}

/// Sends `count` messages at once; each fails against the dead upstream after retries, so
/// the provider's retry warning repeats from one call site.
fn fail_messages(addr: SocketAddr, count: usize) {
    let auth = format!("Bearer {TOKEN}");
    std::thread::scope(|scope| {
        for _ in 0..count {
            scope.spawn(|| {
                let response = support::request(
                    addr,
                    "POST",
                    "/v1/messages",
                    &[
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                    ],
                    Some(r#"{"content": "hello"}"#),
                );
                assert!(response.status >= 500, "{response:?}");
            });
        }
    });
}

fn debug_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| line.starts_with("[DEBUG") || line.starts_with("[TRACE"))
        .collect()
}

#[test]
fn repeated_warnings_print_nothing_below_the_configured_level_before_and_after_a_reload() {
    let port = free_port();
    let dead_upstream = free_port();
    let dir = temp_dir("log-level");
    let key = dir.join("openai.key");
    std::fs::write(&key, "sk-log-level-0123456789").unwrap();
    let config = |level: &str| {
        format!(
            "[daemon]\nlog_level = \"{level}\"\nhealth_port = {port}\n\
             [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n\
             [agent]\nprovider = \"openai\"\nmodel = \"m\"\ntimeout_secs = 30\n\
             base_url = \"http://127.0.0.1:{dead_upstream}/v1\"\napi_key_file = \"{}\"\n",
            key.display()
        )
    };
    let mut daemon = start_configured_binary(&config("info"), "log-level");
    let addr = daemon.addr();
    let path = daemon.config().to_owned();

    // At info: the retry warning repeats (three messages, two retries each), and its
    // held-back repeats must not come out as DEBUG lines.
    fail_messages(addr, 3);
    std::fs::write(&path, config("debug")).unwrap();
    daemon.signal("HUP");
    let at_info = daemon.lines_until("reloaded", Duration::from_secs(30));
    assert!(
        at_info
            .iter()
            .any(|line| line.starts_with("[WARN") && line.contains("retrying")),
        "{at_info:#?}"
    );
    assert_eq!(debug_lines(&at_info), Vec::<&String>::new(), "{at_info:#?}");

    // Raised to debug by a reload, debug lines do show (so the check above can fail).
    fail_messages(addr, 2);
    std::fs::write(&path, config("info")).unwrap();
    daemon.signal("HUP");
    let at_debug = daemon.lines_until("reloaded", Duration::from_secs(30));
    assert!(!debug_lines(&at_debug).is_empty(), "{at_debug:#?}");

    // Lowered to info again by a reload: hidden again.
    fail_messages(addr, 3);
    let after = stop_and_log(&mut daemon);
    assert_eq!(debug_lines(&after), Vec::<&String>::new(), "{after:#?}");
}

/// Connects to `addr` from `source` (another loopback address, so one test has several
/// clients), with a generous read timeout.
#[cfg(target_os = "linux")]
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let socket = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&socket, &SocketAddrV4::new(source, 0)).unwrap();
    connect(&socket, &addr).unwrap();
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Writes a keep-alive `GET /v1/health` with `token`.
#[cfg(target_os = "linux")]
fn send_health(stream: &mut TcpStream, token: &str) {
    let request =
        format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
}

/// Reads one response off a keep-alive connection; `None` when it is closed first.
#[cfg(target_os = "linux")]
fn read_response(stream: &mut TcpStream) -> Option<Response> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return None,
            Ok(_) => raw.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    raw.extend_from_slice(&body);
    Some(support::parse_response(&raw))
}

/// Sends one `GET /v1/health` with `token` from `source` on a fresh connection.
#[cfg(target_os = "linux")]
fn health_from(source: Ipv4Addr, addr: SocketAddr, token: &str) -> Response {
    let mut stream = connect_from(source, addr);
    send_health(&mut stream, token);
    read_response(&mut stream).expect("a response")
}

/// Asserts the connection is closed by the daemon (EOF, not a timeout).
#[cfg(target_os = "linux")]
fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("the daemon closes the connection");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[cfg(target_os = "linux")]
#[test]
fn guessing_tokens_gets_429_and_a_closed_connection_from_one_address_only() {
    let daemon = start_gateway(Config::for_tests());
    let addr = daemon.gateway_addr();
    let guesser = Ipv4Addr::new(127, 0, 0, 5);
    let mut stream = connect_from(guesser, addr);
    for attempt in 1..AUTH_FAILURE_LIMIT {
        send_health(&mut stream, &format!("guess-{attempt}"));
        let response = read_response(&mut stream).expect("a 401 on the same connection");
        response.assert_error(401, "unauthorized");
        assert_eq!(response.header("connection"), None, "{response:?}");
    }
    // The tenth failure in a minute: 429, Retry-After, and the connection closes.
    send_health(&mut stream, "guess-10");
    let throttled = read_response(&mut stream).expect("a 429");
    throttled.assert_error(429, "too_many_auth_failures");
    assert_eq!(throttled.header("retry-after"), Some("60"), "{throttled:?}");
    assert_eq!(
        throttled.header("connection"),
        Some("close"),
        "{throttled:?}"
    );
    assert_closed(&mut stream);

    // While blocked, the token is not even looked at: the right one gets 429 too.
    let blocked = health_from(guesser, addr, support::TOKEN);
    blocked.assert_error(429, "too_many_auth_failures");
    let retry_after: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{blocked:?}");

    // Another address is served, and its own failures are still plain 401s.
    let other = Ipv4Addr::new(127, 0, 0, 6);
    assert_eq!(health_from(other, addr, support::TOKEN).status, 200);
    health_from(other, addr, "wrong").assert_error(401, "unauthorized");
    // Probes need no token and are never throttled.
    let mut probe = connect_from(guesser, addr);
    probe
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut probe).unwrap().status, 200);

    let metrics = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(
        metrics.value("blufio_errors_total", &[("type", "auth_throttled")]),
        Some(2.0)
    );
    daemon.stop();
}

#[cfg(target_os = "linux")]
#[test]
fn requests_without_credentials_are_refused_but_never_throttle_the_address() {
    let daemon = start_gateway(Config::for_tests());
    let addr = daemon.gateway_addr();
    let shared = Ipv4Addr::new(127, 0, 0, 7);
    // Three times the limit of anonymous requests from one address (a scanner, or the soak's
    // hostile load): each gets its 401, and the address is not blocked.
    for _ in 0..3 * AUTH_FAILURE_LIMIT {
        let mut stream = connect_from(shared, addr);
        stream
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        read_response(&mut stream)
            .expect("a 401")
            .assert_error(401, "unauthorized");
    }
    // A real client behind the same address is served.
    assert_eq!(health_from(shared, addr, support::TOKEN).status, 200);
    let metrics = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(
        metrics
            .value("blufio_errors_total", &[("type", "auth_throttled")])
            .unwrap_or(0.0),
        0.0
    );
    daemon.stop();
}

#[cfg(target_os = "linux")]
#[test]
fn token_guessing_and_malformed_requests_leave_one_line_per_episode_at_info() {
    let mut daemon = start_configured_binary(&info_config(free_port()), "fault-episodes");
    let addr = daemon.addr();

    // One guesser, reconnecting whenever it is closed on.
    let guesser = Ipv4Addr::new(127, 0, 0, 7);
    let mut statuses = Vec::new();
    let mut stream = connect_from(guesser, addr);
    for attempt in 0..40 {
        send_health(&mut stream, &format!("guess-{attempt}"));
        let response = read_response(&mut stream).expect("a response");
        statuses.push(response.status);
        if response.header("connection") == Some("close") {
            stream = connect_from(guesser, addr);
        }
    }
    assert_eq!(statuses.iter().filter(|status| **status == 401).count(), 9);
    assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 31);

    // A client sending heads the parser refuses.
    let garbler = Ipv4Addr::new(127, 0, 0, 8);
    for _ in 0..20 {
        let mut stream = connect_from(garbler, addr);
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream).expect("the parser answers");
        assert_eq!(response.status, 400, "{response:?}");
    }
    // Someone mistyping their token a few times.
    let typist = Ipv4Addr::new(127, 0, 0, 9);
    for _ in 0..3 {
        assert_eq!(health_from(typist, addr, "typo").status, 401);
    }

    let log = stop_and_log(&mut daemon);
    let mentioning = |who: &str| mentioning(&log, who);
    // One WARN when the throttle starts, one INFO line of totals (here at exit).
    let guessing = mentioning("127.0.0.7");
    assert_eq!(guessing.len(), 2, "{log:#?}");
    assert_line(
        &guessing,
        0,
        "[WARN",
        "token guessing from 127.0.0.7: 10 failed authentications",
    );
    assert_line(
        &guessing,
        1,
        "[INFO",
        "token guessing from 127.0.0.7 stopped: 10 failed authentications and 30 requests \
         answered 429",
    );
    // One INFO line at the first malformed request, the counts when the episode ends.
    let malformed = mentioning("127.0.0.8");
    assert_eq!(malformed.len(), 2, "{log:#?}");
    assert_line(
        &malformed,
        0,
        "[INFO",
        "malformed request from 127.0.0.8 (bad_request)",
    );
    assert_line(
        &malformed,
        1,
        "[INFO",
        "malformed requests from 127.0.0.8: 20 in the last",
    );
    assert!(malformed[1].ends_with("(bad_request 20)"), "{malformed:?}");
    assert_eq!(mentioning("127.0.0.9"), Vec::<&String>::new(), "{log:#?}");
    assert_eq!(debug_lines(&log), Vec::<&String>::new(), "{log:#?}");
}

/// Asserts that line `index` of `lines` starts with `level` and contains `text`.
#[cfg(target_os = "linux")]
#[track_caller]
fn assert_line(lines: &[&String], index: usize, level: &str, text: &str) {
    assert!(
        lines[index].starts_with(level) && lines[index].contains(text),
        "{lines:?}"
    );
}

/// Writes `bytes` from `source`, closes the sending side and waits for the daemon to close
/// its own (it has then dealt with the request); returns whatever it answered.
#[cfg(target_os = "linux")]
fn hang_up_after(source: Ipv4Addr, addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect_from(source, addr);
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    // A reset instead of a FIN is a close too.
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// `blufio_errors_total{type="bad_request"}`, 0 while absent.
#[cfg(target_os = "linux")]
fn bad_requests(addr: SocketAddr) -> f64 {
    let metrics = support::request(addr, "GET", "/metrics", &[], None);
    assert_eq!(metrics.status, 200, "{metrics:?}");
    prometheus::parse(&metrics.body)
        .value("blufio_errors_total", &[("type", "bad_request")])
        .unwrap_or(0.0)
}

#[cfg(target_os = "linux")]
#[test]
fn clients_that_hang_up_mid_request_are_not_counted_or_logged_as_malformed() {
    let mut daemon = start_configured_binary(&info_config(free_port()), "hang-ups");
    let addr = daemon.addr();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");

    let quitter = Ipv4Addr::new(127, 0, 0, 10);
    // Mid-head: inside the request line, and after some header lines.
    hang_up_after(quitter, addr, b"POST /v1/mess");
    hang_up_after(quitter, addr, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n");
    // Mid-head of a second request on a keep-alive connection.
    let mut stream = connect_from(quitter, addr);
    send_health(&mut stream, TOKEN);
    assert_eq!(read_response(&mut stream).expect("a response").status, 200);
    stream.write_all(b"GET /v1/health HTTP/1.1\r\nHo").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = stream.read_to_end(&mut Vec::new());
    // Mid-body: a declared length, and a chunked body, each cut short.
    let declared = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: 65536\r\n\r\n{{\"content\": \""
    );
    hang_up_after(quitter, addr, declared.as_bytes());
    let chunked = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n20\r\n{{\"content\": \""
    );
    hang_up_after(quitter, addr, chunked.as_bytes());
    assert_eq!(bad_requests(addr), 0.0);

    // Real protocol faults still count: a head the parser refuses, invalid chunked framing.
    let garbler = Ipv4Addr::new(127, 0, 0, 11);
    let garbage = hang_up_after(
        garbler,
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
    );
    assert!(garbage.starts_with(b"HTTP/1.1 400"), "{garbage:?}");
    let bad_chunk = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let answer = hang_up_after(garbler, addr, bad_chunk.as_bytes());
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
    assert_eq!(bad_requests(addr), 2.0);

    let log = stop_and_log(&mut daemon);
    let mentioning = |who: &str| mentioning(&log, who);
    assert_eq!(mentioning("127.0.0.10"), Vec::<&String>::new(), "{log:#?}");
    let malformed = mentioning("127.0.0.11");
    assert!(
        malformed
            .first()
            .is_some_and(|line| line.contains("malformed request from 127.0.0.11 (bad_request)")),
        "{log:#?}"
    );
}
