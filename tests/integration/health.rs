//! `/health` and `/v1/health` through real HTTP.

use blufio::{Config, Context, FixedRss, ManualHeap};

use crate::support::{self, config_with_token};

#[test]
fn health_answers_the_five_fields_without_auth() {
    // A fixed RSS: the test process hosts many daemons (and qemu, on ARM), so its real RSS
    // can pass the limit and rightly report "degraded".
    let daemon = support::start_with(
        Context::builder(config_with_token("t0ken")).with_rss_source(FixedRss(Some(8 << 20))),
    );
    let response = daemon.get("/health");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json = response.json();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "status",
            "uptime_secs",
            "memory_heap_bytes",
            "memory_rss_bytes",
            "active_sessions"
        ]
    );
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["active_sessions"], 0);
    daemon.stop();
}

#[test]
fn first_health_already_has_real_memory_numbers() {
    // The real jemalloc and platform readers, sampled before the listener opened.
    let daemon = support::start(Config::for_tests());
    let json = daemon.get("/health").json();
    assert!(json["memory_heap_bytes"].as_u64().unwrap() > 0, "{json}");
    if cfg!(any(target_os = "linux", target_os = "macos")) {
        assert!(json["memory_rss_bytes"].as_u64().unwrap() > 0, "{json}");
    }
    daemon.stop();
}

#[test]
fn unavailable_rss_is_null_not_zero() {
    let daemon = support::start_with(
        Context::builder(Config::for_tests())
            .with_rss_source(FixedRss(None))
            .with_heap_source(ManualHeap::new(1024)),
    );
    let json = daemon.get("/health").json();
    assert!(json["memory_rss_bytes"].is_null(), "{json}");
    assert_eq!(json["memory_heap_bytes"], 1024);
    let metrics = daemon.get_ok("/metrics");
    assert!(!metrics.contains("\nblufio_memory_rss_bytes "), "{metrics}");
    daemon.stop();
}

#[test]
fn head_health_has_headers_and_no_body() {
    let daemon = support::start(Config::for_tests());
    let response = support::request(daemon.addr(), "HEAD", "/health", &[], None);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert!(response.body.is_empty(), "{:?}", response.body);
    daemon.stop();
}

#[test]
fn v1_health_refuses_missing_and_wrong_tokens() {
    let daemon = support::start(config_with_token("right-token"));
    let missing = daemon.gateway("GET", "/v1/health", &[], None);
    missing.assert_error(401, "unauthorized");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"blufio\"")
    );
    let wrong = daemon.authed("wrong-token", "GET", "/v1/health", None);
    wrong.assert_error(401, "unauthorized");
    assert!(!wrong.body.contains("right-token"));
    let basic = daemon.gateway(
        "GET",
        "/v1/health",
        &[("Authorization", "Basic cmlnaHQtdG9rZW4=")],
        None,
    );
    basic.assert_error(401, "unauthorized");
    daemon.stop();
}

#[test]
fn v1_health_with_the_right_token_has_full_details() {
    let daemon = support::start(config_with_token("right-token"));
    let response = daemon.authed("right-token", "GET", "/v1/health", None);
    assert_eq!(response.status, 200, "{}", response.body);
    let json = response.json();
    for key in [
        "status",
        "uptime_secs",
        "memory_heap_bytes",
        "memory_rss_bytes",
        "active_sessions",
        "memory_resident_bytes",
        "memory_warn_bytes",
        "memory_limit_bytes",
        "memory_pressure",
        "admission",
        "rss_source",
        "allocator",
        "allocator_page_size",
        "version",
        "target",
        "last_sample_age_secs",
        "errors",
        "agent",
    ] {
        assert!(json.get(key).is_some(), "missing {key} in {json}");
    }
    assert_eq!(json["memory_warn_bytes"], 150 * 1024 * 1024);
    assert_eq!(json["admission"], "accepting");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["allocator"], "jemalloc");
    assert!(json["allocator_page_size"].as_u64().unwrap() >= 4096);
    assert!(json["errors"]["unauthorized"].is_u64());
    daemon.stop();
}

#[test]
fn v1_without_a_configured_token_refuses_everyone() {
    let daemon = support::start(Config::for_tests());
    let response = daemon.authed("anything", "GET", "/v1/health", None);
    response.assert_error(503, "auth_not_configured");
    daemon.stop();
}
