//! Every configured provider, the routing table over them, and the call that walks a model
//! alias's chain: the alias's own provider first, then each fallback, within one deadline.
//!
//! Fallback policy: a connection failure, a 5xx or 529, a 429 and a timeout before the first
//! token move on to the next alias of the chain; a refusal (another 4xx) or a malformed
//! answer does not (the next provider would most likely refuse the same request), and a
//! stream that has sent text is never restarted elsewhere. A hop that has a fallback after it
//! is tried once, without the retries the last hop gets: when the cloud is overloaded, the
//! point of a fallback is to answer now, not after a backoff.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_io::Timer;
use futures_lite::FutureExt;

use super::{
    chat::{Messages, Request, Sampling},
    retry::MAX_ATTEMPTS,
    upstream::{Answer, Settings, Upstream},
    wire::Wire,
};
use crate::{
    agent::{AgentError, DeltaSender, UpstreamStatus},
    config::Config,
    error::Error,
    metrics::{FallbackCounters, Metrics},
    routes::{Route, Routes},
    runtime::Runtime,
};

/// What a client asks of a model alias, whichever provider ends up answering.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask<'a> {
    pub(crate) messages: Messages<'a>,
    /// The client's limit; the alias's `max_tokens` when `None`.
    pub(crate) max_tokens: Option<u32>,
    /// A session's own system prompt, sent instead of each alias's configured `system`.
    pub(crate) system: Option<&'a str>,
    pub(crate) sampling: Sampling<'a>,
}

/// An answer and the alias whose provider gave it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Served {
    pub(crate) alias: String,
    pub(crate) answer: Answer,
}

/// The providers of one daemon and the routes over them.
#[derive(Debug, Default)]
pub struct Upstreams {
    routes: Routes,
    /// Sorted by name.
    upstreams: Vec<Arc<Upstream>>,
    fallbacks: FallbackCounters,
}

impl Upstreams {
    /// Builds a provider for each `[providers.NAME]` (or the `[agent]` shorthand's one) and
    /// the routing table; empty when no model provider is configured.
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConfigInvalid`] naming the key when a provider's settings are
    /// unusable (bad URL, unreadable `ca_file`); the rest was checked by `Config::validate`.
    pub(crate) fn new(
        config: &Config,
        runtime: &Runtime,
        metrics: &Metrics,
    ) -> Result<Upstreams, Error> {
        let routes = Routes::new(config);
        if routes.is_empty() {
            return Ok(Upstreams::default());
        }
        let invalid = |key: String, message: String| Error::ConfigInvalid {
            origin: "configuration".to_owned(),
            key,
            message,
        };
        let mut upstreams = Vec::new();
        if config.providers.is_empty() {
            let agent = &config.agent;
            let wire = Wire::of(agent.provider).ok_or_else(|| {
                invalid(
                    "[agent] provider".to_owned(),
                    "not a model provider".to_owned(),
                )
            })?;
            let endpoint = agent
                .endpoint()
                .map_err(|message| invalid("[agent] base_url".to_owned(), message))?;
            let settings = Settings {
                name: wire.as_str(),
                wire,
                endpoint,
                api_key: agent.api_key.clone(),
                ca_file: agent.ca_file.as_deref(),
                timeout: None,
            };
            let upstream = Upstream::new(
                settings,
                config.cost.clone(),
                runtime.clone(),
                metrics.upstream(wire.as_str()),
            )
            .map_err(|message| invalid("[agent] ca_file".to_owned(), message))?;
            upstreams.push(Arc::new(upstream));
        }
        for (name, provider) in &config.providers {
            let name = name.get_ref();
            let key = |field: &str| format!("[providers.{name}] {field}");
            let endpoint = provider
                .endpoint()
                .map_err(|message| invalid(key("base_url"), message))?;
            let settings = Settings {
                name,
                wire: Wire::of(provider.kind.provider()).unwrap_or(Wire::OpenAi),
                endpoint,
                api_key: provider.api_key.clone(),
                ca_file: provider.ca_file.as_deref(),
                timeout: provider.timeout_secs.map(Duration::from_secs),
            };
            let upstream = Upstream::new(
                settings,
                config.cost.clone(),
                runtime.clone(),
                metrics.upstream(name),
            )
            .map_err(|message| invalid(key("ca_file"), message))?;
            upstreams.push(Arc::new(upstream));
        }
        upstreams.sort_by(|a, b| a.name().cmp(b.name()));
        let fallbacks = metrics.fallbacks(routes.iter().flat_map(|route| {
            route.chain.windows(2).filter_map(|pair| {
                Some((pair.first()?.alias.as_str(), pair.get(1)?.alias.as_str()))
            })
        }));
        Ok(Upstreams {
            routes,
            upstreams,
            fallbacks,
        })
    }

    /// The routing table.
    pub(crate) fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Returns whether no model is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams
            .binary_search_by(|upstream| upstream.name().cmp(name))
            .ok()
            .and_then(|index| self.upstreams.get(index))
    }

    /// Returns every upstream model id a route may ask for, for the token counters.
    pub(crate) fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .routes
            .iter()
            .flat_map(|route| route.chain.first())
            .map(|target| target.model.clone())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Returns what `/v1/health` shows of each provider, with the upstream id of the first
    /// model routed to it.
    pub(crate) fn statuses(&self) -> Vec<(String, UpstreamStatus)> {
        self.upstreams
            .iter()
            .map(|upstream| {
                let model = self
                    .routes
                    .iter()
                    .flat_map(|route| route.chain.first())
                    .find(|target| target.provider == upstream.name())
                    .map_or("", |target| target.model.as_str());
                (upstream.name().to_owned(), upstream.status(model))
            })
            .collect()
    }

    /// Answers `ask` from `route`'s chain (streamed through `deltas` when given), by
    /// `deadline`.
    ///
    /// # Errors
    ///
    /// Returns the error of the last provider tried.
    pub(crate) async fn call(
        &self,
        route: &Route,
        ask: &Ask<'_>,
        deltas: Option<&DeltaSender>,
        deadline: Instant,
    ) -> Result<Served, AgentError> {
        let mut last_error = AgentError::Upstream("the model has no provider".to_owned());
        for (index, target) in route.chain.iter().enumerate() {
            let Some(upstream) = self.get(&target.provider) else {
                continue;
            };
            let next = route.chain.get(index + 1);
            let request = Request {
                model: &target.model,
                max_tokens: ask.max_tokens.unwrap_or(target.max_tokens),
                system: ask.system.or(target.system.as_deref()),
                messages: ask.messages,
                sampling: ask.sampling,
                stream: deltas.is_some(),
            };
            let attempts = if next.is_some() { 1 } else { MAX_ATTEMPTS };
            let result = hop(upstream, &request, deltas, attempts, deadline).await;
            upstream.record(&target.model, result.as_ref().map(|_| ()));
            let error = match result {
                Ok(answer) => {
                    return Ok(Served {
                        alias: target.alias.clone(),
                        answer,
                    });
                }
                Err(error) => error,
            };
            let started = deltas.is_some_and(|deltas| deltas.progress().sent_chars > 0);
            let Some(next) = next.filter(|_| !started && falls_back(&error)) else {
                return Err(error);
            };
            self.fallbacks.count(&target.alias, &next.alias);
            log::warn!(
                "model {:?} failed ({error}); falling back to {:?}",
                target.alias,
                next.alias
            );
            last_error = error;
        }
        Err(last_error)
    }
}

/// Whether the next alias of the chain may do better than one that failed with `error`.
fn falls_back(error: &AgentError) -> bool {
    matches!(
        error,
        AgentError::Upstream(_) | AgentError::RateLimited { .. } | AgentError::Timeout
    )
}

/// One provider's try: within its own `timeout_secs` (until its first token, for a stream)
/// and the request's `deadline`.
async fn hop(
    upstream: &Upstream,
    request: &Request<'_>,
    deltas: Option<&DeltaSender>,
    attempts: u32,
    deadline: Instant,
) -> Result<Answer, AgentError> {
    let own = upstream
        .timeout()
        .and_then(|timeout| Instant::now().checked_add(timeout))
        .map_or(deadline, |own| own.min(deadline));
    let work = async {
        match deltas {
            Some(deltas) => upstream.stream(request, deltas, attempts, own).await,
            None => upstream.complete(request, attempts, own).await,
        }
    };
    let timer = async {
        Timer::at(own).await;
        // A stream that has begun is given the whole request's deadline.
        if deltas.is_some_and(|deltas| deltas.progress().sent_chars > 0) {
            Timer::at(deadline).await;
        }
        upstream.timed_out();
        Err(AgentError::Timeout)
    };
    work.or(timer).await
}
