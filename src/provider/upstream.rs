//! One model provider: its wire, HTTP client, endpoint, key, health and metrics, and the two
//! calls every model path makes of it, a whole answer or a stream. A daemon has one per
//! `[providers.NAME]` (or one for the `[agent]` shorthand), shared by every model alias it
//! serves, so each provider keeps one connection pool whichever route reaches it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use trillium_client::{Client, Conn, KnownHeaderName, Url};

use super::{
    chat::{Parsed, Request},
    client,
    health::Health,
    response, retry, usage,
    wire::Wire,
};
use crate::{
    agent::{AgentError, DeltaSender, UpstreamStatus, Usage},
    config::Secret,
    cost::CostConfig,
    metrics::{UpstreamMetrics, UpstreamOutcome},
    openai_api::FinishReason,
    runtime::Runtime,
};

/// What a provider is built from: one `[providers.NAME]` section, or `[agent]`.
#[derive(Debug, Clone)]
pub(crate) struct Settings<'a> {
    /// The configured name (for the shorthand: the kind).
    pub(crate) name: &'a str,
    pub(crate) wire: Wire,
    pub(crate) endpoint: Url,
    pub(crate) api_key: Option<Secret>,
    pub(crate) ca_file: Option<&'a Path>,
    /// The provider's own deadline (`timeout_secs`), when it has one.
    pub(crate) timeout: Option<Duration>,
}

/// An upstream's answer, priced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) content: String,
    /// Why the model stopped (a natural end when the upstream did not say).
    pub(crate) finish: FinishReason,
    pub(crate) usage: Usage,
}

/// One configured model provider.
pub(crate) struct Upstream {
    name: String,
    wire: Wire,
    client: Client,
    endpoint: Url,
    api_key: Option<Secret>,
    timeout: Option<Duration>,
    cost: CostConfig,
    health: Health,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("wire", &self.wire)
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the provider; its HTTP client's background work runs on `runtime`.
    ///
    /// # Errors
    ///
    /// Returns why `ca_file` is unusable.
    pub(crate) fn new(
        settings: Settings<'_>,
        cost: CostConfig,
        runtime: Runtime,
        metrics: UpstreamMetrics,
    ) -> Result<Upstream, String> {
        let client = client::build(settings.ca_file, runtime)?;
        Ok(Upstream {
            name: settings.name.to_owned(),
            wire: settings.wire,
            client,
            endpoint: settings.endpoint,
            api_key: settings.api_key,
            timeout: settings.timeout,
            cost,
            health: Health::default(),
            metrics,
        })
    }

    /// The configured name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The provider's own deadline for one call, when it has one.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn post(&self, body: &[u8], stream: bool) -> Conn {
        let mut conn = self
            .client
            .post(self.endpoint.clone())
            .with_request_header(KnownHeaderName::ContentType, "application/json")
            .with_body(body.to_vec());
        if stream {
            // A streamed response is never drained for reuse: closing the connection is how
            // a departed client cancels the upstream generation.
            conn = conn
                .with_request_header(KnownHeaderName::Accept, "text/event-stream")
                .with_request_header(KnownHeaderName::Connection, "close");
        }
        self.wire.authorize(conn, self.api_key.as_ref())
    }

    /// Sends `request` (at most `attempts` calls) and returns the 2xx conn; a refusal is
    /// logged once per episode.
    async fn send(
        &self,
        request: &Request<'_>,
        attempts: u32,
        deadline: Instant,
    ) -> Result<Conn, AgentError> {
        let body = self
            .wire
            .request_body(request)
            .map_err(|error| AgentError::Upstream(format!("cannot encode the request: {error}")))?;
        retry::send(&self.name, attempts, deadline, &self.metrics, || {
            self.post(&body, request.stream)
        })
        .await
        .inspect_err(|error| {
            if let AgentError::Rejected { status } = error {
                self.health.refused(self.wire, request.model, *status);
            }
        })
    }

    /// Answers `request` in one piece.
    pub(crate) async fn complete(
        &self,
        request: &Request<'_>,
        attempts: u32,
        deadline: Instant,
    ) -> Result<Answer, AgentError> {
        let mut conn = self.send(request, attempts, deadline).await?;
        let reply = response::read_reply(self.wire, &mut conn).await?;
        Ok(self.priced(request, reply))
    }

    /// Answers `request` as it is generated, sending the text through `deltas`.
    pub(crate) async fn stream(
        &self,
        request: &Request<'_>,
        deltas: &DeltaSender,
        attempts: u32,
        deadline: Instant,
    ) -> Result<Answer, AgentError> {
        let mut conn = self.send(request, attempts, deadline).await?;
        let reply = response::read_stream(self.wire, &mut conn, deltas).await?;
        Ok(self.priced(request, reply))
    }

    /// Counts a call the deadline cut short.
    pub(crate) fn timed_out(&self) {
        self.metrics.record(UpstreamOutcome::Timeout, None);
    }

    /// Records the outcome of one call for `/v1/health`.
    pub(crate) fn record(&self, model: &str, outcome: Result<(), &AgentError>) {
        self.health.record(self.wire, model, outcome);
    }

    /// Returns what `/v1/health` shows of the provider serving `model`.
    pub(crate) fn status(&self, model: &str) -> UpstreamStatus {
        self.health.status(self.wire, model, self.api_key.is_some())
    }

    /// Returns the answer with its priced usage.
    fn priced(&self, request: &Request<'_>, reply: Parsed) -> Answer {
        Answer {
            usage: usage::usage(&self.cost, request, &reply),
            finish: reply.finish.unwrap_or(FinishReason::Stop),
            content: reply.content,
        }
    }
}
