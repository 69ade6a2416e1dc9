//! `/v1/chat/completions` attacked: bodies built to make the parser allocate (10,000
//! messages, deep nesting, a huge `stop` list), a stream whose client never reads, and a
//! request arriving while the daemon is above its memory limit. Each is refused or cut with a
//! clear error, reaches no upstream when refused, and costs the next client nothing.

use std::{
    io::{Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use blufio::{Config, Context, FixedRss, ManualHeap, Provider};
use serde_json::{Value, json};

use crate::{
    fake_provider::{self, FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon},
};

const MIB: u64 = 1024 * 1024;

/// The `[agent]` shorthand in front of an OpenAI-compatible fake: one model, `test-model`.
fn shorthand(fake: &FakeProvider) -> Config {
    let mut config = support::provider_config(Provider::OpenAi, fake.url(), "sk-k", "test-model");
    config.agent.timeout_secs = 30;
    config
}

fn complete(daemon: &TestDaemon, body: &str) -> blufio_testkit::http::Response {
    daemon.authed(TOKEN, "POST", "/v1/chat/completions", Some(body))
}

/// Asserts a 400 naming `param`, and that the daemon still answers a good request at once.
fn assert_refused(daemon: &TestDaemon, fake: &FakeProvider, body: &str, param: &str) {
    let reached = fake.requests().len();
    let started = Instant::now();
    let response = complete(daemon, body);
    assert_eq!(response.status, 400, "{}", response.body);
    let error = &response.json()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    assert_eq!(error["param"], param, "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused in {:?}",
        started.elapsed()
    );
    assert_eq!(
        fake.requests().len(),
        reached,
        "a refused request reached the upstream"
    );
    fake.push([Scripted::ok(&fake_provider::openai_reply("fine", 1, 1))]);
    let ok = complete(
        daemon,
        &json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[test]
fn ten_thousand_messages_are_refused_by_count_before_they_are_built() {
    let fake = FakeProvider::start();
    let daemon = support::start(shorthand(&fake));
    let messages: Vec<Value> = (0..10_000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let body = json!({"model": "test-model", "messages": messages}).to_string();
    assert!(
        body.len() < 1024 * 1024,
        "within the body limit: the parser's bound is tested"
    );
    assert_refused(&daemon, &fake, &body, "messages");
    daemon.stop();
}

#[test]
fn deep_content_arrays_and_huge_stop_lists_are_refused_by_name() {
    let fake = FakeProvider::start();
    let daemon = support::start(shorthand(&fake));
    let deep = format!(
        r#"{{"model":"test-model","messages":[{{"role":"user","content":{}x{}}}]}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let response = complete(&daemon, &deep);
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.json()["error"]["type"], "invalid_request_error");
    let parts: Vec<Value> = (0..10_000)
        .map(|_| json!({"type": "text", "text": "x"}))
        .collect();
    let many_parts =
        json!({"model": "test-model", "messages": [{"role": "user", "content": parts}]});
    assert_refused(
        &daemon,
        &fake,
        &many_parts.to_string(),
        "messages.[0].content",
    );
    let stop: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
    let huge_stop = json!({
        "model": "test-model", "stop": stop,
        "messages": [{"role": "user", "content": "x"}],
    });
    assert_refused(&daemon, &fake, &huge_stop.to_string(), "stop");
    daemon.stop();
}

#[test]
fn a_stream_whose_client_never_reads_is_cut_and_costs_others_nothing() {
    let fake = FakeProvider::start();
    // An upstream that keeps talking: 3.75 MiB in 8 KiB deltas (under the 4 MiB reply cap),
    // far more than the smallest receive window, the daemon's send buffer and its 32-delta
    // queue hold.
    let delta = "y".repeat(8 * 1024);
    let deltas: Vec<&str> = (0..480).map(|_| delta.as_str()).collect();
    fake.push([Scripted::Stream {
        chunks: fake_provider::openai_stream(&deltas, 10, 10),
        gap: Duration::from_millis(1),
        hang: true,
    }]);
    let mut config = shorthand(&fake);
    config.daemon.request_timeout_secs = 2;
    let daemon = support::start(config);
    let body = json!({
        "model": "test-model", "stream": true,
        "messages": [{"role": "user", "content": "talk"}],
    })
    .to_string();
    let mut silent = crate::hostile_edge::connect_from_with(
        std::net::Ipv4Addr::LOCALHOST,
        daemon.addr(),
        Some(1),
    )
    .unwrap();
    write!(
        silent,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The client never reads. Others are served meanwhile.
    for _ in 0..3 {
        assert_eq!(daemon.get("/health").status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    fake.push([Scripted::ok(&fake_provider::openai_reply(
        "meanwhile",
        1,
        1,
    ))]);
    let other = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(complete(&daemon, &other.to_string()).status, 200);
    // The write stalls past request_timeout_secs: the connection, the exchange and the
    // upstream request are dropped.
    assert!(
        fake.wait_for_stream_cut(Duration::from_secs(15)),
        "the upstream stream was never cut"
    );
    // What the client finally reads ends without `[DONE]`: the stream was cut, not finished.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let _ = silent.read_to_end(&mut received);
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(!text.contains("data: [DONE]"), "the stream was not cut");
    daemon.stop();
}

#[test]
fn above_the_memory_limit_a_completion_is_a_503_in_openai_shape() {
    let fake = FakeProvider::start();
    let heap = Arc::new(ManualHeap::new(10 * MIB));
    let daemon = support::start_with(
        Context::builder(shorthand(&fake))
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(50 * MIB))),
    );
    heap.set(100_000 * MIB);
    daemon.tick();
    let body = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    let refused = complete(&daemon, &body.to_string());
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "overloaded");
    assert!(fake.requests().is_empty());
    heap.set(10 * MIB);
    daemon.tick();
    fake.push([Scripted::ok(&fake_provider::openai_reply("back", 1, 1))]);
    assert_eq!(complete(&daemon, &body.to_string()).status, 200);
    daemon.stop();
}
