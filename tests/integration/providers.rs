//! The Anthropic and OpenAI providers against fake upstreams on port 0, over real HTTP (and
//! TLS): history, usage and cost, retries, failures, streaming, cancellation, the budget.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use blufio::{Config, Provider};
use blufio_testkit::{
    http,
    process::{Daemon, write_config},
};

use crate::{
    fake_provider::{self, FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon},
};

const KEY: &str = "sk-test-9f8e7d6c5b4a";

fn provider_config(provider: Provider, fake: &FakeProvider) -> Config {
    support::provider_config(provider, fake.url(), KEY, "test-model")
}

fn start(provider: Provider, fake: &FakeProvider) -> TestDaemon {
    support::start(provider_config(provider, fake))
}

/// The `blufio_errors_total` series of `kind`.
fn errors(daemon: &TestDaemon, kind: &str) -> Option<f64> {
    support::metric(daemon, "blufio_errors_total", &[("type", kind)])
}

#[test]
fn anthropic_conversation_sends_the_whole_history_and_counts_usage_and_cost() {
    let fake = FakeProvider::start();
    fake.push([
        // Within what the prompts and max_tokens allow (usage beyond it is not charged).
        Scripted::ok(&fake_provider::anthropic_reply("Hello!", 500, 1000)),
        Scripted::ok(&fake_provider::anthropic_reply("Again!", 540, 0)),
    ]);
    let mut config = provider_config(Provider::Anthropic, &fake);
    config.agent.system = Some("be brief".to_owned());
    config.cost.daily_budget_usd = 5.0;
    let daemon = support::start(config);

    let first = support::post_message(&daemon, r#"{"content": "hi"}"#);
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    assert_eq!(first["content"], "Hello!");
    assert_eq!(first["usage"]["input_tokens"], 500);
    let id = first["session_id"].as_str().unwrap();
    let second = support::post_message(
        &daemon,
        &format!(r#"{{"session_id": "{id}", "content": "more"}}"#),
    );
    assert_eq!(second.json()["content"], "Again!");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let last = &requests[1];
    assert_eq!(last.path, "/v1/messages");
    assert_eq!(last.header("x-api-key"), Some(KEY));
    assert_eq!(last.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        last.body,
        serde_json::json!({
            "model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "be brief",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "more"},
            ],
        })
    );
    // One connection served both calls: it is kept alive and reused.
    assert_eq!(fake.connections(), 1);

    let model = ("model", "claude-sonnet-4-5");
    assert_eq!(
        support::metric(&daemon, "blufio_tokens_total", &[model, ("type", "input")]),
        Some(1040.0)
    );
    assert_eq!(
        support::metric(&daemon, "blufio_tokens_total", &[model, ("type", "output")]),
        Some(1000.0)
    );
    // 1040 input at $3/M + 1000 output at $15/M = $0.00312 + $0.015.
    let cost = support::metric(&daemon, "blufio_cost_usd_total", &[model]).unwrap();
    assert!((cost - 0.01812).abs() < 1e-9, "{cost}");
    let remaining = support::metric(&daemon, "blufio_budget_remaining_usd", &[]).unwrap();
    assert!((remaining - 4.98188).abs() < 1e-9, "{remaining}");
    daemon.stop();
}

#[test]
fn openai_conversation_sends_the_system_prompt_history_and_bearer_key() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::ok(&fake_provider::openai_reply("pong", 7, 3)));
    let mut config = provider_config(Provider::OpenAi, &fake);
    config.agent.system = Some("sys".to_owned());
    let daemon = support::start(config);
    let first = support::post_message(&daemon, r#"{"content": "ping"}"#).json();
    let id = first["session_id"].as_str().unwrap();
    let second = support::post_message(
        &daemon,
        &format!(r#"{{"session_id": "{id}", "content": "ping 2"}}"#),
    )
    .json();
    assert_eq!(second["content"], "pong");
    assert_eq!(second["usage"]["output_tokens"], 3);
    let requests = fake.requests();
    assert_eq!(requests[1].path, "/v1/chat/completions");
    assert_eq!(
        requests[1].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        requests[1].body["messages"],
        serde_json::json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": "pong"},
            {"role": "user", "content": "ping 2"},
        ])
    );
    assert_eq!(
        support::metric(
            &daemon,
            "blufio_tokens_total",
            &[("model", "test-model"), ("type", "input")]
        ),
        Some(14.0)
    );
    // An unknown (local) model is free.
    assert_eq!(
        support::metric(&daemon, "blufio_cost_usd_total", &[("model", "test-model")]),
        Some(0.0)
    );
    daemon.stop();
}

#[test]
fn a_429_then_200_is_retried_after_retry_after() {
    let fake = FakeProvider::start();
    fake.push([
        Scripted::status(429, &[("retry-after", "1")], r#"{"type":"error"}"#),
        Scripted::ok(&fake_provider::anthropic_reply("finally", 1, 1)),
    ]);
    let daemon = start(Provider::Anthropic, &fake);
    let started = Instant::now();
    let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["content"], "finally");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(fake.requests().len(), 2);
    daemon.stop();
}

#[test]
fn a_429_asking_for_a_long_wait_is_passed_on_with_retry_after() {
    let fake = FakeProvider::start();
    fake.push([Scripted::status(429, &[("retry-after", "60")], "{}")]);
    let daemon = start(Provider::OpenAi, &fake);
    let started = Instant::now();
    let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
    reply.assert_error(429, "rate_limited");
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        fake.requests().len(),
        1,
        "a wait beyond 20 s is not spent in the daemon"
    );
    assert_eq!(errors(&daemon, "agent_rate_limit"), Some(1.0));
    daemon.stop();
}

#[test]
fn a_stream_without_usage_is_charged_by_estimate() {
    let fake = FakeProvider::start();
    let mut chunks = fake_provider::openai_stream(&["abcd", "efgh"], 0, 0);
    // Drop the usage chunk, as servers that ignore stream_options do.
    chunks.remove(2);
    fake.push([Scripted::Stream {
        chunks,
        gap: Duration::ZERO,
        hang: false,
    }]);
    let daemon = start(Provider::OpenAi, &fake);
    let response = support::post_message(&daemon, r#"{"content": "12345678", "stream": true}"#);
    let (name, done) = sse_events(&response.body).pop().unwrap();
    assert_eq!(name, "done");
    assert_eq!(done["content"], "abcdefgh");
    // Four characters per token: 8 characters in, 8 out.
    assert_eq!(done["usage"]["input_tokens"], 2);
    assert_eq!(done["usage"]["output_tokens"], 2);
    daemon.stop();
}

#[test]
fn overloaded_and_server_errors_exhaust_retries_into_a_clean_502() {
    let fake = FakeProvider::start();
    let secret_body = r#"{"type":"error","error":{"type":"overloaded_error","message":"internal upstream detail"}}"#;
    fake.push([
        Scripted::status(529, &[], secret_body),
        Scripted::status(500, &[], secret_body),
        Scripted::status(529, &[], secret_body),
    ]);
    let daemon = start(Provider::Anthropic, &fake);
    let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
    reply.assert_error(502, "agent_upstream");
    assert!(
        !reply.body.contains("internal upstream detail"),
        "{}",
        reply.body
    );
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(errors(&daemon, "agent_upstream"), Some(1.0));
    let health = daemon.authed(TOKEN, "GET", "/v1/health", None).json();
    let upstream = &health["upstream"];
    assert_eq!(upstream["provider"], "anthropic");
    assert_eq!(upstream["api_key"], "set");
    assert!(
        upstream["last_error"]
            .as_str()
            .unwrap()
            .contains("529 overloaded"),
        "{upstream}"
    );
    assert!(upstream["last_error_at_unix"].as_u64().unwrap() > 1_600_000_000);
    assert!(!health.to_string().contains(KEY));
    daemon.stop();
}

#[test]
fn other_4xx_is_not_retried_and_not_dumped() {
    let fake = FakeProvider::start();
    fake.push([Scripted::status(
        401,
        &[],
        r#"{"error":{"message":"invalid x-api-key sk-test-9f8e7d6c5b4a"}}"#,
    )]);
    let daemon = start(Provider::Anthropic, &fake);
    let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
    reply.assert_error(502, "agent_rejected");
    assert!(reply.body.contains("HTTP 401"), "{}", reply.body);
    assert!(!reply.body.contains("invalid x-api-key"), "{}", reply.body);
    assert!(!reply.body.contains(KEY));
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(errors(&daemon, "agent_rejected"), Some(1.0));
    daemon.stop();
}

#[test]
fn a_slow_upstream_hits_the_timeout_with_504() {
    let fake = FakeProvider::start();
    fake.push([Scripted::Slow(
        Duration::from_secs(4),
        fake_provider::openai_reply("late", 1, 1),
    )]);
    let mut config = provider_config(Provider::OpenAi, &fake);
    config.agent.timeout_secs = 1;
    let daemon = support::start(config);
    let started = Instant::now();
    support::post_message(&daemon, r#"{"content": "hi"}"#).assert_error(504, "agent_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        support::metric(&daemon, "blufio_errors_total", &[("type", "agent_timeout")]),
        Some(1.0)
    );
    daemon.stop();
}

#[test]
fn malformed_upstream_json_is_a_502() {
    let fake = FakeProvider::start();
    fake.push([
        Scripted::ok("<html>bad gateway</html>"),
        Scripted::ok(r#"{"choices": []}"#),
    ]);
    let daemon = start(Provider::OpenAi, &fake);
    for _ in 0..2 {
        let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
        reply.assert_error(502, "agent_malformed");
        assert!(!reply.body.contains("<html>"));
    }
    assert_eq!(errors(&daemon, "agent_malformed"), Some(2.0));
    daemon.stop();
}

/// Splits an event-stream body into (event, data JSON) pairs.
fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_owned();
                }
            }
            (name, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

#[test]
fn an_anthropic_stream_arrives_as_sse_deltas_in_order_then_usage() {
    let fake = FakeProvider::start();
    fake.push([Scripted::Stream {
        chunks: fake_provider::anthropic_stream(&["Hel", "lo, ", "world"], 12, 5),
        gap: Duration::from_millis(10),
        hang: false,
    }]);
    let daemon = start(Provider::Anthropic, &fake);
    let response = support::post_message(&daemon, r#"{"content": "hi", "stream": true}"#);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let events = sse_events(&response.body);
    let deltas: Vec<&str> = events
        .iter()
        .filter(|(name, _)| name == "delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Hel", "lo, ", "world"]);
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done");
    assert_eq!(done["content"], "Hello, world");
    assert_eq!(done["usage"]["input_tokens"], 12);
    assert_eq!(done["usage"]["output_tokens"], 5);
    assert_eq!(fake.requests()[0].body["stream"], true);
    let id = done["session_id"].as_str().unwrap();
    let session = daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .json();
    assert_eq!(session["message_count"], 2);
    assert_eq!(
        support::metric(
            &daemon,
            "blufio_tokens_total",
            &[("model", "claude-sonnet-4-5"), ("type", "output")]
        ),
        Some(5.0)
    );
    assert_eq!(
        support::metric(&daemon, "blufio_time_to_first_token_seconds_count", &[]),
        Some(1.0)
    );
    daemon.stop();
}

#[test]
fn an_openai_stream_arrives_as_websocket_delta_frames_then_a_final_frame() {
    use async_tungstenite::tungstenite::Message;
    use futures_lite::StreamExt;

    let fake = FakeProvider::start();
    fake.push([Scripted::Stream {
        chunks: fake_provider::openai_stream(&["one ", "two ", "three"], 4, 3),
        gap: Duration::from_millis(10),
        hang: false,
    }]);
    let daemon = start(Provider::OpenAi, &fake);
    let mut ws = support::ws_authed(&daemon);
    let frames = async_io::block_on(async {
        ws.send(Message::text(r#"{"content": "count", "stream": true}"#))
            .await
            .unwrap();
        let mut frames = Vec::new();
        loop {
            let Message::Text(text) = ws.next().await.unwrap().unwrap() else {
                continue;
            };
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            let done = frame["type"] != "delta";
            frames.push(frame);
            if done {
                return frames;
            }
        }
    });
    let deltas: Vec<&str> = frames
        .iter()
        .filter(|frame| frame["type"] == "delta")
        .map(|frame| frame["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["one ", "two ", "three"]);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["content"], "one two three");
    assert_eq!(done["usage"]["input_tokens"], 4);
    assert_eq!(
        fake.requests()[0].body["stream_options"]["include_usage"],
        true
    );
    daemon.stop();
}

#[test]
fn a_client_dropping_mid_stream_cancels_the_upstream_and_is_still_charged() {
    let fake = FakeProvider::start();
    // Everything up to the first delta, then the upstream keeps "thinking".
    fake.push([fake_provider::anthropic_hanging(50)]);
    let daemon = start(Provider::Anthropic, &fake);
    let body = r#"{"content": "tell me a long story", "stream": true}"#;
    let mut stream = TcpStream::connect(daemon.gateway_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(http::message_request(TOKEN, body).as_bytes())
        .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0; 1024];
    while !String::from_utf8_lossy(&seen).contains("event: delta") {
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "stream ended early");
        seen.extend_from_slice(&buffer[..read]);
    }
    drop(stream);
    assert!(
        fake.wait_for_stream_cut(Duration::from_secs(10)),
        "the upstream request was not cancelled"
    );
    // The reported input tokens are still charged.
    let mut charged = None;
    for _ in 0..200 {
        charged = support::metric(
            &daemon,
            "blufio_tokens_total",
            &[("model", "claude-sonnet-4-5"), ("type", "input")],
        );
        if charged == Some(50.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(charged, Some(50.0));
    // The session the message opened is closed: the client never learned its id.
    let sessions = daemon.authed(TOKEN, "GET", "/v1/sessions", None).json();
    assert_eq!(sessions["sessions"], serde_json::json!([]), "{sessions}");
    let cost = support::metric(
        &daemon,
        "blufio_cost_usd_total",
        &[("model", "claude-sonnet-4-5")],
    )
    .unwrap();
    assert!(cost > 0.0);
    daemon.stop();
}

#[test]
fn the_budget_stops_calls_once_spent_and_stays_spent_after_a_restart() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::ok(&fake_provider::anthropic_reply("ok", 1, 0)));
    let state_dir = support::temp_dir("budget");
    let config = || {
        let mut config = provider_config(Provider::Anthropic, &fake);
        config.daemon.state_dir = Some(state_dir.to_path_buf());
        config.cost.daily_budget_usd = 1.0;
        // One input token costs 2 USD here, so the first reply spends the day's budget.
        config.cost.models.insert(
            "claude-sonnet-4-5".to_owned(),
            blufio::ModelPrice {
                input_usd_per_mtok: 2_000_000.0,
                output_usd_per_mtok: 0.0,
            },
        );
        config
    };
    let daemon = support::start(config());
    assert_eq!(
        support::post_message(&daemon, r#"{"content": "hi"}"#).status,
        200
    );
    let refused = support::post_message(&daemon, r#"{"content": "hi"}"#);
    refused.assert_error(429, "budget_exhausted");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    assert_eq!(fake.requests().len(), 1, "no upstream call once spent");
    assert_eq!(
        support::metric(&daemon, "blufio_budget_remaining_usd", &[]),
        Some(0.0)
    );
    daemon.stop();

    let restarted = support::start(config());
    restarted
        .authed(TOKEN, "POST", "/v1/messages", Some(r#"{"content": "hi"}"#))
        .assert_error(429, "budget_exhausted");
    assert_eq!(fake.requests().len(), 1);
    let health = restarted.authed(TOKEN, "GET", "/v1/health", None).json();
    assert_eq!(health["budget"]["spent_today_usd"], 2.0);
    restarted.stop();
    std::fs::remove_dir_all(&state_dir).unwrap();
}

#[test]
fn a_truncated_state_file_is_reported_not_zeroed() {
    let fake = FakeProvider::start();
    let state_dir = support::temp_dir("truncated");
    let state_file = state_dir.join("spend.json");
    std::fs::write(&state_file, r#"{"version":1,"utc_day":20000,"spent_u"#).unwrap();
    let mut config = provider_config(Provider::Anthropic, &fake);
    config.daemon.state_dir = Some(state_dir.to_path_buf());
    let error = blufio::Context::new(config).unwrap_err();
    assert!(error.is_config(), "exit 78");
    let message = error.to_string();
    assert!(message.contains("spend.json"), "{message}");
    assert!(message.contains("not valid JSON"), "{message}");
    // The file is left for the operator to inspect.
    assert_eq!(
        std::fs::read_to_string(&state_file).unwrap(),
        r#"{"version":1,"utc_day":20000,"spent_u"#
    );
    std::fs::remove_dir_all(&state_dir).unwrap();
}

#[cfg(feature = "tls")]
#[test]
fn a_private_ca_in_ca_file_secures_the_upstream_and_the_bundle_refuses_it() {
    let (ca_pem, server_config) = fake_provider::tls_pair();
    let fake = FakeProvider::start_with(Some(server_config));
    fake.set_fallback(Scripted::ok(&fake_provider::openai_reply("over tls", 1, 1)));
    let dir = support::temp_dir("tls");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let mut config = provider_config(Provider::OpenAi, &fake);
    config.agent.ca_file = Some(ca_file);
    let daemon = support::start(config);
    let reply = support::post_message(&daemon, r#"{"content": "hi"}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["content"], "over tls");
    daemon.stop();

    // Without ca_file only the public roots are trusted: the handshake fails.
    let daemon = start(Provider::OpenAi, &fake);
    support::post_message(&daemon, r#"{"content": "hi"}"#).assert_error(502, "agent_upstream");
    assert_eq!(fake.requests().len(), 1);
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_api_key_appears_in_no_log_line_and_no_response() {
    let fake = FakeProvider::start();
    let failing = format!(r#"{{"error":"bad key {KEY}"}}"#);
    fake.push([
        Scripted::ok(&fake_provider::anthropic_reply("fine", 3, 1)),
        Scripted::status(401, &[], &failing),
        Scripted::status(500, &[], &failing),
        Scripted::status(500, &[], &failing),
        Scripted::status(500, &[], &failing),
        Scripted::ok("not json"),
    ]);
    let port = support::free_port();
    let dir = support::temp_dir("provider-key");
    let config_path = write_config(
        &dir,
        &format!(
            "[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n\
             [agent]\nprovider = \"anthropic\"\nbase_url = \"{}\"\n",
            fake.url()
        ),
    );
    let mut command = support::binary().serve_command(&config_path);
    command
        .env("BLUFIO_LOG", "trace")
        .env("ANTHROPIC_API_KEY", KEY);
    let mut daemon = Daemon::start(&mut command, config_path);
    let addr = daemon.addr();
    let mut log = daemon.startup.clone();
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let mut responses = Vec::new();
    for expected in [200, 502, 502, 502] {
        let response = support::request(
            addr,
            "POST",
            "/v1/messages",
            &headers,
            Some(r#"{"content": "hi"}"#),
        );
        assert_eq!(response.status, expected, "{}", response.body);
        responses.push(response);
    }
    let health = support::request(addr, "GET", "/v1/health", &headers, None);
    assert_eq!(health.json()["upstream"]["api_key"], "set");
    responses.push(health);
    responses.push(support::request(addr, "GET", "/metrics", &[], None));
    assert_eq!(fake.requests()[0].header("x-api-key"), Some(KEY));

    log.extend(daemon.stop(support::EXIT_TIMEOUT));
    assert!(
        log.iter().any(|line| line.contains("retrying in")),
        "the failures were logged: {log:?}"
    );
    for line in &log {
        assert!(!line.contains(KEY), "key in log line: {line}");
    }
    for response in &responses {
        assert!(
            !response.body.contains(KEY),
            "key in response: {}",
            response.body
        );
        for (name, value) in &response.headers {
            assert!(!value.contains(KEY), "key in header {name}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_provider_without_its_key_or_with_a_bad_base_url_exits_78() {
    let dir = support::temp_dir("provider-config");
    for (name, agent, expected) in [
        (
            "nokey",
            "provider = \"anthropic\"\nbase_url = \"http://127.0.0.1:9\"\n",
            "ANTHROPIC_API_KEY",
        ),
        (
            "badurl",
            "provider = \"openai\"\nmodel = \"m\"\nbase_url = \"localhost:11434\"\n",
            "[agent] base_url",
        ),
        // Host names are ASCII only (the binary leaves out IDNA tables): the punycode form
        // is the way to name an internationalised host.
        (
            "idn",
            "provider = \"openai\"\nmodel = \"m\"\nbase_url = \"http://bücher.example/v1\"\n",
            "[agent] base_url",
        ),
    ] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, format!("[agent]\n{agent}")).unwrap();
        let output = support::binary()
            .command()
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_large_request_goes_up_whole_without_waiting_for_100_continue() {
    let fake = FakeProvider::start();
    fake.push([Scripted::ok(&fake_provider::openai_reply("ok", 5, 1))]);
    let daemon = start(Provider::OpenAi, &fake);
    // Well past trillium-client's default 1 KiB, above which it asked `Expect: 100-continue`
    // and, from this fake (which never sends `100 Continue`), waited a second for it.
    let content = "x".repeat(8 * 1024);
    let started = Instant::now();
    let response = support::post_message(&daemon, &format!(r#"{{"content": "{content}"}}"#));
    let took = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.body);
    let sent = &fake.requests()[0];
    assert_eq!(sent.header("expect"), None);
    assert_eq!(sent.body["messages"][0]["content"], content);
    assert!(took < Duration::from_millis(900), "took {took:?}");
    daemon.stop();
}
