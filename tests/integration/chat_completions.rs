//! `POST /v1/chat/completions` and `GET /v1/models` over real sockets, against fake Anthropic
//! and OpenAI-compatible upstreams: the OpenAI shapes, the translation to Anthropic, streams,
//! fallback and its metrics, and every error class in OpenAI's error shape.

use std::time::{Duration, Instant};

use blufio_testkit::http::Response;
use serde_json::{Value, json};

use crate::{
    fake_provider::{self, FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon},
};

fn complete(daemon: &TestDaemon, body: &Value) -> Response {
    daemon.authed(
        TOKEN,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    )
}

/// Asserts an OpenAI-shaped error with `status`, `type` and `code`; returns the error object.
fn assert_openai_error(response: &Response, status: u16, kind: &str, code: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.body);
    let body = response.json();
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error.get("param").is_some(),
        "param is always present: {body}"
    );
    error.clone()
}

fn metric(daemon: &TestDaemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    support::metric(daemon, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
}

#[test]
fn models_lists_every_alias_owned_by_its_provider() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    let response = daemon.authed(TOKEN, "GET", "/v1/models", None);
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["object"], "list");
    let models: Vec<(String, String)> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| {
            assert_eq!(model["object"], "model");
            assert!(model["created"].as_u64().is_some());
            (
                model["id"].as_str().unwrap().to_owned(),
                model["owned_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("llama".to_owned(), "pi".to_owned()),
            ("sonnet".to_owned(), "claude".to_owned())
        ]
    );
    // One model, as the SDKs' `models.retrieve` asks for it.
    let one = daemon.authed(TOKEN, "GET", "/v1/models/llama", None);
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(
        (one.json()["id"].as_str(), one.json()["owned_by"].as_str()),
        (Some("llama"), Some("pi"))
    );
    assert_eq!(one.json()["object"], "model");
    let missing = daemon.authed(TOKEN, "GET", "/v1/models/gpt-9", None);
    assert_openai_error(&missing, 404, "invalid_request_error", "model_not_found");
    daemon.stop();
}

#[test]
fn an_anthropic_upstream_is_translated_both_ways() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let mut reply: Value =
        serde_json::from_str(&fake_provider::anthropic_reply("Hi there", 12, 3)).unwrap();
    reply["stop_reason"] = json!("max_tokens");
    cloud.push([Scripted::ok(&reply.to_string())]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = complete(
        &daemon,
        &json!({
            "model": "sonnet",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            ],
            "max_completion_tokens": 50,
            "stop": "END",
            "temperature": 0.2,
        }),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-blufio-model"), Some("sonnet"));
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "sonnet");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hi there");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})
    );
    let sent = &cloud.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(
        sent.body,
        json!({
            "model": "claude-sonnet-4-5", "max_tokens": 50, "system": "be brief",
            "temperature": 0.2, "stop_sequences": ["END"],
            "messages": [{"role": "user", "content": "hello"}],
        })
    );
    assert!(local.requests().is_empty());
    daemon.stop();
}

#[test]
fn an_openai_compatible_upstream_gets_the_conversation_in_place() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    local.push([Scripted::ok(&fake_provider::openai_reply("pong", 5, 1))]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = complete(
        &daemon,
        &json!({
            "model": "llama",
            "messages": [
                {"role": "user", "content": "ping"},
                {"role": "assistant", "content": "pong"},
                {"role": "developer", "content": "answer in one word"},
                {"role": "user", "content": "ping"},
            ],
            "user": "u-7", "seed": 3, "store": false,
        }),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["model"], "llama");
    assert_eq!(body["choices"][0]["message"]["content"], "pong");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let sent = &local.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.body,
        json!({
            "model": "llama3.2", "max_tokens": 64, "user": "u-7",
            "messages": [
                {"role": "user", "content": "ping"},
                {"role": "assistant", "content": "pong"},
                {"role": "system", "content": "answer in one word"},
                {"role": "user", "content": "ping"},
            ],
        })
    );
    daemon.stop();
}

/// The `data:` payloads of an SSE body, in order, with the comments counted.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_stream_from_anthropic_becomes_chunks_with_usage_and_done() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    cloud.push([Scripted::Stream {
        chunks: fake_provider::anthropic_stream(&["Hel", "lo"], 9, 2),
        gap: Duration::from_millis(5),
        hang: false,
    }]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = complete(
        &daemon,
        &json!({
            "model": "sonnet", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}],
        }),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let data = sse_data(&response.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|chunk| serde_json::from_str(chunk).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "sonnet");
        assert_eq!(chunk["id"], id);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
    );
    assert_eq!(cloud.requests()[0].body["stream"], true);
    daemon.stop();
}

#[test]
fn an_overloaded_cloud_falls_back_to_the_local_model_and_says_so() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    cloud.push([Scripted::status(529, &[], r#"{"type":"error"}"#)]);
    local.push([Scripted::ok(&fake_provider::openai_reply(
        "local answer",
        4,
        2,
    ))]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = complete(
        &daemon,
        &json!({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["model"], "sonnet", "the alias asked for");
    assert_eq!(response.header("x-blufio-model"), Some("llama"));
    assert_eq!(body["choices"][0]["message"]["content"], "local answer");
    // One try at the cloud (no retries when a fallback waits), then the local model.
    assert_eq!(cloud.requests().len(), 1);
    assert_eq!(local.requests().len(), 1);
    assert_eq!(
        metric(
            &daemon,
            "blufio_fallbacks_total",
            &[("from", "sonnet"), ("to", "llama")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &daemon,
            "blufio_upstream_requests_total",
            &[("provider", "claude"), ("status", "529")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &daemon,
            "blufio_upstream_requests_total",
            &[("provider", "pi"), ("status", "2xx")]
        ),
        1.0
    );
    // `/v1/health` lists each provider with its last error and success.
    let health = daemon.authed(TOKEN, "GET", "/v1/health", None).json();
    let providers = health["providers"].as_array().expect("providers listed");
    assert_eq!(providers.len(), 2, "{health}");
    let (claude, pi) = (&providers[0], &providers[1]);
    assert_eq!(
        (claude["name"].as_str(), claude["provider"].as_str()),
        (Some("claude"), Some("anthropic"))
    );
    assert!(claude["last_error"].as_str().is_some(), "{claude}");
    assert!(claude["last_success_at_unix"].is_null(), "{claude}");
    assert_eq!(
        (pi["name"].as_str(), pi["provider"].as_str()),
        (Some("pi"), Some("openai"))
    );
    assert!(
        pi["last_error"].is_null() && pi["last_success_at_unix"].is_u64(),
        "{pi}"
    );
    assert!(
        !health.to_string().contains("sk-test-key"),
        "no key in /v1/health"
    );
    let metrics = daemon.get_ok("/metrics");
    assert!(
        metrics.contains("blufio_gateway_overhead_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("blufio_upstream_latency_seconds_count{provider=\"pi\"} 1"),
        "{metrics}"
    );
    daemon.stop();
}

#[test]
fn a_refusal_does_not_fall_back_and_a_failed_last_hop_is_a_502() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    cloud.push([Scripted::status(400, &[], r#"{"type":"error"}"#)]);
    let daemon = support::two_providers(&cloud, &local, "");
    let message = json!({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]});
    assert_openai_error(
        &complete(&daemon, &message),
        502,
        "server_error",
        "upstream_error",
    );
    assert!(local.requests().is_empty(), "a 400 is not worth a fallback");
    // The last hop of a chain gets its retries: three 500s, then 502.
    local.push([
        Scripted::status(500, &[], "{}"),
        Scripted::status(500, &[], "{}"),
        Scripted::status(500, &[], "{}"),
    ]);
    let llama = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    let error = assert_openai_error(
        &complete(&daemon, &llama),
        502,
        "server_error",
        "upstream_error",
    );
    assert!(
        !error.to_string().contains("HTTP 500"),
        "no upstream detail: {error}"
    );
    assert_eq!(local.requests().len(), 3);
    assert_eq!(daemon.get("/health").status, 200);
    daemon.stop();
}

#[test]
fn a_silent_provider_times_out_into_the_fallback_within_its_own_timeout() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    cloud.set_fallback(Scripted::Slow(
        Duration::from_secs(5),
        fake_provider::anthropic_reply("late", 1, 1),
    ));
    local.push([Scripted::ok(&fake_provider::openai_reply("quick", 1, 1))]);
    // The cloud gets 1 s of the request's 10 s.
    let daemon = support::start(support::two_providers_config(
        &cloud,
        &local,
        "timeout_secs = 1",
        "",
    ));
    let started = Instant::now();
    let response = complete(
        &daemon,
        &json!({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-blufio-model"), Some("llama"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &daemon,
            "blufio_upstream_requests_total",
            &[("provider", "claude"), ("status", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &daemon,
            "blufio_fallbacks_total",
            &[("from", "sonnet"), ("to", "llama")]
        ),
        1.0
    );
    daemon.stop();
}

#[test]
fn a_deadline_past_is_a_504_and_a_spent_budget_is_insufficient_quota() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    // The fake names its model `test-model`: usage is priced as the model that answered.
    let priced = "[cost]\ndaily_budget_usd = 0.001\n[cost.models.\"test-model\"]\ninput_usd_per_mtok = 1000.0\noutput_usd_per_mtok = 1000.0";
    let mut config = support::two_providers_config(&cloud, &local, "", priced);
    config.agent.timeout_secs = 1;
    let daemon = support::start(config);
    let llama = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    local.push([Scripted::Slow(
        Duration::from_secs(3),
        fake_provider::openai_reply("late", 1, 1),
    )]);
    assert_openai_error(
        &complete(&daemon, &llama),
        504,
        "server_error",
        "upstream_timeout",
    );
    // 4 + 2 tokens at $1,000 per million: $0.006, over the day's $0.001.
    local.push([Scripted::ok(&fake_provider::openai_reply("costly", 4, 2))]);
    assert_eq!(complete(&daemon, &llama).status, 200);
    let spent = complete(&daemon, &llama);
    assert_openai_error(&spent, 429, "insufficient_quota", "insufficient_quota");
    assert!(spent.header("retry-after").is_some());
    daemon.stop();
}

#[test]
fn an_upstream_rate_limit_without_a_fallback_is_a_429_with_its_retry_after() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    local.push([Scripted::status(429, &[("retry-after", "30")], "{}")]);
    let llama = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    let limited = complete(&daemon, &llama);
    assert_openai_error(&limited, 429, "requests", "rate_limit_exceeded");
    assert_eq!(limited.header("retry-after"), Some("30"));
    daemon.stop();
}

#[test]
fn every_error_class_has_openai_shape_and_status() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "max_request_bytes = 4096");
    let hi = json!({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]});
    // 401: no token, a wrong token.
    let none = support::request(
        daemon.addr(),
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&hi.to_string()),
    );
    assert_openai_error(&none, 401, "invalid_request_error", "invalid_api_key");
    let wrong = daemon.authed("not-the-token", "GET", "/v1/models", None);
    assert_openai_error(&wrong, 401, "invalid_request_error", "invalid_api_key");
    // 404: an unknown model.
    let unknown = complete(
        &daemon,
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    );
    let error = assert_openai_error(&unknown, 404, "invalid_request_error", "model_not_found");
    assert_eq!(error["param"], "model");
    // 400: a parameter blufio cannot honour, an unknown one, no user message.
    let tools = complete(
        &daemon,
        &json!({"model": "sonnet", "messages": [{"role": "user", "content": "x"}], "tools": []}),
    );
    assert_eq!(tools.status, 400, "{}", tools.body);
    assert_eq!(tools.json()["error"]["param"], "tools");
    let typo = complete(
        &daemon,
        &json!({"model": "sonnet", "messages": [{"role": "user", "content": "x"}], "temprature": 1}),
    );
    assert_eq!(typo.status, 400);
    assert_eq!(typo.json()["error"]["param"], "temprature");
    let only_system = complete(
        &daemon,
        &json!({"model": "sonnet", "messages": [{"role": "system", "content": "x"}]}),
    );
    assert_eq!(only_system.json()["error"]["param"], "messages");
    // 413: a declared length over max_request_bytes, in OpenAI's shape, before the body.
    let head_only = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    );
    let big = support::send_raw(daemon.addr(), head_only.as_bytes());
    assert_eq!(big.status, 413, "{}", big.body);
    assert_eq!(big.json()["error"]["code"], "payload_too_large");
    assert!(
        big.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_request_bytes")
    );
    // Nothing reached an upstream.
    assert!(cloud.requests().is_empty() && local.requests().is_empty());
    assert_eq!(daemon.get("/health").status, 200);
    daemon.stop();
}
