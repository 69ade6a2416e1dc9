//! The gateway over real HTTP: sessions, messages, agent outcomes, bounds and admission.

use std::{sync::Arc, time::Duration};

use blufio::{Config, Context, FixedRss, ManualHeap};

use crate::{
    prometheus,
    support::{self, ScriptedAgent, TOKEN, start_gateway, wait_for_active_sessions},
};

const MIB: u64 = 1024 * 1024;

fn post_message(daemon: &support::TestDaemon, body: &str) -> support::Response {
    daemon.authed(TOKEN, "POST", "/v1/messages", Some(body))
}

#[test]
fn sessions_can_be_created_listed_fetched_and_deleted() {
    let daemon = start_gateway(Config::for_tests());
    let created = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
    assert_eq!(created.status, 201, "{}", created.body);
    let json = created.json();
    let id = json["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert!(json["created_at"].as_u64().unwrap() > 1_600_000_000);

    let listed = daemon.authed(TOKEN, "GET", "/v1/sessions", None).json();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["id"], id.as_str());
    assert_eq!(sessions[0]["message_count"], 0);

    let fetched = daemon.authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.json()["kind"], "http");
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1);

    let deleted = daemon.authed(TOKEN, "DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(deleted.status, 204);
    daemon
        .authed(TOKEN, "DELETE", &format!("/v1/sessions/{id}"), None)
        .assert_error(404, "session_not_found");
    daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .assert_error(404, "session_not_found");
    daemon
        .authed(TOKEN, "GET", "/v1/sessions/..%2f..%2fetc", None)
        .assert_error(404, "session_not_found");
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    daemon.stop();
}

#[test]
fn messages_open_a_session_or_continue_one() {
    let daemon = start_gateway(Config::for_tests());
    let first = post_message(&daemon, r#"{"content": "hello"}"#);
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    assert_eq!(first["content"], "re: hello (history 0)");
    assert_eq!(first["usage"]["model"], "scripted-1");
    let id = first["session_id"].as_str().unwrap();

    let second = post_message(
        &daemon,
        &format!(r#"{{"session_id": "{id}", "content": "again"}}"#),
    )
    .json();
    assert_eq!(second["session_id"], id);
    assert_eq!(second["content"], "re: again (history 2)");
    let info = daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .json();
    assert_eq!(info["message_count"], 4);
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1);

    prometheus::parse(&daemon.get_ok("/metrics")).assert_values(&[
        ("blufio_messages_total", &[("channel", "http")], 2.0),
        ("blufio_response_latency_seconds_count", &[], 2.0),
        (
            "blufio_tokens_total",
            &[("model", "scripted-1"), ("type", "input")],
            22.0,
        ),
    ]);
    daemon.stop();
}

#[test]
fn malformed_messages_get_4xx_json_and_change_nothing() {
    let daemon = start_gateway(Config::for_tests());
    post_message(&daemon, "{not json").assert_error(400, "invalid_json");
    post_message(&daemon, r#"{"content": 5}"#).assert_error(400, "invalid_json");
    post_message(&daemon, r#"{"content": "x", "sesion_id": "typo"}"#)
        .assert_error(400, "invalid_json");
    post_message(&daemon, r#"{"content": "   "}"#).assert_error(400, "bad_request");
    post_message(
        &daemon,
        r#"{"session_id": "00000000000000000000000000000000", "content": "x"}"#,
    )
    .assert_error(404, "session_not_found");
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    prometheus::parse(&daemon.get_ok("/metrics")).assert_values(&[
        ("blufio_errors_total", &[("type", "bad_request")], 4.0),
        ("blufio_messages_total", &[("channel", "http")], 0.0),
    ]);
    daemon.stop();
}

#[test]
fn agent_failures_map_to_clear_statuses() {
    let daemon = support::start_gateway_with(|config| config.agent.timeout_secs = 1);
    let upstream = post_message(&daemon, r#"{"content": "upstream"}"#);
    upstream.assert_error(502, "agent_upstream");
    assert!(!upstream.body.contains("secret upstream detail"));
    let limited = post_message(&daemon, r#"{"content": "ratelimit"}"#);
    limited.assert_error(429, "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("7"));
    post_message(&daemon, r#"{"content": "slow"}"#).assert_error(504, "agent_timeout");
    post_message(&daemon, r#"{"content": "panic"}"#).assert_error(502, "agent_upstream");
    // The daemon keeps serving after all of that.
    assert_eq!(post_message(&daemon, r#"{"content": "ok"}"#).status, 200);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    for (kind, count) in [
        ("agent_upstream", 2.0),
        ("agent_rate_limit", 1.0),
        ("agent_timeout", 1.0),
        ("internal", 1.0),
    ] {
        assert_eq!(
            exposition.value("blufio_errors_total", &[("type", kind)]),
            Some(count),
            "{kind}"
        );
    }
    daemon.stop();
}

#[test]
fn without_an_agent_messages_get_503_and_sessions_still_work() {
    let daemon = support::start(support::config_with_token(TOKEN));
    post_message(&daemon, r#"{"content": "hi"}"#).assert_error(503, "no_agent");
    assert_eq!(
        daemon.authed(TOKEN, "POST", "/v1/sessions", None).status,
        201
    );
    assert_eq!(
        daemon.authed(TOKEN, "GET", "/v1/health", None).json()["agent"],
        "none"
    );
    daemon.stop();
}

#[test]
fn spending_the_budget_turns_messages_into_429() {
    let daemon = support::start_gateway_with(|config| config.cost.daily_budget_usd = 1.0);
    for _ in 0..2 {
        assert_eq!(
            post_message(&daemon, r#"{"content": "costly"}"#).status,
            200
        );
    }
    post_message(&daemon, r#"{"content": "costly"}"#).assert_error(429, "budget_exhausted");
    assert_eq!(
        support::metric(&daemon, "blufio_budget_remaining_usd", &[]),
        Some(0.0)
    );
    daemon.stop();
}

#[test]
fn every_v1_route_and_ws_refuse_a_missing_or_wrong_token() {
    let mut config = Config::for_tests();
    // Fifteen failures from one address: with the throttle on, the last would get 429.
    config.gateway.auth_failure_limit = 0;
    let daemon = start_gateway(config);
    let routes = [
        ("GET", "/v1/health"),
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/00000000000000000000000000000000"),
        ("DELETE", "/v1/sessions/00000000000000000000000000000000"),
        ("POST", "/v1/messages"),
        ("GET", "/ws"),
    ];
    for (method, path) in routes {
        let body = (method == "POST").then_some(r#"{"content": "x"}"#);
        daemon
            .gateway(method, path, &[], body)
            .assert_error(401, "unauthorized");
        daemon
            .authed("not-the-token", method, path, body)
            .assert_error(401, "unauthorized");
    }
    assert_eq!(
        support::ws_connect(daemon.gateway_addr(), &[("Authorization", "Bearer nope")])
            .map(|_| ())
            .unwrap_err()
            .0,
        401
    );
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    daemon.stop();
}

#[test]
fn oversized_bodies_get_413_without_being_read() {
    let daemon = support::start_gateway_with(|config| config.gateway.max_message_bytes = 1024);
    // Only the head is sent: the declared length alone earns the 413, no byte of body is
    // awaited.
    let head_only = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n"
    );
    support::send_raw(daemon.gateway_addr(), head_only.as_bytes())
        .assert_error(413, "payload_too_large");
    // Chunked, so no length is declared: refused as soon as the body passes the limit (the
    // client stops sending there, as it would on seeing the response).
    let chunk = "y".repeat(1100);
    let raw = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{chunk}\r\n",
        chunk.len()
    );
    support::send_raw(daemon.gateway_addr(), raw.as_bytes()).assert_error(413, "payload_too_large");
    assert_eq!(post_message(&daemon, r#"{"content": "small"}"#).status, 200);
    daemon.stop();
}

#[test]
fn max_sessions_refuses_with_503_and_retry_after() {
    let daemon = support::start_gateway_with(|config| config.gateway.max_sessions = 2);
    for _ in 0..2 {
        assert_eq!(
            daemon.authed(TOKEN, "POST", "/v1/sessions", None).status,
            201
        );
    }
    let refused = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
    refused.assert_error(503, "session_limit");
    assert!(refused.header("retry-after").is_some());
    post_message(&daemon, r#"{"content": "new session please"}"#)
        .assert_error(503, "session_limit");
    assert_eq!(
        support::ws_connect(
            daemon.gateway_addr(),
            &[("Authorization", &format!("Bearer {TOKEN}"))]
        )
        .map(|_| ())
        .unwrap_err()
        .0,
        503
    );
    daemon.stop();
}

#[test]
fn above_the_memory_limit_new_sessions_get_503_while_open_ones_keep_talking() {
    let heap = Arc::new(ManualHeap::new(50 * MIB));
    let daemon = support::start_with(
        Context::builder(support::config_with_token(TOKEN))
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(60 * MIB)))
            .with_agent(ScriptedAgent),
    );
    let auth = format!("Bearer {TOKEN}");
    let open = post_message(&daemon, r#"{"content": "before"}"#).json();
    let id = open["session_id"].as_str().unwrap().to_owned();
    let (mut ws, _) =
        support::ws_connect(daemon.gateway_addr(), &[("Authorization", &auth)]).unwrap();

    heap.set(250 * MIB);
    daemon.tick();
    let refused = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
    refused.assert_error(503, "memory_limit");
    assert_eq!(refused.header("retry-after"), Some("5"));
    post_message(&daemon, r#"{"content": "no session"}"#).assert_error(503, "memory_limit");
    let (status, retry_after) =
        support::ws_connect(daemon.gateway_addr(), &[("Authorization", &auth)])
            .map(|_| ())
            .unwrap_err();
    assert_eq!(status, 503);
    assert!(retry_after.is_some());

    // Sessions opened before keep exchanging messages.
    let continued = post_message(
        &daemon,
        &format!(r#"{{"session_id": "{id}", "content": "during"}}"#),
    );
    assert_eq!(continued.status, 200, "{}", continued.body);
    let reply = support::ws_exchange(&mut ws, r#"{"content": "still here"}"#);
    assert_eq!(reply["content"], "re: still here (history 0)");
    assert_eq!(daemon.get("/health").json()["status"], "degraded");
    assert_eq!(
        daemon.authed(TOKEN, "GET", "/v1/health", None).json()["admission"],
        "rejecting"
    );

    heap.set(100 * MIB);
    daemon.tick();
    assert_eq!(
        daemon.authed(TOKEN, "POST", "/v1/sessions", None).status,
        201
    );
    assert!(support::ws_connect(daemon.gateway_addr(), &[("Authorization", &auth)]).is_ok());
    drop(ws);
    daemon.stop();
}

#[test]
fn idle_sessions_are_evicted_by_the_background_task() {
    let daemon = support::start_gateway_with(|config| config.gateway.session_idle_timeout_secs = 1);
    assert_eq!(
        daemon.authed(TOKEN, "POST", "/v1/sessions", None).status,
        201
    );
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1);
    // The eviction task checks every 500 ms; the session is idle after 1 s.
    wait_for_active_sessions(&daemon, 0);
    assert_eq!(
        support::metric(
            &daemon,
            "blufio_sessions_shed_total",
            &[("reason", "idle_timeout")]
        ),
        Some(1.0)
    );
    daemon.stop();
}

#[test]
fn pressure_trims_idle_histories_and_closes_the_longest_idle_sessions() {
    let heap = Arc::new(ManualHeap::new(10 * MIB));
    let mut config = support::config_with_token(TOKEN);
    // Sessions count as idle for shedding after a quarter of this: 1 s.
    config.gateway.session_idle_timeout_secs = 4;
    let daemon = support::start_with(
        Context::builder(config)
            .with_heap_source(Arc::clone(&heap))
            .with_agent(ScriptedAgent),
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = post_message(&daemon, r#"{"content": "one"}"#).json()["session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        for text in ["two", "three"] {
            post_message(
                &daemon,
                &format!(r#"{{"session_id": "{id}", "content": "{text}"}}"#),
            );
        }
        ids.push(id);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1200));
    heap.set(160 * MIB);
    daemon.tick();

    // The longest-idle (first) session is closed; the others keep their last 2 messages.
    daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{}", ids[0]), None)
        .assert_error(404, "session_not_found");
    for id in &ids[1..] {
        let info = daemon
            .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
            .json();
        assert_eq!(info["history_messages"], 2, "{info}");
        assert_eq!(info["message_count"], 6, "{info}");
    }
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    let shed = |reason| exposition.value("blufio_sessions_shed_total", &[("reason", reason)]);
    assert_eq!(shed("history_trimmed"), Some(3.0));
    assert_eq!(shed("pressure_evicted"), Some(1.0));
    assert_eq!(daemon.get("/health").json()["active_sessions"], 2);
    daemon.stop();
}

#[test]
fn a_thousand_concurrent_sessions_open_and_close_and_the_gauge_returns_to_zero() {
    let mut config = Config::for_tests();
    config.gateway.max_sessions = 2000;
    let daemon = Arc::new(start_gateway(config));
    // `TestDaemon` is shared with worker threads through `Arc`; each sends real requests.
    let workers: Vec<_> = (0..20)
        .map(|_| {
            let daemon = Arc::clone(&daemon);
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| {
                        let created = daemon.authed(TOKEN, "POST", "/v1/sessions", None);
                        assert_eq!(created.status, 201, "{}", created.body);
                        created.json()["id"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let ids: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 1000);
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1000);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(
        exposition.value("blufio_active_sessions", &[]),
        Some(1000.0)
    );

    let chunks: Vec<Vec<String>> = ids.chunks(50).map(<[String]>::to_vec).collect();
    let deleters: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let daemon = Arc::clone(&daemon);
            std::thread::spawn(move || {
                for id in chunk {
                    let deleted =
                        daemon.authed(TOKEN, "DELETE", &format!("/v1/sessions/{id}"), None);
                    assert_eq!(deleted.status, 204);
                }
            })
        })
        .collect();
    for deleter in deleters {
        deleter.join().unwrap();
    }
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(exposition.value("blufio_active_sessions", &[]), Some(0.0));
}
