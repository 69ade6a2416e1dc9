//! The [`Agent`] trait: whatever answers messages sent to `/v1/messages` and `/ws`.
//!
//! A host that embeds blufio supplies its own agent through
//! [`ContextBuilder::with_agent`](crate::ContextBuilder::with_agent). The gateway hands the
//! agent the session history and the new message, and does the token and cost accounting
//! from the [`Usage`] it reports.

use std::{fmt, future::Future, pin::Pin, time::Duration};

use async_io::Timer;

use crate::{context::Context, sessions::Session};

/// A boxed future, so [`Agent`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Answers messages.
pub trait Agent: Send + Sync + 'static {
    /// Returns the reply to `message` in `session`; [`Session::history`] holds the earlier
    /// turns (oldest first, without `message`).
    fn reply<'a>(
        &'a self,
        ctx: &'a Context,
        session: &'a Session,
        message: &'a str,
    ) -> BoxFuture<'a, Result<Reply, AgentError>>;

    /// Returns the model names this agent reports usage for, so their token counters exist
    /// from start-up.
    fn models(&self) -> Vec<String> {
        Vec::new()
    }
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The reply text.
    pub content: String,
    /// Tokens and money spent producing it, when the agent knows.
    pub usage: Option<Usage>,
}

/// Tokens and money one reply cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// The model that produced the reply.
    pub model: String,
    /// Tokens sent to the model.
    pub input_tokens: u64,
    /// Tokens the model produced.
    pub output_tokens: u64,
    /// What the reply cost, in US dollars.
    pub cost_usd: f64,
}

/// Why an agent could not answer.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentError {
    /// The upstream service failed or answered nonsense (HTTP 502).
    Upstream(String),
    /// The upstream service did not answer in time (HTTP 504).
    Timeout,
    /// The upstream service or the budget refuses more requests for now (HTTP 429).
    RateLimited {
        /// When to try again, if known.
        retry_after: Option<Duration>,
    },
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Upstream(message) => write!(f, "agent upstream failed: {message}"),
            AgentError::Timeout => f.write_str("agent timed out"),
            AgentError::RateLimited { .. } => f.write_str("agent is rate limited"),
        }
    }
}

impl std::error::Error for AgentError {}

/// The built-in `[agent] provider = "echo"`: replies with the message itself, spends nothing.
///
/// It lets an operator check the whole gateway path (auth, sessions, admission, metrics)
/// without an upstream, and it is the trivial agent the gateway benchmark measures.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoAgent;

impl Agent for EchoAgent {
    fn reply<'a>(
        &'a self,
        _ctx: &'a Context,
        _session: &'a Session,
        message: &'a str,
    ) -> BoxFuture<'a, Result<Reply, AgentError>> {
        Box::pin(async move {
            Ok(Reply {
                content: message.to_owned(),
                usage: Some(Usage {
                    model: "echo".to_owned(),
                    input_tokens: message.split_whitespace().count() as u64,
                    output_tokens: message.split_whitespace().count() as u64,
                    cost_usd: 0.0,
                }),
            })
        })
    }

    fn models(&self) -> Vec<String> {
        vec!["echo".to_owned()]
    }
}

/// The echo agent with a delay before each reply (`[agent] echo_delay_ms`): keeps requests in
/// flight for tests of shutdown and deadlines. Not meant for production.
#[derive(Debug, Clone, Copy)]
pub struct DelayedEchoAgent {
    delay: Duration,
}

impl DelayedEchoAgent {
    /// Creates an echo agent that waits `delay` before answering.
    pub fn new(delay: Duration) -> DelayedEchoAgent {
        DelayedEchoAgent { delay }
    }
}

impl Agent for DelayedEchoAgent {
    fn reply<'a>(
        &'a self,
        ctx: &'a Context,
        session: &'a Session,
        message: &'a str,
    ) -> BoxFuture<'a, Result<Reply, AgentError>> {
        Box::pin(async move {
            Timer::after(self.delay).await;
            EchoAgent.reply(ctx, session, message).await
        })
    }

    fn models(&self) -> Vec<String> {
        EchoAgent.models()
    }
}
