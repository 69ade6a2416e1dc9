//! Choosing the model on the session path over real sockets: a `"model"` in a
//! `/v1/messages` body or a `/ws` frame, a session's own `model` and `system` prompt, the
//! 404 for an alias the daemon does not route (before any session or upstream call), the
//! reply naming the alias that answered (a fallback's too), and the bounds on the options.
//! Against the two fake providers of `support::two_providers`: `sonnet` on the Anthropic
//! one, falling back to `llama` on the OpenAI-compatible one.

use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use blufio_testkit::http::Response;
use futures_lite::StreamExt;
use serde_json::{Value, json};

use crate::{
    fake_provider::{self, FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon, WsClient},
};

fn post(daemon: &TestDaemon, path: &str, body: &Value) -> Response {
    daemon.authed(TOKEN, "POST", path, Some(&body.to_string()))
}

/// Opens a session with `options` and returns its id.
fn open_session(daemon: &TestDaemon, options: &Value) -> String {
    let created = post(daemon, "/v1/sessions", options);
    assert_eq!(created.status, 201, "{}", created.body);
    created.json()["id"].as_str().unwrap().to_owned()
}

fn local_reply(text: &str) -> Scripted {
    Scripted::ok(&fake_provider::openai_reply(text, 3, 1))
}

fn cloud_reply(text: &str) -> Scripted {
    Scripted::ok(&fake_provider::anthropic_reply(text, 3, 1))
}

/// Sends a frame with `"stream": true` and returns every frame up to the `done` (or error).
fn ws_stream(client: &mut WsClient, text: &str) -> Vec<Value> {
    async_io::block_on(async {
        client.send(Message::text(text)).await.unwrap();
        let mut frames = Vec::new();
        loop {
            match client.next().await.expect("a frame").unwrap() {
                Message::Text(frame) => {
                    let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
                    let last = frame["type"] != "delta";
                    frames.push(frame);
                    if last {
                        return frames;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
}

#[test]
fn a_message_naming_llama_goes_to_the_local_model_and_the_reply_names_it() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    local.push([local_reply("from the pi")]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "model": "llama"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["content"], "from the pi");
    assert_eq!(body["model"], "llama");
    let sent = local.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(sent[0].body["model"], "llama3.2");
    assert!(
        cloud.requests().is_empty(),
        "the default model was not asked"
    );
    // Without a model, the default (`sonnet`, on the cloud) answers, and says so.
    cloud.push([cloud_reply("from the cloud")]);
    let response = post(&daemon, "/v1/messages", &json!({"content": "hi"}));
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["model"], "sonnet");
    assert_eq!(cloud.requests().len(), 1);
    daemon.stop();
}

#[test]
fn a_session_with_a_model_and_a_system_prompt_sends_every_message_there_with_it() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let mut config = support::two_providers_config(&cloud, &local, "", "");
    // The session's prompt replaces the model's configured one.
    config.models.get_mut("llama").unwrap().system = Some("configured".to_owned());
    let daemon = support::start(config);
    let created = post(
        &daemon,
        "/v1/sessions",
        &json!({"model": "llama", "system": "be terse"}),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["model"], "llama");
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let shown = daemon.authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(shown.json()["model"], "llama", "{}", shown.body);
    assert_eq!(shown.json()["system_bytes"], 8, "{}", shown.body);
    let listed = daemon.authed(TOKEN, "GET", "/v1/sessions", None).json();
    assert_eq!(listed["sessions"][0]["model"], "llama", "{listed}");
    local.push([local_reply("one"), local_reply("two")]);
    for text in ["first", "second"] {
        let response = post(
            &daemon,
            "/v1/messages",
            &json!({"session_id": id, "content": text}),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.json()["model"], "llama");
    }
    let sent = local.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[1].body["messages"],
        json!([
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second"},
        ])
    );
    assert!(cloud.requests().is_empty());
    // On an Anthropic upstream the prompt is the top-level `system`.
    let id = open_session(&daemon, &json!({"model": "sonnet", "system": "be terse"}));
    cloud.push([cloud_reply("ok")]);
    let response = post(
        &daemon,
        "/v1/messages",
        &json!({"session_id": id, "content": "hi"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let sent = cloud.requests();
    assert_eq!(sent[0].body["system"], "be terse");
    assert_eq!(
        sent[0].body["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
    daemon.stop();
}

#[test]
fn a_messages_model_overrides_the_sessions_and_keeps_its_system_prompt() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    let id = open_session(&daemon, &json!({"model": "llama", "system": "be terse"}));
    cloud.push([cloud_reply("from the cloud")]);
    let response = post(
        &daemon,
        "/v1/messages",
        &json!({"session_id": id, "content": "hi", "model": "sonnet"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["model"], "sonnet");
    assert_eq!(cloud.requests()[0].body["system"], "be terse");
    assert!(local.requests().is_empty());
    daemon.stop();
}

#[test]
fn an_unknown_model_is_404_before_any_session_or_upstream() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    let message = post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "model": "gpt-9"}),
    );
    message.assert_error(404, "model_not_found");
    assert!(message.body.contains("gpt-9"), "{}", message.body);
    let streamed = post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "model": "gpt-9", "stream": true}),
    );
    streamed.assert_error(404, "model_not_found");
    post(&daemon, "/v1/sessions", &json!({"model": "gpt-9"})).assert_error(404, "model_not_found");
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    // In an existing session too; the session stays as it was.
    let id = open_session(&daemon, &json!({}));
    post(
        &daemon,
        "/v1/messages",
        &json!({"session_id": id, "content": "hi", "model": "gpt-9"}),
    )
    .assert_error(404, "model_not_found");
    let shown = daemon.authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(shown.json()["message_count"], 0);
    assert!(cloud.requests().is_empty() && local.requests().is_empty());
    assert_eq!(
        support::metric(&daemon, "blufio_errors_total", &[("type", "not_found")]),
        Some(4.0)
    );
    daemon.stop();
}

#[test]
fn a_fallbacks_reply_names_the_model_that_answered() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    cloud.push([
        Scripted::status(529, &[], r#"{"type":"error"}"#),
        Scripted::status(529, &[], r#"{"type":"error"}"#),
    ]);
    local.push([
        local_reply("local answer"),
        Scripted::Stream {
            chunks: fake_provider::openai_stream(&["loc", "al"], 3, 2),
            gap: Duration::from_millis(5),
            hang: false,
        },
    ]);
    let daemon = support::two_providers(&cloud, &local, "");
    let response = post(&daemon, "/v1/messages", &json!({"content": "hi"}));
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.json()["model"],
        "llama",
        "sonnet failed, llama answered"
    );
    assert_eq!(response.json()["content"], "local answer");
    // A stream's `done` event names it too.
    let streamed = post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "stream": true}),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let done = streamed
        .body
        .split("\n\n")
        .find_map(|event| event.strip_prefix("event: done\ndata: "))
        .unwrap_or_else(|| panic!("no done event: {}", streamed.body));
    let done: Value = serde_json::from_str(done).unwrap();
    assert_eq!(
        (done["model"].as_str(), done["content"].as_str()),
        (Some("llama"), Some("local"))
    );
    assert_eq!(
        support::metric(
            &daemon,
            "blufio_fallbacks_total",
            &[("from", "sonnet"), ("to", "llama")]
        ),
        Some(2.0)
    );
    daemon.stop();
}

#[test]
fn a_websocket_frame_with_a_model_routes_the_same() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    let mut ws = support::ws_authed(&daemon);
    local.push([
        local_reply("over ws"),
        Scripted::Stream {
            chunks: fake_provider::openai_stream(&["str", "eam"], 3, 2),
            gap: Duration::from_millis(5),
            hang: false,
        },
    ]);
    let reply = support::ws_exchange(&mut ws, r#"{"content": "hi", "model": "llama"}"#);
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["model"], "llama");
    assert_eq!(reply["content"], "over ws");
    let frames = ws_stream(
        &mut ws,
        r#"{"content": "again", "model": "llama", "stream": true}"#,
    );
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(
        (done["model"].as_str(), done["content"].as_str()),
        (Some("llama"), Some("stream"))
    );
    let unknown = support::ws_exchange(&mut ws, r#"{"content": "hi", "model": "gpt-9"}"#);
    assert_eq!(
        (unknown["type"].as_str(), unknown["error"].as_str()),
        (Some("error"), Some("model_not_found")),
        "{unknown}"
    );
    assert_eq!(local.requests().len(), 2);
    assert_eq!(local.requests()[1].body["model"], "llama3.2");
    assert!(cloud.requests().is_empty());
    daemon.stop();
}

#[test]
fn session_options_are_bounded_by_the_history_budget_and_strict() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "max_history_bytes = 64");
    // A prompt may take the whole budget (the history then keeps nothing), not a byte more;
    // the model's name counts too.
    open_session(&daemon, &json!({"system": "s".repeat(64)}));
    let too_big = post(&daemon, "/v1/sessions", &json!({"system": "s".repeat(65)}));
    too_big.assert_error(400, "bad_request");
    assert!(
        too_big.body.contains("max_history_bytes"),
        "{}",
        too_big.body
    );
    let with_model = json!({"model": "llama", "system": "s".repeat(60)});
    post(&daemon, "/v1/sessions", &with_model).assert_error(400, "bad_request");
    for body in [
        r#"{"temperature": 0}"#,
        r#"{"model": "llama", "model": "sonnet"}"#,
        r#"{"system": ""}"#,
        r#"["llama", "be terse"]"#,
    ] {
        daemon
            .authed(TOKEN, "POST", "/v1/sessions", Some(body))
            .assert_error(400, "invalid_json");
    }
    post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "model": ""}),
    )
    .assert_error(400, "invalid_json");
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1);
    assert!(cloud.requests().is_empty() && local.requests().is_empty());
    daemon.stop();
}

#[test]
fn without_configured_models_a_host_agent_gets_the_model_and_system_and_decides() {
    let daemon = support::start_gateway(support::config_with_token(TOKEN));
    let id = open_session(&daemon, &json!({"model": "anything", "system": "be terse"}));
    let response = post(
        &daemon,
        "/v1/messages",
        &json!({"session_id": id, "content": "whoami"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(
        body["content"],
        r#"model Some("anything") system Some("be terse")"#
    );
    assert_eq!(body["model"], "anything");
    // The agent refuses `unknown`: 404, and the session opened for the message is closed.
    post(
        &daemon,
        "/v1/messages",
        &json!({"content": "hi", "model": "unknown"}),
    )
    .assert_error(404, "model_not_found");
    support::wait_for_active_sessions(&daemon, 1);
    daemon.stop();
}

#[test]
fn a_sessions_system_prompt_counts_in_the_usage_ceiling() {
    let (cloud, local) = (FakeProvider::start(), FakeProvider::start());
    let daemon = support::two_providers(&cloud, &local, "");
    // 3,000 input tokens are plausible for a 3,000-byte prompt and a 2-byte message; counted
    // without the prompt, the ceiling would be 2 bytes + 2 turns × 16 + 512 and clamp them.
    let id = open_session(
        &daemon,
        &json!({"model": "llama", "system": "s".repeat(3000)}),
    );
    local.push([Scripted::ok(&fake_provider::openai_reply("ok", 3000, 1))]);
    let response = post(
        &daemon,
        "/v1/messages",
        &json!({"session_id": id, "content": "hi"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.json()["usage"]["input_tokens"],
        3000,
        "{}",
        response.body
    );
    assert_eq!(
        support::metric(
            &daemon,
            "blufio_errors_total",
            &[("type", "agent_malformed")]
        )
        .unwrap_or(0.0),
        0.0,
        "nothing was clamped"
    );
    daemon.stop();
}
