//! The built-in model providers (`[agent] provider = "anthropic" | "openai"`): one
//! [`ProviderAgent`] that sends the session history to the upstream API, retries what is
//! worth retrying, streams replies, and prices the usage.
//!
//! Failure policy: `429`, `529` (and other non-standard statuses, which the HTTP client
//! cannot parse) and `5xx` answers and connection failures are retried
//! (at most [`MAX_ATTEMPTS`] calls) with exponential backoff and jitter, honouring a
//! `retry-after` in seconds up to [`MAX_RETRY_WAIT`]; other `4xx` answers are not retried.
//! The upstream's body is never passed on to clients or logged (it may echo the request).
//! The API key goes only into the request header; it is never logged or shown. The wire
//! protocol is chosen in `wire.rs`; its formats live in `anthropic.rs` and `openai.rs` (with
//! what both share in `chat.rs`), retries in `retry.rs`, reading replies and streams in
//! `response.rs` (the event-stream parser in `sse.rs`), the upstream's health in
//! `health.rs`, token estimates in `usage.rs`, the HTTP client in `client.rs`.

pub mod anthropic;
mod chat;
mod client;
mod health;
pub mod openai;
mod response;
mod retry;
pub mod sse;
mod usage;
mod wire;

use std::time::Instant;

use trillium_client::{Client, Conn, KnownHeaderName, Url};

use self::{
    chat::{Parsed, Request},
    health::Health,
    wire::Wire,
};
pub use self::{
    retry::{MAX_ATTEMPTS, MAX_RETRY_WAIT},
    usage::estimate_tokens,
};
use crate::{
    agent::{Agent, AgentError, Call, DeltaSender, Reply, ReplyFuture, Turn, UpstreamStatus},
    config::{Config, Secret},
    cost::CostConfig,
    error::Error,
    runtime::Runtime,
};

/// The model asked when `[agent] model` is not set and the provider is `anthropic`.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

/// The Anthropic or OpenAI-compatible agent.
pub struct ProviderAgent {
    wire: Wire,
    client: Client,
    endpoint: Url,
    model: String,
    max_tokens: u32,
    system: Option<String>,
    api_key: Option<Secret>,
    cost: CostConfig,
    health: Health,
}

impl std::fmt::Debug for ProviderAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderAgent")
            .field("provider", &self.wire)
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
    /// unusable (bad URL, unreadable `ca_file`); the rest is checked once, by
    /// [`Config::validate`].
    pub fn new(config: &Config, runtime: Runtime) -> Result<ProviderAgent, Error> {
        let agent = &config.agent;
        let invalid = |key: &str, message: String| Error::ConfigInvalid {
            origin: "configuration".to_owned(),
            key: key.to_owned(),
            message,
        };
        let Some(wire) = Wire::of(agent.provider) else {
            return Err(invalid(
                "[agent] provider",
                format!("{:?} is not a model provider", agent.provider.as_str()),
            ));
        };
        let endpoint = agent
            .endpoint()
            .map_err(|message| invalid("[agent] base_url", message))?;
        let client = client::build(agent.ca_file.as_deref(), runtime)
            .map_err(|message| invalid("[agent] ca_file", message))?;
        let model = agent
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_ANTHROPIC_MODEL.to_owned());
        Ok(ProviderAgent {
            wire,
            client,
            endpoint,
            model,
            max_tokens: agent.max_tokens,
            system: agent.system.clone(),
            api_key: agent.api_key.clone(),
            cost: config.cost.clone(),
            health: Health::default(),
        })
    }

    /// Returns what a call for `message` after `history` asks.
    fn request<'a>(&'a self, history: &'a [Turn], message: &'a str, stream: bool) -> Request<'a> {
        Request {
            model: &self.model,
            max_tokens: self.max_tokens,
            system: self.system.as_deref(),
            history,
            message,
            stream,
        }
    }

    fn post(&self, body: &str, stream: bool) -> Conn {
        let mut conn = self
            .client
            .post(self.endpoint.clone())
            .with_request_header(KnownHeaderName::ContentType, "application/json")
            .with_body(body.to_owned());
        if stream {
            // A streamed response is never drained for reuse: closing the connection is how
            // a departed client cancels the upstream generation.
            conn = conn
                .with_request_header(KnownHeaderName::Accept, "text/event-stream")
                .with_request_header(KnownHeaderName::Connection, "close");
        }
        self.wire.authorize(conn, self.api_key.as_ref())
    }

    /// Sends `request` (with retries) and returns the 2xx conn; a refusal is logged once per
    /// episode.
    async fn send(&self, request: &Request<'_>, deadline: Instant) -> Result<Conn, AgentError> {
        let body = self.wire.request_body(request).to_string();
        retry::send(self.wire.as_str(), deadline, || {
            self.post(&body, request.stream)
        })
        .await
        .inspect_err(|error| {
            if let AgentError::Rejected { status } = error {
                self.health.refused(self.wire, &self.model, *status);
            }
        })
    }

    /// Answers `message` in one piece.
    async fn complete(
        &self,
        history: &[Turn],
        message: &str,
        deadline: Instant,
    ) -> Result<Reply, AgentError> {
        let request = self.request(history, message, false);
        let mut conn = self.send(&request, deadline).await?;
        let reply = response::read_reply(self.wire, &mut conn).await?;
        Ok(self.priced(&request, reply))
    }

    /// Answers `message` as it is generated, sending the text through `deltas`.
    async fn stream(
        &self,
        history: &[Turn],
        message: &str,
        deltas: &DeltaSender,
        deadline: Instant,
    ) -> Result<Reply, AgentError> {
        let request = self.request(history, message, true);
        let mut conn = self.send(&request, deadline).await?;
        let reply = response::read_stream(self.wire, &mut conn, deltas).await?;
        Ok(self.priced(&request, reply))
    }

    /// Returns the reply with its priced usage.
    fn priced(&self, request: &Request<'_>, reply: Parsed) -> Reply {
        Reply {
            usage: Some(usage::usage(&self.cost, request, &reply)),
            content: reply.content,
        }
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
        Some(
            self.health
                .status(self.wire, &self.model, self.api_key.is_some()),
        )
    }

    fn record(&self, outcome: Result<(), &AgentError>) {
        self.health.record(self.wire, &self.model, outcome);
    }
}
