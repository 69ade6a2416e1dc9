//! The built-in model providers (`[agent] provider = "anthropic" | "openai"`): one
//! [`ProviderAgent`] that sends the session history to the upstream API, retries what is
//! worth retrying, streams replies, and prices the usage.
//!
//! Failure policy: `429`, `529` (and other non-standard statuses, which the HTTP client
//! cannot parse) and `5xx` answers and connection failures are retried
//! (at most [`MAX_ATTEMPTS`] calls) with exponential backoff and jitter, honouring a
//! `retry-after` in seconds up to [`MAX_RETRY_WAIT`]; other `4xx` answers are not retried.
//! The upstream's body is never passed on to clients or logged (it may echo the request).
//! The API key goes only into the request header; it is never logged or shown. Wire formats
//! live in `anthropic.rs` and `openai.rs`, the event-stream parser in `sse.rs`, the HTTP
//! client in `client.rs`.

pub mod anthropic;
mod client;
pub mod openai;
pub mod sse;

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use async_io::Timer;
use futures_lite::AsyncReadExt;
use trillium_client::{Client, Conn, KnownHeaderName, Url};

use self::sse::{SseEvent, SseParser};
use crate::{
    agent::{
        Agent, AgentError, Call, DeltaSender, Reply, ReplyFuture, Turn, UpstreamStatus, Usage,
    },
    config::{AgentConfig, Config, Provider, Secret},
    cost::CostConfig,
    error::Error,
    runtime::Runtime,
};

/// Calls to the upstream for one message, at most (the first try and two retries).
pub const MAX_ATTEMPTS: u32 = 3;
/// The longest wait between two calls; a `retry-after` beyond it is returned to the client.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(20);
/// The first retry waits about this long; each further retry doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(400);
/// The largest reply read from the upstream (a non-streamed body, or a stream's text).
const MAX_REPLY_BYTES: u64 = 4 * 1024 * 1024;
/// The largest event-stream line or event read from the upstream.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The model asked when `[agent] model` is not set and the provider is `anthropic`.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

/// A reply as a provider's wire format reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) content: String,
    pub(crate) model: Option<String>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

/// One thing a streamed event says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamItem {
    Delta(String),
    Usage {
        model: Option<String>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    },
    Done,
    Failed(String),
    Nothing,
}

/// Returns the provider's public API root.
fn default_base_url(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi => "https://api.openai.com",
        _ => "https://api.anthropic.com",
    }
}

/// Checks the `[agent]` keys a provider needs; the error names the key.
pub(crate) fn validate(agent: &AgentConfig) -> Result<(), (&'static str, String)> {
    if !matches!(agent.provider, Provider::Anthropic | Provider::OpenAi) {
        return Ok(());
    }
    let name = agent.provider.as_str();
    endpoint(agent).map_err(|message| ("[agent] base_url", message))?;
    if agent.provider == Provider::Anthropic && agent.api_key.is_none() {
        return Err((
            "[agent] api_key_file",
            "provider \"anthropic\" needs an API key: set ANTHROPIC_API_KEY or api_key_file"
                .to_owned(),
        ));
    }
    if agent.provider == Provider::OpenAi && agent.model.is_none() {
        return Err((
            "[agent] model",
            "provider \"openai\" needs a model (for example \"gpt-4o-mini\", or \"llama3.2\" \
             on Ollama)"
                .to_owned(),
        ));
    }
    if agent
        .model
        .as_deref()
        .is_some_and(|model| model.trim().is_empty())
    {
        return Err(("[agent] model", "must not be empty".to_owned()));
    }
    if agent.max_tokens == 0 {
        return Err(("[agent] max_tokens", "must be greater than 0".to_owned()));
    }
    if agent.ca_file.is_some() && !client::has_tls() {
        return Err((
            "[agent] ca_file",
            format!("provider {name:?}: this build has no TLS (cargo feature `tls`)"),
        ));
    }
    Ok(())
}

/// Returns the endpoint URL: `{base_url}/v1/messages` or `{base_url}/v1/chat/completions`.
fn endpoint(agent: &AgentConfig) -> Result<Url, String> {
    let base = agent
        .base_url
        .as_deref()
        .unwrap_or(default_base_url(agent.provider));
    let url = Url::parse(base).map_err(|error| format!("{base:?} is not a URL: {error}"))?;
    match url.scheme() {
        "http" => {}
        "https" if client::has_tls() => {}
        "https" => {
            return Err(format!(
                "{base:?} needs TLS, which this build lacks (cargo feature `tls`)"
            ));
        }
        other => return Err(format!("{base:?}: scheme {other:?} is not http or https")),
    }
    if url.host_str().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{base:?} needs a host and no user or password (keys go in api_key_file)"
        ));
    }
    let path = match agent.provider {
        Provider::OpenAi => "v1/chat/completions",
        _ => "v1/messages",
    };
    let mut root = url.as_str().trim_end_matches('/').to_owned();
    root.push('/');
    Url::parse(&root)
        .and_then(|root| root.join(path))
        .map_err(|error| format!("{base:?}: {error}"))
}

#[derive(Debug, Default)]
struct Health {
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
    /// The status of the refusal episode under way (logged once).
    refusing: Option<u16>,
}

/// Why a call is retried.
#[derive(Debug, Clone, PartialEq)]
enum RetryCause {
    RateLimited,
    ServerError(u16),
    Overloaded,
    Unreachable(String),
}

impl RetryCause {
    /// Returns the error a client gets when no retry is left (or worth waiting for).
    fn into_error(self, retry_after: Option<Duration>) -> AgentError {
        match self {
            RetryCause::RateLimited => AgentError::RateLimited { retry_after },
            RetryCause::ServerError(status) => AgentError::Upstream(format!("HTTP {status}")),
            RetryCause::Overloaded => {
                AgentError::Upstream("non-standard HTTP status (such as 529 overloaded)".to_owned())
            }
            RetryCause::Unreachable(error) => {
                AgentError::Upstream(format!("cannot reach the provider: {error}"))
            }
        }
    }
}

/// Returns what an operator should check when the upstream refuses calls with `status`.
fn refusal_hint(provider: Provider, model: &str, status: u16) -> String {
    let key_source = match provider {
        Provider::OpenAi => crate::config::OPENAI_KEY_ENV,
        _ => crate::config::ANTHROPIC_KEY_ENV,
    };
    match (status, provider) {
        (401 | 403, _) => format!(
            "check the API key ({key_source} or [agent] api_key_file): the provider did not \
             accept it"
        ),
        (404, Provider::OpenAi) => format!(
            "the provider does not know the model or the endpoint: on Ollama, run `ollama pull \
             {model}`; otherwise check [agent] model and base_url"
        ),
        (404, _) => "the provider does not know the model or the endpoint: check [agent] \
                     model and base_url"
            .to_owned(),
        (400 | 413 | 422, _) => "the provider found the request invalid: check [agent] model \
                                 and max_tokens, or the conversation is too long for the model"
            .to_owned(),
        _ => "check the provider's status page and the [agent] settings".to_owned(),
    }
}

/// The Anthropic or OpenAI-compatible agent.
pub struct ProviderAgent {
    provider: Provider,
    client: Client,
    endpoint: Url,
    model: String,
    max_tokens: u32,
    system: Option<String>,
    api_key: Option<Secret>,
    cost: CostConfig,
    health: Mutex<Health>,
}

impl std::fmt::Debug for ProviderAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderAgent")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl ProviderAgent {
    /// Builds the agent `config` describes (`[agent] provider` must be `anthropic` or
    /// `openai`). Its HTTP client runs its background work (the connection pool's reaper) on
    /// `runtime`, the daemon's executor.
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConfigInvalid`] naming the key when the provider settings are
    /// unusable (no key, bad URL, unreadable `ca_file`).
    pub fn new(config: &Config, runtime: Runtime) -> Result<ProviderAgent, Error> {
        let agent = &config.agent;
        let invalid = |key: &str, message: String| Error::ConfigInvalid {
            origin: "configuration".to_owned(),
            key: key.to_owned(),
            message,
        };
        if !matches!(agent.provider, Provider::Anthropic | Provider::OpenAi) {
            return Err(invalid(
                "[agent] provider",
                format!("{:?} is not a model provider", agent.provider.as_str()),
            ));
        }
        validate(agent).map_err(|(key, message)| invalid(key, message))?;
        let endpoint = endpoint(agent).map_err(|message| invalid("[agent] base_url", message))?;
        let client = client::build(agent.ca_file.as_deref(), runtime)
            .map_err(|message| invalid("[agent] ca_file", message))?;
        let model = agent
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_ANTHROPIC_MODEL.to_owned());
        Ok(ProviderAgent {
            provider: agent.provider,
            client,
            endpoint,
            model,
            max_tokens: agent.max_tokens,
            system: agent.system.clone(),
            api_key: agent.api_key.clone(),
            cost: config.cost.clone(),
            health: Mutex::new(Health::default()),
        })
    }

    fn body(&self, history: &[Turn], message: &str, stream: bool) -> String {
        let build = match self.provider {
            Provider::OpenAi => openai::request_body,
            _ => anthropic::request_body,
        };
        let system = self.system.as_deref();
        build(
            &self.model,
            self.max_tokens,
            system,
            history,
            message,
            stream,
        )
        .to_string()
    }

    fn request(&self, body: String, stream: bool) -> Conn {
        let mut conn = self
            .client
            .post(self.endpoint.clone())
            .with_request_header(KnownHeaderName::ContentType, "application/json")
            .with_body(body);
        if stream {
            // A streamed response is never drained for reuse: closing the connection is how
            // a departed client cancels the upstream generation.
            conn = conn
                .with_request_header(KnownHeaderName::Accept, "text/event-stream")
                .with_request_header(KnownHeaderName::Connection, "close");
        }
        match (self.provider, &self.api_key) {
            (Provider::OpenAi, Some(key)) => conn.with_request_header(
                KnownHeaderName::Authorization,
                format!("Bearer {}", key.expose()),
            ),
            (Provider::OpenAi, None) => conn,
            (_, key) => conn
                .with_request_header(
                    "x-api-key",
                    key.as_ref()
                        .map_or(String::new(), |key| key.expose().to_owned()),
                )
                .with_request_header("anthropic-version", anthropic::VERSION),
        }
    }

    /// Sends the request, retrying 429, 5xx and connection failures; returns a 2xx conn.
    ///
    /// A wait that would end past `deadline` (when the gateway gives up on the call) is not
    /// waited: the failure is returned at once, so a client told `retry-after` gets `429`
    /// with it instead of a `504` after a wait that could not succeed.
    async fn send(
        &self,
        body: String,
        stream: bool,
        deadline: Instant,
    ) -> Result<Conn, AgentError> {
        let mut attempt = 1;
        loop {
            let (cause, hint) = match self.request(body.clone(), stream).await {
                Ok(conn) => {
                    let status = conn.status().map_or(0, |status| status as u16);
                    match status {
                        200..=299 => return Ok(conn),
                        429 => (RetryCause::RateLimited, retry_after(&conn)),
                        500..=599 => (RetryCause::ServerError(status), retry_after(&conn)),
                        _ => {
                            self.refused(status);
                            return Err(AgentError::Rejected { status });
                        }
                    }
                }
                // trillium's status type has no 529 (Anthropic's "overloaded") and other
                // non-standard codes; they fail parsing and are retried like a 5xx.
                Err(trillium_client::Error::InvalidStatus) => (RetryCause::Overloaded, None),
                Err(error) => (RetryCause::Unreachable(error.to_string()), None),
            };
            let delay = backoff(attempt, hint, jitter());
            let past_deadline = Instant::now()
                .checked_add(delay)
                .is_none_or(|end| end >= deadline);
            if attempt >= MAX_ATTEMPTS || delay > MAX_RETRY_WAIT || past_deadline {
                return Err(cause.into_error(hint.or(past_deadline.then_some(delay))));
            }
            self.log_retry(&cause, delay, attempt);
            Timer::after(delay).await;
            attempt += 1;
        }
    }

    /// Logs a retry. Each cause has its own line, so the logger's per-line episode counts
    /// ("12 more like this") never add server errors to the rate-limit line.
    fn log_retry(&self, cause: &RetryCause, delay: Duration, attempt: u32) {
        let provider = self.provider.as_str();
        let wait = delay.as_millis();
        match cause {
            RetryCause::RateLimited => log::warn!(
                "{provider} upstream rate limited the call (HTTP 429); retrying in {wait} ms \
                 (attempt {attempt} of {MAX_ATTEMPTS})"
            ),
            RetryCause::ServerError(status) => log::warn!(
                "{provider} upstream failed with a server error (HTTP {status}); retrying in \
                 {wait} ms (attempt {attempt} of {MAX_ATTEMPTS})"
            ),
            RetryCause::Overloaded => log::warn!(
                "{provider} upstream is overloaded (HTTP 529 or another non-standard status); \
                 retrying in {wait} ms (attempt {attempt} of {MAX_ATTEMPTS})"
            ),
            RetryCause::Unreachable(error) => log::warn!(
                "{provider} upstream cannot be reached ({error}); retrying in {wait} ms \
                 (attempt {attempt} of {MAX_ATTEMPTS})"
            ),
        }
    }

    /// Logs the first refusal of an episode (until a call succeeds or the status changes)
    /// with what the operator should check; the next calls are refused the same way, so
    /// repeating it would only hide other lines.
    fn refused(&self, status: u16) {
        let first = {
            let mut health = self.lock_health();
            let first = health.refusing != Some(status);
            health.refusing = Some(status);
            first
        };
        if first {
            log::warn!(
                "{} upstream refused the call for model {:?} with HTTP {status}: {}; \
                 further refusals are not logged until a call succeeds",
                self.provider.as_str(),
                self.model,
                refusal_hint(self.provider, &self.model, status)
            );
        }
    }

    fn parse_reply(&self, body: &str) -> Result<Parsed, String> {
        match self.provider {
            Provider::OpenAi => openai::parse_reply(body),
            _ => anthropic::parse_reply(body),
        }
    }

    fn parse_event(&self, event: &SseEvent) -> Result<Vec<StreamItem>, String> {
        match self.provider {
            Provider::OpenAi => openai::parse_event(event),
            _ => anthropic::parse_event(event).map(|item| vec![item]),
        }
    }

    /// Prices the reported tokens, estimating from the text what the upstream left out.
    fn usage(
        &self,
        model: Option<String>,
        (input, output): (Option<u64>, Option<u64>),
        (history, message, content): (&[Turn], &str, &str),
    ) -> Usage {
        let model = model.unwrap_or_else(|| self.model.clone());
        let estimated = input.is_none() || output.is_none();
        let input = input
            .unwrap_or_else(|| estimate_prompt_tokens(self.system.as_deref(), history, message));
        let output = output.unwrap_or_else(|| estimate_tokens(content.chars().count() as u64));
        Usage {
            cost_usd: self.cost.cost_usd(&model, input, output),
            model,
            input_tokens: input,
            output_tokens: output,
            estimated,
        }
    }

    async fn complete(
        &self,
        history: &[Turn],
        message: &str,
        deadline: Instant,
    ) -> Result<Reply, AgentError> {
        let mut conn = self
            .send(self.body(history, message, false), false, deadline)
            .await?;
        // Bytes, not `read_string`: JSON is UTF-8 (RFC 8259), and decoding by the declared
        // charset would link every encoding_rs table (about 150 KB of the binary).
        let body = conn
            .response_body()
            .with_max_len(MAX_REPLY_BYTES)
            .read_bytes()
            .await
            .map_err(|error| AgentError::Upstream(format!("cannot read the reply: {error}")))?;
        let body = String::from_utf8(body)
            .map_err(|_| AgentError::Malformed("the reply is not UTF-8".to_owned()))?;
        let parsed = self.parse_reply(&body).map_err(AgentError::Malformed)?;
        let usage = self.usage(
            parsed.model,
            (parsed.input_tokens, parsed.output_tokens),
            (history, message, &parsed.content),
        );
        Ok(Reply {
            usage: Some(usage),
            content: parsed.content,
        })
    }

    async fn stream(
        &self,
        history: &[Turn],
        message: &str,
        deltas: &DeltaSender,
        deadline: Instant,
    ) -> Result<Reply, AgentError> {
        let mut conn = self
            .send(self.body(history, message, true), true, deadline)
            .await?;
        let mut body = conn.response_body();
        let mut parser = SseParser::new(MAX_EVENT_BYTES);
        let mut buffer = vec![0; 8 * 1024];
        let mut events = Vec::new();
        let mut content = String::new();
        let (mut model, mut input, mut output) = (None, None, None);
        let mut done = false;
        while !done {
            let read = body.read(&mut buffer).await.map_err(|error| {
                AgentError::Upstream(format!("the reply stream broke: {error}"))
            })?;
            if read == 0 {
                return Err(AgentError::Upstream(
                    "the reply stream ended before its final event".to_owned(),
                ));
            }
            let chunk = buffer.get(..read).unwrap_or_default();
            parser
                .push(chunk, &mut events)
                .map_err(|error| AgentError::Malformed(error.to_string()))?;
            for event in events.drain(..) {
                for item in self.parse_event(&event).map_err(AgentError::Malformed)? {
                    match item {
                        StreamItem::Delta(text) => {
                            if content.len() + text.len() > MAX_REPLY_BYTES as usize {
                                return Err(AgentError::Malformed(format!(
                                    "the streamed reply is longer than {MAX_REPLY_BYTES} bytes"
                                )));
                            }
                            content.push_str(&text);
                            if deltas.send(&text).await.is_err() {
                                return Err(AgentError::Upstream(
                                    "the client went away mid-stream".to_owned(),
                                ));
                            }
                        }
                        StreamItem::Usage {
                            model: reported_model,
                            input_tokens,
                            output_tokens,
                        } => {
                            deltas.report_usage(
                                reported_model.as_deref(),
                                input_tokens,
                                output_tokens,
                            );
                            model = reported_model.or(model);
                            input = input_tokens.or(input);
                            output = output_tokens.or(output);
                        }
                        StreamItem::Done => done = true,
                        StreamItem::Failed(kind) => {
                            return Err(AgentError::Upstream(format!(
                                "the reply stream reported an error: {kind}"
                            )));
                        }
                        StreamItem::Nothing => {}
                    }
                }
            }
        }
        let usage = self.usage(model, (input, output), (history, message, &content));
        Ok(Reply {
            usage: Some(usage),
            content,
        })
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        crate::sync::lock(&self.health)
    }
}

impl Agent for ProviderAgent {
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
        Box::pin(self.complete(call.history, call.message, call.deadline))
    }

    fn reply_stream<'a>(&'a self, call: Call<'a>, deltas: &'a DeltaSender) -> ReplyFuture<'a> {
        Box::pin(self.stream(call.history, call.message, deltas, call.deadline))
    }

    fn models(&self) -> Vec<String> {
        vec![self.model.clone()]
    }

    fn upstream(&self) -> Option<UpstreamStatus> {
        let health = self.lock_health();
        Some(UpstreamStatus {
            provider: self.provider.as_str(),
            model: self.model.clone(),
            api_key_set: self.api_key.is_some(),
            last_error: health.last_error.as_ref().map(|(error, _)| error.clone()),
            last_error_at: health.last_error.as_ref().map(|(_, at)| *at),
            last_success_at: health.last_success,
        })
    }

    fn record(&self, outcome: Result<(), &AgentError>) {
        let mut health = self.lock_health();
        match outcome {
            Ok(()) => {
                health.last_success = Some(SystemTime::now());
                health.refusing = None;
            }
            Err(AgentError::Rejected { status }) => {
                let hint = refusal_hint(self.provider, &self.model, *status);
                health.last_error = Some((format!("HTTP {status}: {hint}"), SystemTime::now()));
            }
            Err(error) => health.last_error = Some((error.to_string(), SystemTime::now())),
        }
    }
}

/// Reads `retry-after` in seconds (the form both providers send); dates are ignored.
fn retry_after(conn: &Conn) -> Option<Duration> {
    conn.response_headers()
        .get_str(KnownHeaderName::RetryAfter)
        .and_then(|value| value.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(|seconds| Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// Returns the wait before call `attempt + 1`: `retry-after` when given, else
/// `BACKOFF_BASE * 2^(attempt-1)` scaled by `jitter` (0.5 to 1.5).
fn backoff(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    if let Some(wait) = retry_after {
        return wait;
    }
    let exponent = attempt.saturating_sub(1).min(6);
    BACKOFF_BASE
        .saturating_mul(1 << exponent)
        .mul_f64(jitter.clamp(0.5, 1.5))
}

/// Returns a factor between 0.5 and 1.5, so clients retrying together spread out.
fn jitter() -> f64 {
    let mut byte = [0u8; 1];
    match getrandom::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 255.0,
        Err(_) => 1.0,
    }
}

/// Estimates tokens from characters (about four per token in English text), for upstreams
/// that report no usage.
pub fn estimate_tokens(chars: u64) -> u64 {
    chars.div_ceil(4)
}

/// Estimates what the upstream was sent: the system prompt, the history and the message.
fn estimate_prompt_tokens(system: Option<&str>, history: &[Turn], message: &str) -> u64 {
    let chars: usize = history
        .iter()
        .map(|turn| turn.content.chars().count())
        .sum::<usize>()
        + message.chars().count()
        + system.map_or(0, |system| system.chars().count());
    estimate_tokens(chars as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(provider: Provider, base_url: Option<&str>) -> AgentConfig {
        AgentConfig {
            provider,
            base_url: base_url.map(str::to_owned),
            api_key: Some(Secret::new("k")),
            model: Some("m".to_owned()),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn endpoints_join_the_api_path_to_the_base_url() {
        let url = |provider, base| endpoint(&agent(provider, base)).unwrap().to_string();
        assert_eq!(
            url(Provider::Anthropic, None),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            url(Provider::OpenAi, Some("http://127.0.0.1:11434/")),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            url(Provider::OpenAi, Some("http://gpu.lan/proxy")),
            "http://gpu.lan/proxy/v1/chat/completions"
        );
    }

    #[test]
    fn unusable_settings_name_their_key() {
        for bad in ["not a url", "ftp://x", "http://user:pw@host"] {
            let (key, _) = validate(&agent(Provider::OpenAi, Some(bad))).unwrap_err();
            assert_eq!(key, "[agent] base_url", "{bad}");
        }
        let mut anthropic = agent(Provider::Anthropic, None);
        anthropic.api_key = None;
        assert_eq!(validate(&anthropic).unwrap_err().0, "[agent] api_key_file");
        let mut openai = agent(Provider::OpenAi, None);
        openai.api_key = None;
        validate(&openai).unwrap();
        openai.model = None;
        assert_eq!(validate(&openai).unwrap_err().0, "[agent] model");
        validate(&agent(Provider::Echo, Some("not a url"))).unwrap();
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        assert_eq!(backoff(1, None, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(2, None, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(3, None, 0.5), Duration::from_millis(800));
        assert_eq!(
            backoff(30, None, 1.5),
            Duration::from_millis(400 * 64 * 3 / 2)
        );
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(3)
        );
        let factor = jitter();
        assert!((0.5..=1.5).contains(&factor));
    }

    #[test]
    fn estimates_round_up_to_whole_tokens() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
    }
}
