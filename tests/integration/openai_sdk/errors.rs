//! Each error class of the OpenAI API as the official SDK raises it from blufio's answers:
//! the exception type, the status, and the `code` and `param` the SDK read from the body.

use std::time::Duration;

use serde_json::json;

use super::harness::{Gateway, hello, openai_gateway, openai_toml, provider, raised};
use crate::fake_provider::{self, FakeProvider, Scripted};

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_wrong_token_is_an_authentication_error() {
    let fake = FakeProvider::start();
    let gateway = openai_gateway(&fake);
    for scenario in ["chat", "models"] {
        let result = gateway.sdk_with_key("sk-not-the-token", scenario, hello("local"));
        let error = raised(&result, "AuthenticationError", 401);
        assert_eq!(error["code"], "invalid_api_key", "{scenario}: {result}");
    }
    assert!(fake.requests().is_empty());
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_unknown_model_is_a_not_found_error() {
    let fake = FakeProvider::start();
    let gateway = openai_gateway(&fake);
    let result = gateway.sdk("chat", hello("gpt-9-imaginary"));
    let error = raised(&result, "NotFoundError", 404);
    assert_eq!(error["code"], "model_not_found", "{result}");
    assert_eq!(error["param"], "model", "{result}");
    assert!(fake.requests().is_empty());
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn tools_and_unknown_parameters_are_bad_request_errors_naming_the_parameter() {
    let fake = FakeProvider::start();
    let gateway = openai_gateway(&fake);
    // Parameters the SDK has and blufio cannot honour for a text answer.
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]);
    for (param, value) in [
        ("tools", tools),
        ("n", json!(2)),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut request = hello("local");
        request[param] = value;
        let result = gateway.sdk("chat", request);
        let error = raised(&result, "BadRequestError", 400);
        assert_eq!(error["param"], param, "{result}");
        assert_eq!(error["type"], "invalid_request_error", "{result}");
    }

    // What the SDK does not know it sends through `extra_body`, as a client on a newer API
    // version would.
    let mut unknown = hello("local");
    unknown["extra_body"] = json!({"frobnicate": true});
    let result = gateway.sdk("chat", unknown);
    let error = raised(&result, "BadRequestError", 400);
    assert_eq!(error["param"], "frobnicate", "{result}");
    assert_eq!(error["code"], "unknown_parameter", "{result}");
    assert!(
        fake.requests().is_empty(),
        "refused before any upstream call"
    );
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_spent_budget_is_a_rate_limit_error_with_insufficient_quota() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::ok(&fake_provider::openai_reply("ok", 5, 1)));
    // One token costs a dollar here, so the first answer spends the day's cent. The price is
    // the one of the model the upstream's reply names, as for every provider.
    let gateway = Gateway::start(&format!(
        "[cost]\ndaily_budget_usd = 0.01\n\
         [cost.models.\"test-model\"]\ninput_usd_per_mtok = 1000000.0\n\
         output_usd_per_mtok = 1000000.0\n{}\
         [models.priced]\nprovider = \"pi\"\nmodel = \"test-model\"\n",
        provider("pi", "openai", &fake)
    ));
    let first = gateway.sdk("chat", hello("priced"));
    assert_eq!(
        first["completion"]["choices"][0]["message"]["content"],
        "ok"
    );
    let refused = gateway.sdk("chat", hello("priced"));
    let error = raised(&refused, "RateLimitError", 429);
    assert_eq!(error["code"], "insufficient_quota", "{refused}");
    assert_eq!(fake.requests().len(), 1, "no upstream call once spent");
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_upstream_failing_without_fallback_is_a_502_server_error() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::status(
        500,
        &[],
        r#"{"error": {"message": "upstream exploded", "type": "server_error"}}"#,
    ));
    let gateway = openai_gateway(&fake);
    let result = gateway.sdk("chat", hello("local"));
    let error = raised(&result, "InternalServerError", 502);
    assert_eq!(error["type"], "server_error", "{result}");
    assert_eq!(error["code"], "upstream_error", "{result}");
    assert!(
        !error["message"]
            .as_str()
            .unwrap()
            .contains("upstream exploded"),
        "the upstream's detail stays in the log: {result}"
    );
    assert!(!fake.requests().is_empty());
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_upstream_slower_than_its_timeout_is_a_504_server_error() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::Delayed(
        Duration::from_secs(5),
        Box::new(Scripted::ok(&fake_provider::openai_reply("too late", 1, 1))),
    ));
    let gateway = Gateway::start(&format!(
        "{}timeout_secs = 1\n[models.local]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n",
        provider("pi", "openai", &fake)
    ));
    let result = gateway.sdk("chat", hello("local"));
    let error = raised(&result, "InternalServerError", 504);
    assert_eq!(error["type"], "server_error", "{result}");
    assert_eq!(error["code"], "upstream_timeout", "{result}");
    // Timed by the client around its request alone (a loaded machine starts Python slowly).
    let seconds = result["seconds"].as_f64().unwrap();
    assert!(
        (1.0..4.0).contains(&seconds),
        "answered at the provider's timeout_secs, not when the upstream did: {seconds} s"
    );
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_upstream_429_without_fallback_is_a_rate_limit_error_with_its_retry_after() {
    let fake = FakeProvider::start();
    // A wait longer than blufio spends retrying: the 429 is passed on at once.
    fake.set_fallback(Scripted::status(
        429,
        &[("retry-after", "60")],
        r#"{"error": {"message": "slow down", "type": "requests"}}"#,
    ));
    let gateway = openai_gateway(&fake);
    let result = gateway.sdk("chat", hello("local"));
    let error = raised(&result, "RateLimitError", 429);
    assert_eq!(error["code"], "rate_limit_exceeded", "{result}");
    assert_eq!(error["retry_after"], "60", "{result}");
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_request_over_the_body_limit_is_a_413_status_error() {
    let fake = FakeProvider::start();
    let gateway = openai_gateway(&fake);
    // Over the default 1 MiB limit for a whole request.
    let mut request = hello("local");
    request["messages"][0]["content"] = json!("x".repeat(1_100_000));
    let result = gateway.sdk("chat", request);
    // The SDK has no class of its own for 413: its base class is what a client catches.
    let error = raised(&result, "APIStatusError", 413);
    assert_eq!(error["code"], "payload_too_large", "{result}");
    assert!(fake.requests().is_empty());
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn above_the_memory_limit_a_request_is_a_503_and_served_again_below_it() {
    const MIB: u64 = 1024 * 1024;
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::ok(&fake_provider::openai_reply("back", 3, 1)));
    let heap = std::sync::Arc::new(blufio::ManualHeap::new(10 * MIB));
    let gateway = Gateway::start_with(
        &openai_toml(&fake),
        |config| {
            config.daemon.memory_warn_mb = 20;
            config.daemon.memory_limit_mb = 30;
        },
        |builder| {
            builder
                .with_heap_source(std::sync::Arc::clone(&heap))
                .with_rss_source(blufio::FixedRss(Some(15 * MIB)))
        },
    );
    heap.set(40 * MIB);
    gateway.daemon.tick();
    let refused = gateway.sdk("chat", hello("local"));
    let error = raised(&refused, "InternalServerError", 503);
    assert_eq!(error["code"], "overloaded", "{refused}");
    assert!(fake.requests().is_empty(), "no upstream call when refused");

    heap.set(10 * MIB);
    gateway.daemon.tick();
    let served = gateway.sdk("chat", hello("local"));
    assert_eq!(
        served["completion"]["choices"][0]["message"]["content"],
        "back"
    );
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_stream_whose_upstream_fails_after_a_silence_ends_in_an_error_not_a_short_stream() {
    let fake = FakeProvider::start();
    // Silent past the first keep-alive, so the event stream may already be committed when
    // the upstream fails; its retries fail at once.
    fake.push([Scripted::Delayed(
        Duration::from_millis(2_500),
        Box::new(Scripted::status(500, &[], "{}")),
    )]);
    fake.set_fallback(Scripted::status(500, &[], "{}"));
    let gateway = openai_gateway(&fake);
    let result = gateway.sdk("stream", hello("local"));
    let error = &result["error"];
    // Before the stream is committed (at the first keep-alive) the SDK raises the status;
    // after, the error event, which it raises as a plain APIError with the body's code.
    match error["class"].as_str() {
        Some("APIError") => assert_eq!(error["code"], "upstream_error", "{result}"),
        Some("InternalServerError") => assert_eq!(error["status"], 502, "{result}"),
        _ => panic!("not an error the SDK raises for a failed upstream: {result}"),
    }
    assert!(result["ended"].is_null(), "{result}");
    assert!(
        result["chunks"]
            .as_array()
            .is_none_or(|chunks| chunks.iter().all(|chunk| chunk["usage"].is_null())),
        "no usage chunk for a failed stream: {result}"
    );
    gateway.stop();
}
