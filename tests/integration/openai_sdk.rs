//! The official `openai` Python package against blufio's `/v1/chat/completions` and
//! `/v1/models`: each test starts a daemon in-process whose `[providers.*]` are fake upstreams
//! (Rust, scripted answers), runs one scenario of `tests/openai_sdk/client.py` with the
//! interpreter named by `BLUFIO_OPENAI_PYTHON`, and asserts on what the SDK returned or raised
//! and on what the fake received. The SDK validates answers strictly there, so a field a real
//! client needs and blufio leaves out fails here.
//!
//! They are `#[ignore]`d because the package is not a Rust dependency: `.ci/run` makes a
//! virtual environment with a pinned version and runs them with `--ignored`; run without the
//! variable, each fails saying so rather than passing unseen.

use std::{path::Path, process::Command, time::Duration};

use blufio::{Config, Secret};
use serde_json::{Value, json};

use crate::{
    fake_provider::{self, FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon},
};

/// The variable naming a Python interpreter that can `import openai`.
const PYTHON_VAR: &str = "BLUFIO_OPENAI_PYTHON";
/// The client script: one scenario per run, its result printed as JSON.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk/client.py");
/// The API key every fake upstream is configured with.
const KEY: &str = "sk-upstream-7c1e";
/// The name the test configurations go by in error messages.
const CONFIG_NAME: &str = "openai-sdk.toml";

/// Returns the interpreter to run the client with; panics when it is not configured, so a run
/// with `--ignored` but without the package fails instead of passing without a client.
fn python() -> String {
    match std::env::var(PYTHON_VAR) {
        Ok(python) if !python.is_empty() => python,
        _ => panic!(
            "{PYTHON_VAR} is not set: these tests need a Python interpreter with the openai \
             package. `bash .ci/run` makes one in target/openai-sdk-venv; then run \
             {PYTHON_VAR}=target/openai-sdk-venv/bin/python cargo test --workspace \
             --test integration openai_sdk -- --ignored"
        ),
    }
}

/// Runs one scenario of the client script against `base_url` and returns what it printed.
fn run_client(base_url: &str, api_key: &str, scenario: &str, request: Value) -> Value {
    let python = python();
    let args = json!({
        "base_url": base_url, "api_key": api_key, "scenario": scenario, "request": request,
    });
    // A clean environment: no OPENAI_* variable or proxy of the machine changes what the
    // SDK sends, and no bytecode is written into the source tree.
    let output = Command::new(&python)
        .arg(SCRIPT)
        .arg(args.to_string())
        .env_clear()
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|error| panic!("cannot run {python} ({PYTHON_VAR}): {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client.py {scenario} exited with {}:\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!("client.py {scenario} printed no JSON ({error}):\n{stdout}\n{stderr}")
    })
}

/// A daemon serving the `[providers]` and `[models]` of a test, with `TOKEN` as its token.
struct Gateway {
    daemon: TestDaemon,
}

impl Gateway {
    /// Starts a daemon on port 0 from `toml` (its `[providers]`, `[models]`, `[gateway]
    /// default_model` and `[cost]`), every provider holding `KEY`.
    fn start(toml: &str) -> Gateway {
        let mut config = Config::parse(toml, Path::new(CONFIG_NAME))
            .unwrap_or_else(|error| panic!("{error}\n{toml}"));
        config.daemon.health_port = 0;
        config.gateway.port = 0;
        config.allow_ephemeral_ports = true;
        config.gateway.token = Some(Secret::new(TOKEN));
        for provider in config.providers.values_mut() {
            provider.api_key = Some(Secret::new(KEY));
        }
        config
            .validate(CONFIG_NAME)
            .unwrap_or_else(|error| panic!("{error}\n{toml}"));
        Gateway {
            daemon: support::start(config),
        }
    }

    /// Runs one scenario of the SDK with the gateway's token.
    fn sdk(&self, scenario: &str, request: Value) -> Value {
        self.sdk_with_key(TOKEN, scenario, request)
    }

    /// Runs one scenario of the SDK with `api_key` as the bearer token.
    fn sdk_with_key(&self, api_key: &str, scenario: &str, request: Value) -> Value {
        let base_url = format!("http://{}/v1", self.daemon.gateway_addr());
        run_client(&base_url, api_key, scenario, request)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        support::metric(&self.daemon, name, labels)
    }

    fn stop(self) {
        self.daemon.stop();
    }
}

/// A `[providers.NAME]` section for `fake`.
fn provider(name: &str, kind: &str, fake: &FakeProvider) -> String {
    format!(
        "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{}\"\n",
        fake.url()
    )
}

/// One `local` model on an OpenAI-kind fake, upstream id `llama3.2`.
fn openai_gateway(fake: &FakeProvider) -> Gateway {
    Gateway::start(&format!(
        "{}[models.local]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n",
        provider("pi", "openai", fake)
    ))
}

/// One `sonnet` model on an Anthropic-kind fake, upstream id `claude-sonnet-4-5`.
fn anthropic_gateway(fake: &FakeProvider) -> Gateway {
    Gateway::start(&format!(
        "{}[models.sonnet]\nprovider = \"claude\"\nmodel = \"claude-sonnet-4-5\"\n",
        provider("claude", "anthropic", fake)
    ))
}

/// A one-message request for `model`.
fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// Asserts that the SDK raised `class` for `status` and returns what it read of the error.
#[track_caller]
fn raised<'a>(result: &'a Value, class: &str, status: u64) -> &'a Value {
    let error = &result["error"];
    assert_eq!(error["class"], class, "{result}");
    assert_eq!(error["status"], status, "{result}");
    error
}

/// Asserts that a completion came back whole: the alias asked for, the text, the finish
/// reason and the usage.
#[track_caller]
fn assert_completion(result: &Value, alias: &str, text: &str, finish: &str, usage: (u64, u64)) {
    let completion = &result["completion"];
    assert_eq!(completion["object"], "chat.completion", "{result}");
    assert_eq!(completion["model"], alias, "{result}");
    assert!(
        completion["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{result}"
    );
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant", "{result}");
    assert_eq!(choice["message"]["content"], text, "{result}");
    assert_eq!(choice["finish_reason"], finish, "{result}");
    assert_usage(&completion["usage"], usage, result);
}

/// Asserts the token counts of a `usage` object (the SDK adds its optional details as null).
#[track_caller]
fn assert_usage(usage: &Value, (prompt, completion): (u64, u64), result: &Value) {
    assert_eq!(usage["prompt_tokens"], prompt, "{result}");
    assert_eq!(usage["completion_tokens"], completion, "{result}");
    assert_eq!(usage["total_tokens"], prompt + completion, "{result}");
}

/// Asserts that a stream the SDK read to its end joined to `text`, named `alias` in every
/// chunk, finished with `stop`, and carried the usage in its last chunk only.
#[track_caller]
fn assert_streamed(result: &Value, alias: &str, text: &str, usage: (u64, u64)) {
    assert_eq!(result["ended"], true, "{result}");
    assert_eq!(result["text"], text, "{result}");
    let chunks = result["chunks"].as_array().expect("chunks");
    let (last, before) = chunks.split_last().expect("at least one chunk");
    for chunk in chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["model"], alias, "{chunk}");
        assert_eq!(chunk["id"], chunks[0]["id"], "one id for the whole stream");
    }
    assert!(
        before
            .iter()
            .any(|chunk| chunk["choices"][0]["finish_reason"] == "stop"),
        "no chunk finished with stop: {result}"
    );
    assert!(
        before.iter().all(|chunk| chunk["usage"].is_null()),
        "usage before the last chunk: {result}"
    );
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_usage(&last["usage"], usage, result);
}

/// A stream the fake writes 10 ms apart and ends.
fn stream(chunks: Vec<String>) -> Scripted {
    Scripted::Stream {
        chunks,
        gap: Duration::from_millis(10),
        hang: false,
    }
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn the_fakes_openai_answers_pass_the_sdks_strict_validation() {
    // The harness itself: the SDK straight at the fake, so the shapes the other tests script
    // are ones a real OpenAI-compatible server could send.
    let fake = FakeProvider::start();
    fake.push([
        Scripted::ok(&fake_provider::openai_reply("pong", 7, 3)),
        stream(fake_provider::openai_stream(&["po", "ng"], 7, 2)),
    ]);
    let base_url = format!("{}/v1", fake.url());
    let plain = run_client(&base_url, KEY, "chat", hello("test-model"));
    assert_completion(&plain, "test-model", "pong", "stop", (7, 3));
    let request = json!({"model": "test-model", "messages": [{"role": "user", "content": "ping"}],
                         "stream_options": {"include_usage": true}});
    let streamed = run_client(&base_url, KEY, "stream", request);
    assert_streamed(&streamed, "test-model", "pong", (7, 2));
    let requests = fake.requests();
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(requests[1].body["stream"], true);
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn models_list_names_each_alias_owned_by_its_provider() {
    let (claude, local) = (FakeProvider::start(), FakeProvider::start());
    let gateway = Gateway::start(&format!(
        "[gateway]\ndefault_model = \"sonnet\"\n{}{}\
         [models.sonnet]\nprovider = \"claude\"\nmodel = \"claude-sonnet-4-5\"\n\
         fallback = [\"llama\"]\n\
         [models.llama]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n",
        provider("claude", "anthropic", &claude),
        provider("pi", "openai", &local),
    ));
    let listed = gateway.sdk("models", json!({}));
    let models = listed["models"].as_array().expect("a model list");
    let mut owned: Vec<(&str, &str)> = models
        .iter()
        .map(|model| {
            assert_eq!(model["object"], "model", "{listed}");
            (
                model["id"].as_str().unwrap(),
                model["owned_by"].as_str().unwrap(),
            )
        })
        .collect();
    owned.sort_unstable();
    assert_eq!(owned, [("llama", "pi"), ("sonnet", "claude")], "{listed}");
    assert!(
        claude.requests().is_empty() && local.requests().is_empty(),
        "listing models asks no upstream"
    );
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_completion_through_an_openai_upstream_names_the_alias_and_passes_the_request_on() {
    let fake = FakeProvider::start();
    fake.push([Scripted::ok(&fake_provider::openai_reply("four", 12, 1))]);
    let gateway = openai_gateway(&fake);
    let messages = json!([
        {"role": "system", "content": "answer with a number word"},
        {"role": "user", "content": "2+2?"},
    ]);
    let result = gateway.sdk(
        "chat",
        json!({"model": "local", "messages": messages, "max_tokens": 16, "temperature": 0.5}),
    );
    assert_completion(&result, "local", "four", "stop", (12, 1));
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        sent.body["model"], "llama3.2",
        "the upstream id, not the alias"
    );
    assert_eq!(sent.body["messages"], messages);
    assert_eq!(sent.body["temperature"], 0.5);
    let max_tokens = [
        &sent.body["max_tokens"],
        &sent.body["max_completion_tokens"],
    ];
    assert!(max_tokens.contains(&&json!(16)), "{}", sent.body);
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_completion_through_an_anthropic_upstream_is_translated_both_ways() {
    let fake = FakeProvider::start();
    fake.push([
        Scripted::ok(&fake_provider::anthropic_reply_stopped(
            "Paris.", "end_turn", 20, 3,
        )),
        Scripted::ok(&fake_provider::anthropic_reply_stopped(
            "Par",
            "max_tokens",
            20,
            1,
        )),
    ]);
    let gateway = anthropic_gateway(&fake);
    let messages = json!([
        {"role": "system", "content": "answer in one word"},
        {"role": "user", "content": "capital of France?"},
    ]);
    let ended = gateway.sdk(
        "chat",
        json!({"model": "sonnet", "messages": messages, "stop": ["\n\n"], "max_tokens": 50}),
    );
    assert_completion(&ended, "sonnet", "Paris.", "stop", (20, 3));
    let cut = gateway.sdk(
        "chat",
        json!({"model": "sonnet", "messages": messages, "max_tokens": 1}),
    );
    assert_completion(&cut, "sonnet", "Par", "length", (20, 1));

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let sent = &requests[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.body["model"], "claude-sonnet-4-5");
    assert_eq!(sent.body["system"], "answer in one word", "{}", sent.body);
    assert_eq!(
        sent.body["stop_sequences"],
        json!(["\n\n"]),
        "{}",
        sent.body
    );
    assert_eq!(sent.body["max_tokens"], 50);
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": "capital of France?"}]),
        "the system prompt moves out of the messages"
    );
    assert_eq!(requests[1].body["max_tokens"], 1);
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_stream_through_an_openai_upstream_joins_to_the_text_and_ends_with_usage() {
    let fake = FakeProvider::start();
    fake.push([stream(fake_provider::openai_stream(
        &["Hel", "lo", " there"],
        9,
        3,
    ))]);
    let gateway = openai_gateway(&fake);
    let mut request = hello("local");
    request["stream_options"] = json!({"include_usage": true});
    let result = gateway.sdk("stream", request);
    assert_streamed(&result, "local", "Hello there", (9, 3));
    let sent = &fake.requests()[0];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["model"], "llama3.2");
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn a_stream_through_an_anthropic_upstream_arrives_as_chunks_ending_with_usage() {
    let fake = FakeProvider::start();
    fake.push([stream(fake_provider::anthropic_stream(
        &["Bon", "jour", "!"],
        11,
        2,
    ))]);
    let gateway = anthropic_gateway(&fake);
    let mut request = hello("sonnet");
    request["stream_options"] = json!({"include_usage": true});
    let result = gateway.sdk("stream", request);
    assert_streamed(&result, "sonnet", "Bonjour!", (11, 2));
    let sent = &fake.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["stream"], true);
    gateway.stop();
}

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
    let mut with_tools = hello("local");
    with_tools["tools"] = json!([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]);
    let result = gateway.sdk("chat", with_tools);
    let error = raised(&result, "BadRequestError", 400);
    assert_eq!(error["param"], "tools", "{result}");
    assert_eq!(error["type"], "invalid_request_error", "{result}");

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
    // One token costs a dollar here, so the first answer spends the day's cent.
    let gateway = Gateway::start(&format!(
        "[cost]\ndaily_budget_usd = 0.01\n\
         [cost.models.\"priced-model\"]\ninput_usd_per_mtok = 1000000.0\n\
         output_usd_per_mtok = 1000000.0\n{}\
         [models.priced]\nprovider = \"pi\"\nmodel = \"priced-model\"\n",
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
    assert!(!fake.requests().is_empty());
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_upstream_slower_than_its_timeout_is_a_504_server_error() {
    let fake = FakeProvider::start();
    fake.set_fallback(Scripted::Delayed(
        Duration::from_secs(4),
        Box::new(Scripted::ok(&fake_provider::openai_reply("too late", 1, 1))),
    ));
    let gateway = Gateway::start(&format!(
        "{}timeout_secs = 1\n[models.local]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n",
        provider("pi", "openai", &fake)
    ));
    let started = std::time::Instant::now();
    let result = gateway.sdk("chat", hello("local"));
    let error = raised(&result, "InternalServerError", 504);
    assert_eq!(error["type"], "server_error", "{result}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the timeout, not when the upstream did: {:?}",
        started.elapsed()
    );
    gateway.stop();
}

/// The first provider answers `status` to everything; the fallback answers: the SDK sees the
/// answer under the alias it asked for, and the fallback is counted.
fn falls_back_on(status: u16) {
    let primary = FakeProvider::start();
    primary.set_fallback(Scripted::status(
        status,
        &[],
        r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
    ));
    let spare = FakeProvider::start();
    spare.push([Scripted::ok(&fake_provider::openai_reply(
        "from the spare",
        5,
        4,
    ))]);
    let gateway = Gateway::start(&format!(
        "[gateway]\ndefault_model = \"main\"\n{}{}\
         [models.main]\nprovider = \"cloud\"\nmodel = \"claude-sonnet-4-5\"\n\
         fallback = [\"spare\"]\n\
         [models.spare]\nprovider = \"local\"\nmodel = \"llama3.2\"\n",
        provider("cloud", "anthropic", &primary),
        provider("local", "openai", &spare),
    ));
    let result = gateway.sdk("chat", hello("main"));
    assert_completion(&result, "main", "from the spare", "stop", (5, 4));
    assert!(
        !primary.requests().is_empty(),
        "the first provider was tried"
    );
    let spared = spare.requests();
    assert_eq!(spared.len(), 1);
    assert_eq!(spared[0].body["model"], "llama3.2");
    assert_eq!(
        gateway.metric(
            "blufio_fallbacks_total",
            &[("from", "main"), ("to", "spare")]
        ),
        Some(1.0),
        "after an upstream {status}"
    );
    gateway.stop();
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_overloaded_529_falls_back_and_the_client_sees_the_alias_it_asked_for() {
    falls_back_on(529);
}

#[test]
#[ignore = "needs the openai Python package: BLUFIO_OPENAI_PYTHON, see .ci/run"]
fn an_upstream_500_falls_back_and_the_client_sees_the_alias_it_asked_for() {
    falls_back_on(500);
}
