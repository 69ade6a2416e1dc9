//! Test support: start a daemon in-process on port 0 (or the real binary through the kit),
//! talk plain HTTP/1.1 to it over real sockets, stop it through its handle.

use std::{
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use blufio::{Config, Context, ContextBuilder, Daemon};
use blufio_testkit::fake_provider::FakeProvider;
pub use blufio_testkit::http::{Response, parse_response, request, send_raw};
use blufio_testkit::process::{self, Binary};
pub use blufio_testkit::process::{free_port, port_config};
pub use blufio_testkit::temp::temp_dir;

/// How long a test waits for the real binary to exit after it was told to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The `blufio` binary of this build. Under `cargo xtask test-cross` it is foreign: cargo's
/// runner variable for this target (qemu-user) is inherited from cargo, so it is used here
/// too, since the host kernel cannot execute the binary by itself.
pub fn binary() -> Binary {
    let runner_var = format!(
        "CARGO_TARGET_{}_RUNNER",
        env!("BLUFIO_TARGET").to_uppercase().replace('-', "_")
    );
    Binary::new(
        env!("CARGO_BIN_EXE_blufio"),
        std::env::var(runner_var).unwrap_or_default(),
    )
}

/// Serves `config` with the real binary and waits for its "listening on" line.
pub fn serve(config: &str, name: &str) -> process::Daemon {
    binary().serve(config, name)
}

/// A running daemon plus the context the test can poke.
pub struct TestDaemon {
    daemon: Option<Daemon>,
    pub ctx: Arc<Context>,
}

/// Starts a daemon built from `config` with production sources.
pub fn start(config: Config) -> TestDaemon {
    start_with(Context::builder(config))
}

/// Starts a daemon from a prepared builder.
pub fn start_with(builder: ContextBuilder) -> TestDaemon {
    let ctx = builder.build().expect("context builds");
    let daemon = blufio::spawn(Arc::clone(&ctx)).expect("daemon starts");
    TestDaemon {
        daemon: Some(daemon),
        ctx,
    }
}

/// A config with a gateway token, for tests of authenticated routes.
pub fn config_with_token(token: &str) -> Config {
    let mut config = Config::for_tests();
    config.gateway.token = Some(blufio::Secret::new(token));
    config
}

impl TestDaemon {
    pub fn addr(&self) -> SocketAddr {
        self.daemon().health_addr()
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.daemon().gateway_addr()
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon is running")
    }

    /// Runs one memory-monitor tick now, as the background task would.
    pub fn tick(&self) {
        blufio::internals::monitor::tick(&self.ctx);
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr(), "GET", path, &[], None)
    }

    pub fn get_ok(&self, path: &str) -> String {
        let response = self.get(path);
        assert_eq!(response.status, 200, "GET {path}: {}", response.body);
        response.body
    }

    /// Sends a request to the gateway listener.
    pub fn gateway(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        request(self.gateway_addr(), method, path, headers, body)
    }

    /// Sends an authenticated request to the gateway listener.
    pub fn authed(&self, token: &str, method: &str, path: &str, body: Option<&str>) -> Response {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        self.gateway(method, path, &headers, body)
    }

    /// Stops the daemon and asserts it drained within the grace period.
    pub fn stop(mut self) {
        let daemon = self.daemon.take().expect("daemon is running");
        assert!(
            daemon.shut_down_blocking(Duration::from_secs(10)),
            "drained in time"
        );
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.shut_down_blocking(Duration::from_secs(5));
        }
    }
}

/// An agent driven by the message text, for exercising every gateway outcome:
/// `upstream` → upstream failure, `ratelimit` → rate limited (7 s), `slow` → sleeps 3 s,
/// `panic` → panics, `costly` → reports 0.5 USD, `whoami` → the call's model and system
/// prompt; anything else is echoed back as `re: …`. A call naming the model `unknown` is
/// refused as an unknown model; every reply names the model the call asked for.
#[derive(Debug, Default)]
pub struct ScriptedAgent;

impl blufio::Agent for ScriptedAgent {
    fn reply<'a>(&'a self, call: blufio::Call<'a>) -> blufio::ReplyFuture<'a> {
        let (history, message) = (call.history, call.message);
        let model = call.model.map(str::to_owned);
        Box::pin(async move {
            if model.as_deref() == Some("unknown") {
                return Err(blufio::AgentError::UnknownModel("unknown".to_owned()));
            }
            let usage = |cost_usd| {
                Some(blufio::Usage {
                    model: "scripted-1".to_owned(),
                    input_tokens: 10 + history.len() as u64,
                    output_tokens: 5,
                    cost_usd,
                    estimated: false,
                })
            };
            match message {
                "upstream" => Err(blufio::AgentError::Upstream(
                    "secret upstream detail".into(),
                )),
                "ratelimit" => Err(blufio::AgentError::RateLimited {
                    retry_after: Some(Duration::from_secs(7)),
                }),
                "slow" => {
                    async_io::Timer::after(Duration::from_secs(3)).await;
                    Ok(blufio::Reply {
                        content: "late".into(),
                        usage: None,
                        model,
                    })
                }
                "panic" => panic!("scripted agent panic"),
                "costly" => Ok(blufio::Reply {
                    content: "expensive".into(),
                    usage: usage(0.5),
                    model,
                }),
                "whoami" => Ok(blufio::Reply {
                    content: format!("model {:?} system {:?}", call.model, call.system),
                    usage: usage(0.0),
                    model,
                }),
                other => Ok(blufio::Reply {
                    content: format!("re: {other} (history {})", history.len()),
                    usage: usage(0.0),
                    model,
                }),
            }
        })
    }

    fn models(&self) -> Vec<String> {
        vec!["scripted-1".to_owned()]
    }
}

/// A WebSocket client connection over a real socket.
pub type WsClient = async_tungstenite::WebSocketStream<async_io::Async<TcpStream>>;

/// Opens a WebSocket to `/ws` with extra headers; `Err` carries the refused HTTP status.
pub fn ws_connect(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(WsClient, Option<String>), (u16, Option<String>)> {
    use async_tungstenite::tungstenite::client::IntoClientRequest;

    async_io::block_on(async {
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                async_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                value.parse().unwrap(),
            );
        }
        let stream = async_io::Async::<TcpStream>::connect(addr).await.unwrap();
        match async_tungstenite::client_async(request, stream).await {
            Ok((client, response)) => {
                let protocol = response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|value| value.to_str().unwrap().to_owned());
                Ok((client, protocol))
            }
            Err(async_tungstenite::tungstenite::Error::Http(response)) => {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|value| value.to_str().unwrap().to_owned());
                Err((response.status().as_u16(), retry_after))
            }
            Err(other) => panic!("websocket handshake failed: {other}"),
        }
    })
}

/// Sends a text frame and returns the next text frame parsed as JSON.
pub fn ws_exchange(client: &mut WsClient, text: &str) -> serde_json::Value {
    use async_tungstenite::tungstenite::Message;
    use futures_lite::StreamExt;

    async_io::block_on(async {
        client.send(Message::text(text)).await.unwrap();
        loop {
            match client.next().await.expect("a reply frame").unwrap() {
                Message::Text(reply) => return serde_json::from_str(reply.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
}

/// A config with a token, a tiny agent timeout and an agent attached.
pub fn start_gateway(mut config: Config) -> TestDaemon {
    if config.gateway.token.is_none() {
        config.gateway.token = Some(blufio::Secret::new(TOKEN));
    }
    start_with(Context::builder(config).with_agent(ScriptedAgent))
}

/// The token `start_gateway` configures.
pub const TOKEN: &str = "gateway-test-token";

/// Waits (bounded) until `/health` reports `expected` active sessions.
pub fn wait_for_active_sessions(daemon: &TestDaemon, expected: u64) {
    for _ in 0..200 {
        if daemon.get("/health").json()["active_sessions"] == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "active_sessions never reached {expected}: {}",
        daemon.get("/health").body
    );
}

/// A gateway config with `TOKEN` whose agent is `provider` at `base_url` with `key`;
/// `openai_model` is the model an OpenAI-compatible provider asks for.
pub fn provider_config(
    provider: blufio::internals::config::Provider,
    base_url: String,
    key: &str,
    openai_model: &str,
) -> Config {
    let mut config = config_with_token(TOKEN);
    config.agent.provider = provider;
    config.agent.base_url = Some(base_url);
    config.agent.model = Some(match provider {
        blufio::internals::config::Provider::OpenAi => openai_model.to_owned(),
        _ => "claude-sonnet-4-5".to_owned(),
    });
    config.agent.api_key = Some(blufio::Secret::new(key));
    config.agent.timeout_secs = 10;
    config
}

/// `POST /v1/messages` with `TOKEN` and a JSON body.
pub fn post_message(daemon: &TestDaemon, body: &str) -> Response {
    daemon.authed(TOKEN, "POST", "/v1/messages", Some(body))
}

/// The value of one series in the daemon's `/metrics`.
pub fn metric(daemon: &TestDaemon, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    crate::prometheus::parse(&daemon.get_ok("/metrics")).value(name, labels)
}

/// Starts a daemon with `memory_warn_mb = 20` on a heap set by hand, and a session of 6
/// history messages left idle for `idle_for`, so that it can be trimmed under pressure (with
/// `idle_timeout_secs`, sessions count as idle for shedding after a quarter of it). Returns
/// the daemon, its heap and the session id.
pub fn daemon_with_an_idle_session(
    idle_timeout_secs: u64,
    idle_for: Duration,
) -> (TestDaemon, Arc<blufio::ManualHeap>, String) {
    const MIB: u64 = 1024 * 1024;
    let heap = Arc::new(blufio::ManualHeap::new(10 * MIB));
    let mut config = config_with_token(TOKEN);
    config.daemon.memory_warn_mb = 20;
    config.daemon.memory_limit_mb = 30;
    config.daemon.max_connections_per_ip = 1000;
    config.gateway.session_idle_timeout_secs = idle_timeout_secs;
    let daemon = start_with(
        Context::builder(config)
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(blufio::FixedRss(Some(15 * MIB)))
            .with_agent(ScriptedAgent),
    );
    let created = daemon.authed(TOKEN, "POST", "/v1/messages", Some(r#"{"content": "one"}"#));
    let id = created.json()["session_id"].as_str().unwrap().to_owned();
    for text in ["two", "three"] {
        let body = format!(r#"{{"session_id": "{id}", "content": "{text}"}}"#);
        daemon.authed(TOKEN, "POST", "/v1/messages", Some(&body));
    }
    std::thread::sleep(idle_for);
    (daemon, heap, id)
}

/// Starts the gateway of [`start_gateway`] on the test config as `adjust` leaves it.
pub fn start_gateway_with(adjust: impl FnOnce(&mut Config)) -> TestDaemon {
    let mut config = Config::for_tests();
    adjust(&mut config);
    start_gateway(config)
}

/// Opens `/ws` on the gateway with `TOKEN` as a bearer header.
pub fn ws_authed(daemon: &TestDaemon) -> WsClient {
    let auth = format!("Bearer {TOKEN}");
    ws_connect(daemon.gateway_addr(), &[("Authorization", &auth)])
        .unwrap()
        .0
}

/// Reads frames until the close frame and returns it (`None` for a close without a code).
pub async fn ws_close_frame(
    ws: &mut WsClient,
) -> Option<async_tungstenite::tungstenite::protocol::CloseFrame> {
    use async_tungstenite::tungstenite::Message;
    use futures_lite::StreamExt;

    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Serves, with the real binary, a config for drain tests: a 10 s grace, room for many
/// clients from one address, and the echo agent answering after `echo_delay_ms`.
pub fn serve_drain(echo_delay_ms: u64, name: &str) -> process::Daemon {
    let port = free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nshutdown_grace_secs = 10\nmax_connections_per_ip = 256\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n\
         [agent]\nprovider = \"echo\"\necho_delay_ms = {echo_delay_ms}\n"
    );
    serve(&config, name)
}

/// Starts a daemon (no agent) on the config of [`config_with_token`] as `adjust` leaves it.
pub fn start_adjusted(adjust: impl FnOnce(&mut Config)) -> TestDaemon {
    let mut config = config_with_token(TOKEN);
    adjust(&mut config);
    start(config)
}

/// A daemon whose `[providers]` point at `cloud` (Anthropic) and `local` (OpenAI-compatible):
/// alias `sonnet` on the cloud falling back to `llama` on the local one. `extra` is added to
/// `[gateway]` (and may open further tables).
pub fn two_providers(cloud: &FakeProvider, local: &FakeProvider, extra: &str) -> TestDaemon {
    start(two_providers_config(cloud, local, "", extra))
}

/// The configuration of [`two_providers`], with `cloud_extra` added to the cloud provider.
pub fn two_providers_config(
    cloud: &FakeProvider,
    local: &FakeProvider,
    cloud_extra: &str,
    extra: &str,
) -> Config {
    let text = format!(
        r#"
[providers.claude]
kind = "anthropic"
base_url = "{cloud}"
api_key_env = "BLUFIO_TEST_UNSET_KEY"
{cloud_extra}

[providers.pi]
kind = "openai"
base_url = "{local}"
api_key_env = "BLUFIO_TEST_UNSET_KEY"

[models.sonnet]
provider = "claude"
model = "claude-sonnet-4-5"
fallback = ["llama"]

[models.llama]
provider = "pi"
model = "llama3.2"
max_tokens = 64

[gateway]
default_model = "sonnet"
{extra}
"#,
        cloud = cloud.url(),
        local = local.url(),
    );
    let mut config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    for provider in config.providers.values_mut() {
        provider.api_key = Some(blufio::Secret::new("sk-test-key"));
    }
    config.validate("test.toml").unwrap();
    config.daemon.health_port = 0;
    config.gateway.port = 0;
    config.allow_ephemeral_ports = true;
    config.gateway.token = Some(blufio::Secret::new(TOKEN));
    config.agent.timeout_secs = 10;
    config
}
