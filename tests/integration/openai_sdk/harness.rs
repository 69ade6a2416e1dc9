//! What the openai SDK tests share: running one scenario of `tests/openai_sdk/client.py`
//! with the interpreter named by `BLUFIO_OPENAI_PYTHON`, a daemon built from a test's
//! `[providers]` and `[models]`, and the assertions on what the SDK returned.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use blufio::{Config, Context, ContextBuilder, Secret};
use serde_json::{Value, json};

use crate::{
    fake_provider::{FakeProvider, Scripted},
    support::{self, TOKEN, TestDaemon},
};

/// The variable naming a Python interpreter that can `import openai`.
const PYTHON_VAR: &str = "BLUFIO_OPENAI_PYTHON";
/// The client script: one scenario per run, its result printed as JSON.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk/client.py");
/// The API key every fake upstream is configured with.
pub(super) const KEY: &str = "sk-upstream-7c1e";
/// The name the test configurations go by in error messages.
const CONFIG_NAME: &str = "openai-sdk.toml";

/// Returns the interpreter to run the client with; panics when it is not configured, so a run
/// with `--ignored` but without the package fails instead of passing without a client.
fn python() -> String {
    match std::env::var(PYTHON_VAR) {
        Ok(python) if !python.is_empty() => python,
        _ => panic!(
            "{PYTHON_VAR} is not set: these tests need a Python interpreter with the openai \
             package (see the README's Development section, or `bash .ci/run`, which makes \
             target/openai-sdk-venv), then \
             {PYTHON_VAR}=target/openai-sdk-venv/bin/python cargo test --workspace \
             --test integration openai_sdk -- --ignored"
        ),
    }
}

/// Runs one scenario of the client script against `base_url` and returns what it printed.
/// The arguments go through stdin, so a request may be larger than a command line allows.
pub(super) fn run_client(base_url: &str, api_key: &str, scenario: &str, request: Value) -> Value {
    let python = python();
    let args = json!({
        "base_url": base_url, "api_key": api_key, "scenario": scenario, "request": request,
    });
    // A clean environment: no OPENAI_* variable or proxy of the machine changes what the
    // SDK sends, and no bytecode is written into the source tree.
    let mut child = Command::new(&python)
        .arg(SCRIPT)
        .env_clear()
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {python} ({PYTHON_VAR}): {error}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(args.to_string().as_bytes()).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
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
pub(super) struct Gateway {
    pub(super) daemon: TestDaemon,
}

impl Gateway {
    /// Starts a daemon on port 0 from `toml` (its `[providers]`, `[models]`, `[gateway]
    /// default_model` and `[cost]`), every provider holding `KEY`.
    pub(super) fn start(toml: &str) -> Gateway {
        Gateway::start_with(toml, |_| {}, |builder| builder)
    }

    /// Like [`Gateway::start`], with the config as `adjust` leaves it and the context built by
    /// what `build` makes of the builder (a heap set by hand, say).
    pub(super) fn start_with(
        toml: &str,
        adjust: impl FnOnce(&mut Config),
        build: impl FnOnce(ContextBuilder) -> ContextBuilder,
    ) -> Gateway {
        let mut config = Config::parse(toml, Path::new(CONFIG_NAME))
            .unwrap_or_else(|error| panic!("{error}\n{toml}"));
        config.daemon.health_port = 0;
        config.gateway.port = 0;
        config.allow_ephemeral_ports = true;
        config.gateway.token = Some(Secret::new(TOKEN));
        for provider in config.providers.values_mut() {
            provider.api_key = Some(Secret::new(KEY));
        }
        adjust(&mut config);
        config
            .validate(CONFIG_NAME)
            .unwrap_or_else(|error| panic!("{error}\n{toml}"));
        Gateway {
            daemon: support::start_with(build(Context::builder(config))),
        }
    }

    /// Runs one scenario of the SDK with the gateway's token.
    pub(super) fn sdk(&self, scenario: &str, request: Value) -> Value {
        self.sdk_with_key(TOKEN, scenario, request)
    }

    /// Runs one scenario of the SDK with `api_key` as the bearer token.
    pub(super) fn sdk_with_key(&self, api_key: &str, scenario: &str, request: Value) -> Value {
        let base_url = format!("http://{}/v1", self.daemon.gateway_addr());
        run_client(&base_url, api_key, scenario, request)
    }

    pub(super) fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        support::metric(&self.daemon, name, labels)
    }

    pub(super) fn stop(self) {
        self.daemon.stop();
    }
}

/// A `[providers.NAME]` section for `fake`.
pub(super) fn provider(name: &str, kind: &str, fake: &FakeProvider) -> String {
    format!(
        "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{}\"\n",
        fake.url()
    )
}

/// The TOML of one `local` model on an OpenAI-kind fake, upstream id `llama3.2`.
pub(super) fn openai_toml(fake: &FakeProvider) -> String {
    format!(
        "{}[models.local]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n",
        provider("pi", "openai", fake)
    )
}

/// A gateway of [`openai_toml`].
pub(super) fn openai_gateway(fake: &FakeProvider) -> Gateway {
    Gateway::start(&openai_toml(fake))
}

/// One `sonnet` model on an Anthropic-kind fake, upstream id `claude-sonnet-4-5`.
pub(super) fn anthropic_gateway(fake: &FakeProvider) -> Gateway {
    Gateway::start(&format!(
        "{}[models.sonnet]\nprovider = \"claude\"\nmodel = \"claude-sonnet-4-5\"\n",
        provider("claude", "anthropic", fake)
    ))
}

/// A one-message request for `model`.
pub(super) fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// A stream the fake writes 10 ms apart and ends.
pub(super) fn stream(chunks: Vec<String>) -> Scripted {
    Scripted::Stream {
        chunks,
        gap: Duration::from_millis(10),
        hang: false,
    }
}

/// Asserts that the SDK raised `class` for `status` and returns what it read of the error.
#[track_caller]
pub(super) fn raised<'a>(result: &'a Value, class: &str, status: u64) -> &'a Value {
    let error = &result["error"];
    assert_eq!(error["class"], class, "{result}");
    assert_eq!(error["status"], status, "{result}");
    error
}

/// Asserts that a completion came back whole: the alias asked for, the text, the finish
/// reason and the usage.
#[track_caller]
pub(super) fn assert_completion(
    result: &Value,
    alias: &str,
    text: &str,
    finish: &str,
    usage: (u64, u64),
) {
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
/// chunk, gave the role first, finished with `stop`, and carried the usage in its last chunk
/// only.
#[track_caller]
pub(super) fn assert_streamed(result: &Value, alias: &str, text: &str, usage: (u64, u64)) {
    assert_eq!(result["ended"], true, "{result}");
    assert_eq!(result["text"], text, "{result}");
    let chunks = result["chunks"].as_array().expect("chunks");
    let (last, before) = chunks.split_last().expect("at least one chunk");
    for chunk in chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["model"], alias, "{chunk}");
        assert_eq!(chunk["id"], chunks[0]["id"], "one id for the whole stream");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "the first chunk carries the role: {result}"
    );
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
