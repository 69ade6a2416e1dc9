//! The built-in model providers (`[providers.NAME]`, or the `[agent] provider = "anthropic" |
//! "openai"` shorthand): one [`Upstream`](upstream::Upstream) per provider that sends a
//! conversation to its API, retries what is worth retrying, streams replies and prices the
//! usage; [`Upstreams`] holds them all with the routing table and walks a model alias's
//! fallback chain; [`ProviderAgent`] answers session messages (`/v1/messages`, `/ws`) through
//! it.
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
//! `health.rs`, token estimates in `usage.rs`, the HTTP client in `client.rs`, one provider
//! in `upstream.rs`, the providers and fallback in `upstreams.rs`.

pub mod anthropic;
mod chat;
mod client;
mod health;
mod loose;
pub mod openai;
mod response;
mod retry;
pub mod sse;
mod upstream;
mod upstreams;
mod usage;
mod wire;

use std::sync::Arc;

pub(crate) use self::{
    chat::{Messages, Sampling},
    upstreams::{Ask, Served},
};
pub use self::{
    retry::{MAX_ATTEMPTS, MAX_RETRY_WAIT},
    upstreams::Upstreams,
    usage::estimate_tokens,
};
use crate::agent::{Agent, AgentError, Call, DeltaSender, Reply, ReplyFuture, UpstreamStatus};

/// Answers session messages (`/v1/messages`, `/ws`) from the configured models: the one the
/// message (or its session) names, else the default model, with its fallbacks; a session's
/// system prompt replaces the model's configured one.
#[derive(Debug)]
pub struct ProviderAgent {
    upstreams: Arc<Upstreams>,
}

impl ProviderAgent {
    /// Answers through `upstreams`.
    pub(crate) fn new(upstreams: Arc<Upstreams>) -> ProviderAgent {
        ProviderAgent { upstreams }
    }

    async fn answer(
        &self,
        call: Call<'_>,
        deltas: Option<&DeltaSender>,
    ) -> Result<Reply, AgentError> {
        let route =
            self.upstreams.routes().resolve(call.model).ok_or_else(|| {
                AgentError::UnknownModel(call.model.unwrap_or_default().to_owned())
            })?;
        let ask = Ask {
            messages: Messages::Session {
                history: call.history,
                message: call.message,
            },
            max_tokens: None,
            system: call.system,
            sampling: Sampling::default(),
        };
        let served = self
            .upstreams
            .call(route, &ask, deltas, call.deadline)
            .await?;
        Ok(Reply {
            content: served.answer.content,
            usage: Some(served.answer.usage),
            model: Some(served.alias),
        })
    }
}

impl Agent for ProviderAgent {
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
        Box::pin(self.answer(call, None))
    }

    fn reply_stream<'a>(&'a self, call: Call<'a>, deltas: &'a DeltaSender) -> ReplyFuture<'a> {
        Box::pin(self.answer(call, Some(deltas)))
    }

    fn models(&self) -> Vec<String> {
        self.upstreams.models()
    }

    fn upstream(&self) -> Option<UpstreamStatus> {
        // The provider of the default model (or the first one): what `/v1/health` has always
        // shown for the one-provider shorthand.
        let routes = self.upstreams.routes();
        let provider = routes
            .resolve(None)
            .or_else(|| routes.iter().next())
            .map(|route| route.provider().to_owned())?;
        self.upstreams
            .statuses()
            .into_iter()
            .find(|(name, _)| *name == provider)
            .map(|(_, status)| status)
    }

    // Each provider records its own outcomes as the chain is walked.
}
