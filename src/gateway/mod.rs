//! The message path shared by `POST /v1/messages` and `/ws`: budget check, the agent call
//! with its timeout, history, token and cost accounting, latency.
//!
//! It knows nothing of HTTP; the callers map [`MessageError`] to statuses or error frames.
//! A streamed exchange ([`exchange_stream`]) sends deltas through a [`DeltaSender`]; when
//! its future is dropped (the client went away), the upstream call is dropped with it, the
//! history is left unchanged, and whatever the stream produced is still charged.

use std::{
    fmt,
    time::{Duration, Instant, SystemTime},
};

use futures_lite::FutureExt;
use serde_json::{Value, json};

pub mod chat;
mod message;
mod usage;

pub use self::message::{IncomingMessage, parse_message};
use self::usage::{Prompt, Unfinished, UsageCeiling, charge};
use crate::{
    agent::{AgentError, Call, DeltaSender, Usage},
    context::Context,
    cost::micro_usd,
    metrics::{Channel, ErrorKind},
    sessions::{Role, Session, Turn},
};

/// Why a message got no reply.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageError {
    /// No agent is configured.
    NoAgent,
    /// Today's budget is spent.
    BudgetExhausted {
        /// Time until the next UTC midnight.
        retry_after: Duration,
    },
    /// The agent failed.
    Agent(AgentError),
}

impl MessageError {
    /// Returns the machine-readable code for JSON bodies and error frames.
    pub fn code(&self) -> &'static str {
        match self {
            MessageError::NoAgent => "no_agent",
            MessageError::BudgetExhausted { .. } => "budget_exhausted",
            MessageError::Agent(AgentError::Upstream(_)) => "agent_upstream",
            MessageError::Agent(AgentError::Rejected { .. }) => "agent_rejected",
            MessageError::Agent(AgentError::Malformed(_)) => "agent_malformed",
            MessageError::Agent(AgentError::Timeout) => "agent_timeout",
            MessageError::Agent(AgentError::RateLimited { .. }) => "rate_limited",
            MessageError::Agent(AgentError::UnknownModel(_)) => "model_not_found",
        }
    }

    /// Returns the `blufio_errors_total` type.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MessageError::NoAgent => ErrorKind::NoAgent,
            MessageError::BudgetExhausted { .. } => ErrorKind::BudgetExhausted,
            MessageError::Agent(AgentError::RateLimited { .. }) => ErrorKind::AgentRateLimit,
            MessageError::Agent(AgentError::Upstream(_)) => ErrorKind::AgentUpstream,
            MessageError::Agent(AgentError::Rejected { .. }) => ErrorKind::AgentRejected,
            MessageError::Agent(AgentError::Malformed(_)) => ErrorKind::AgentMalformed,
            MessageError::Agent(AgentError::Timeout) => ErrorKind::AgentTimeout,
            MessageError::Agent(AgentError::UnknownModel(_)) => ErrorKind::NotFound,
        }
    }
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::NoAgent => f.write_str("no agent is configured ([agent] provider)"),
            MessageError::BudgetExhausted { .. } => f.write_str(
                "today's budget is spent ([cost] daily_budget_usd); it refills at 00:00 UTC",
            ),
            // Upstream details can carry provider internals; the log has them, clients do not.
            MessageError::Agent(AgentError::Upstream(_)) => {
                f.write_str("the agent's upstream failed")
            }
            MessageError::Agent(AgentError::Malformed(_)) => {
                f.write_str("the agent's upstream answered malformed data")
            }
            MessageError::Agent(error) => write!(f, "{error}"),
        }
    }
}

/// An agent's reply, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageReply {
    /// The session the exchange belongs to.
    pub session_id: String,
    /// The reply text.
    pub content: String,
    /// What it cost, if the agent said.
    pub usage: Option<Usage>,
}

impl MessageReply {
    /// Returns the JSON clients receive.
    pub fn to_json(&self) -> Value {
        let mut body = json!({ "session_id": self.session_id, "content": self.content });
        if let (Some(usage), Value::Object(map)) = (&self.usage, &mut body) {
            map.insert(
                "usage".into(),
                json!({
                    "model": usage.model,
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                    "cost_usd": micro_usd(usage.cost_usd),
                    "estimated": usage.estimated,
                }),
            );
        }
        body
    }
}

/// Sends `content` to the agent as the next turn of `session` and records the exchange.
///
/// # Errors
///
/// Returns [`MessageError`] when there is no agent, the budget is spent or the agent fails;
/// the history is then left unchanged so the client can retry.
pub async fn exchange(
    ctx: &Context,
    session: &Session,
    content: String,
    channel: Channel,
) -> Result<MessageReply, MessageError> {
    run(ctx, session, content, channel, None).await
}

/// Like [`exchange`], sending the reply's text through `deltas` as the agent produces it.
///
/// Dropping the future cancels the agent call; the history stays unchanged and the tokens
/// the stream reported (or an estimate from the text sent) are still charged.
///
/// # Errors
///
/// As [`exchange`].
pub async fn exchange_stream(
    ctx: &Context,
    session: &Session,
    content: String,
    channel: Channel,
    deltas: &DeltaSender,
) -> Result<MessageReply, MessageError> {
    run(ctx, session, content, channel, Some(deltas)).await
}

async fn run(
    ctx: &Context,
    session: &Session,
    content: String,
    channel: Channel,
    deltas: Option<&DeltaSender>,
) -> Result<MessageReply, MessageError> {
    let received = Instant::now();
    ctx.metrics.count_message(channel);
    session.touch();
    let history = session.history();
    let prompt = Prompt::measure(ctx.config.agent.system.as_deref(), &history, &content);
    let mut unfinished = deltas.map(|deltas| Unfinished::new(ctx, deltas, prompt));
    let result = call_agent(ctx, &history, &content, deltas).await;
    ctx.metrics
        .response_latency
        .record(received.elapsed().as_secs_f64());
    if let Some(unfinished) = &mut unfinished {
        unfinished.finish(result.is_ok());
    }
    let reply = match result {
        Ok(reply) => reply,
        Err(error) => {
            ctx.metrics.count_error(error.kind());
            if let MessageError::Agent(
                AgentError::Upstream(detail) | AgentError::Malformed(detail),
            ) = &error
            {
                log::warn!("agent upstream failed: {detail}");
            }
            return Err(error);
        }
    };
    let usage = reply.usage.map(|usage| {
        let ceiling = UsageCeiling::new(
            prompt,
            reply.content.len() as u64,
            u64::from(ctx.config.agent.max_tokens),
        );
        charge(ctx, usage, ceiling)
    });
    let limits = ctx.session_limits();
    session.push(
        Turn {
            role: Role::User,
            content,
        },
        &limits,
    );
    session.push(
        Turn {
            role: Role::Assistant,
            content: reply.content.clone(),
        },
        &limits,
    );
    Ok(MessageReply {
        session_id: session.id().to_owned(),
        content: reply.content,
        usage,
    })
}

async fn call_agent(
    ctx: &Context,
    history: &[Turn],
    content: &str,
    deltas: Option<&DeltaSender>,
) -> Result<crate::agent::Reply, MessageError> {
    let agent = ctx.agent.as_ref().ok_or(MessageError::NoAgent)?;
    // One reading of the live settings for the whole call, so a reload lands between calls.
    let (daily_usd, timeout_secs) = {
        let live = ctx.live();
        (live.daily_budget_usd, live.agent_timeout_secs)
    };
    ctx.budget
        .check(daily_usd, SystemTime::now())
        .map_err(|exhausted| MessageError::BudgetExhausted {
            retry_after: exhausted.retry_after,
        })?;
    let timeout = Duration::from_secs(timeout_secs);
    let now = Instant::now();
    let deadline = now.checked_add(timeout).unwrap_or(now);
    let call = Call {
        history,
        message: content,
        model: None,
        deadline,
    };
    let call = match deltas {
        Some(deltas) => agent.reply_stream(call, deltas),
        None => agent.reply(call),
    };
    // A panicking agent must not take the connection task (or an executor thread) with it:
    // the client gets 502 and the daemon keeps serving.
    let reply = std::panic::AssertUnwindSafe(call)
        .catch_unwind()
        .or(async {
            async_io::Timer::after(timeout).await;
            Ok(Err(AgentError::Timeout))
        })
        .await;
    if let Ok(reply) = &reply {
        agent.record(reply.as_ref().map(|_| ()));
    }
    match reply {
        Ok(reply) => reply.map_err(MessageError::Agent),
        Err(_) => {
            log::error!("the agent panicked while answering a message");
            ctx.metrics.count_error(ErrorKind::Internal);
            Err(MessageError::Agent(AgentError::Upstream(
                "the agent panicked".to_owned(),
            )))
        }
    }
}
