//! Unknown paths, wrong methods, malformed requests and the split-listener setup.

use blufio::Config;

use crate::support::{self, config_with_token};

#[test]
fn unknown_path_is_404_json() {
    let daemon = support::start(Config::for_tests());
    daemon.get("/nope").assert_error(404, "not_found");
    daemon.stop();
}

#[test]
fn wrong_method_is_405_with_allow() {
    let daemon = support::start(Config::for_tests());
    for path in ["/health", "/ready", "/metrics"] {
        let response = support::request(daemon.addr(), "POST", path, &[], Some("{}"));
        response.assert_error(405, "method_not_allowed");
        let allow = response.header("allow").unwrap();
        assert!(
            allow.contains("GET") && allow.contains("HEAD"),
            "{path}: {allow}"
        );
        // A query string does not change the route.
        assert_eq!(daemon.get(&format!("{path}?probe=1")).status, 200, "{path}");
    }
    let sessions = support::request(daemon.addr(), "PUT", "/v1/sessions", &[], Some("{}"));
    sessions.assert_error(405, "method_not_allowed");
    daemon.stop();
}

#[test]
fn malformed_request_gets_4xx_and_the_daemon_keeps_serving() {
    let daemon = support::start(Config::for_tests());
    let response = support::send_raw(
        daemon.addr(),
        b"GET /health HTTP/1.1\r\nHost: x\r\nthis header has no colon\r\n\r\n",
    );
    assert!((400..500).contains(&response.status), "{response:?}");
    assert_eq!(daemon.get("/health").status, 200);
    daemon.stop();
}

#[test]
fn separate_ports_split_probes_from_the_gateway() {
    let mut config = config_with_token("tok");
    config.separate_listeners = true;
    let daemon = support::start(config);
    assert_ne!(daemon.addr(), daemon.gateway_addr());
    // Probes listener: health and metrics, no API.
    assert_eq!(daemon.get("/health").status, 200);
    assert_eq!(daemon.get("/metrics").status, 200);
    let api_on_probes = support::request(
        daemon.addr(),
        "GET",
        "/v1/health",
        &[("Authorization", "Bearer tok")],
        None,
    );
    api_on_probes.assert_error(404, "not_found");
    // Gateway listener: the API, no probes.
    assert_eq!(daemon.authed("tok", "GET", "/v1/health", None).status, 200);
    daemon
        .gateway("GET", "/metrics", &[], None)
        .assert_error(404, "not_found");
    daemon.stop();
}

/// A daemon with `request_timeout_secs = 1` and a client connected to it.
fn one_second_timeout_connection() -> (support::TestDaemon, std::net::TcpStream) {
    let mut config = Config::for_tests();
    config.daemon.request_timeout_secs = 1;
    let daemon = support::start(config);
    let stream = std::net::TcpStream::connect(daemon.addr()).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    (daemon, stream)
}

#[test]
fn a_client_that_stalls_mid_request_is_disconnected() {
    use std::{
        io::{Read, Write},
        time::{Duration, Instant},
    };

    let (daemon, mut stream) = one_second_timeout_connection();
    // Half a request head, then silence: a slowloris client.
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 64];
    let read = stream.read(&mut buffer);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the server closed the connection instead of answering: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Well-behaved clients are unaffected.
    assert_eq!(daemon.get("/health").status, 200);
    daemon.stop();
}

#[test]
fn a_busy_keep_alive_connection_outlives_the_timeout_and_an_idle_one_is_closed() {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::{Duration, Instant},
    };

    let (daemon, mut stream) = one_second_timeout_connection();
    let get = |stream: &mut TcpStream| {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        let mut buffer = [0u8; 1024];
        while !response.ends_with(b"}") {
            let read = stream.read(&mut buffer).unwrap();
            assert!(read > 0, "closed after {} bytes", response.len());
            response.extend_from_slice(&buffer[..read]);
        }
        assert!(response.starts_with(b"HTTP/1.1 200"));
    };
    // Each wait is shorter than the deadline, together they are three times longer: every
    // wait starts its own deadline (the timer armed for an earlier one must not end this one).
    let started = Instant::now();
    for _ in 0..5 {
        get(&mut stream);
        std::thread::sleep(Duration::from_millis(600));
    }
    get(&mut stream);
    assert!(started.elapsed() >= Duration::from_secs(3));
    // Then silence: the idle connection is closed about a second later.
    let idle = Instant::now();
    let mut buffer = [0u8; 64];
    let read = stream.read(&mut buffer);
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        idle.elapsed() >= Duration::from_millis(900) && idle.elapsed() < Duration::from_secs(5),
        "{:?}",
        idle.elapsed()
    );
    daemon.stop();
}

#[test]
fn responses_do_not_advertise_library_versions() {
    let daemon = support::start(Config::for_tests());
    let response = daemon.get("/health");
    assert_eq!(response.header("server"), Some("blufio"));
    daemon.stop();
}
