//! The message path shared by `POST /v1/messages` and `/ws`: the model check, budget check,
//! the agent call with its timeout, history, token and cost accounting, latency.
//!
//! A message is answered by its own `model`, else its session's, else the default model,
//! and carries its session's system prompt; the usage ceiling counts the longest system
//! prompt any hop of the model's chain may send.
//!
//! It knows nothing of HTTP; the callers map [`MessageError`] to statuses or error frames.
//! A streamed exchange ([`exchange_stream`]) sends deltas through a [`DeltaSender`]; when
//! its future is dropped (the client went away), the upstream call is dropped with it, the
//! history is left unchanged, and whatever the stream produced is still charged.

use std::{
    fmt,
    future::Future,
    time::{Duration, Instant, SystemTime},
};

use futures_lite::FutureExt;
use serde_json::{Value, json};

pub mod chat;
mod message;
mod usage;

pub(crate) use self::message::non_empty;
pub use self::message::{IncomingMessage, parse_message};
use self::usage::{Prompt, Unfinished, UsageCeiling, charge};
use crate::{
    agent::{AgentError, Call, DeltaSender, Usage},
    context::Context,
    cost::micro_usd,
    metrics::{Channel, ErrorKind},
    sessions::{Role, Session, SessionKind, Turn},
    store::{Store, StoreError, StoredTurn, unix_now},
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
    /// The session store could not read the history or commit the exchange (a full disk,
    /// a read-only directory); nothing of the message is kept.
    Storage,
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
            MessageError::Storage => "storage_unavailable",
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
            MessageError::Storage => ErrorKind::Storage,
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
            MessageError::Storage => f.write_str(
                "the session store cannot be written right now; the message was not kept, \
                 try again later",
            ),
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
    /// The model alias that answered, if the agent said.
    pub model: Option<String>,
}

impl MessageReply {
    /// Returns the JSON clients receive: `session_id`, `content`, and `model` and `usage`
    /// when known.
    pub fn to_json(&self) -> Value {
        let mut body = json!({ "session_id": self.session_id, "content": self.content });
        if let (Some(model), Value::Object(map)) = (&self.model, &mut body) {
            map.insert("model".into(), json!(model));
        }
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

/// Returns the error a message naming `model` (`None`: the default model) gets before any
/// session is opened for it or any upstream called, when the daemon routes by alias and has
/// no such model. Without configured models the name goes to the agent, which decides.
///
/// # Errors
///
/// Returns [`AgentError::UnknownModel`] for an alias the routing table does not have (or no
/// default model when none is named).
pub fn check_model(ctx: &Context, model: Option<&str>) -> Result<(), MessageError> {
    let routes = ctx.upstreams.routes();
    if routes.is_empty() || routes.resolve(model).is_some() {
        return Ok(());
    }
    Err(MessageError::Agent(AgentError::UnknownModel(
        model.unwrap_or_default().to_owned(),
    )))
}

/// Sends `content` to the agent as the next turn of `session` and records the exchange.
/// `model` is the message's own alias; without one the session's, else the default.
///
/// # Errors
///
/// Returns [`MessageError`] when there is no agent, the budget is spent or the agent fails;
/// the history is then left unchanged so the client can retry.
pub async fn exchange(
    ctx: &Context,
    session: &Session,
    content: String,
    model: Option<&str>,
    channel: Channel,
) -> Result<MessageReply, MessageError> {
    run(ctx, session, content, model, channel, None).await
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
    model: Option<&str>,
    channel: Channel,
    deltas: &DeltaSender,
) -> Result<MessageReply, MessageError> {
    run(ctx, session, content, model, channel, Some(deltas)).await
}

/// What an exchange is expected to send, as far as the gateway can tell before the call, for
/// the usage ceiling and the charge of a cut stream.
struct Plan<'a> {
    /// The longest system prompt a hop may send: the session's own, else the longest of the
    /// route's chain (a fallback may send its own), else `[agent] system`. The ceiling is an
    /// upper bound, so the longest is the right one to count.
    system: Option<&'a str>,
    /// The largest `max_tokens` a hop may ask for.
    max_tokens: u32,
    /// The upstream model id of the first hop, charged for a stream cut before it named one.
    first_model: Option<&'a str>,
}

impl<'a> Plan<'a> {
    fn new(ctx: &'a Context, session: &'a Session, model: Option<&str>) -> Plan<'a> {
        let chain = ctx
            .upstreams
            .routes()
            .resolve(model)
            .map_or(&[][..], |route| &route.chain[..]);
        let configured = chain
            .iter()
            .filter_map(|target| target.system.as_deref())
            .max_by_key(|system| system.len())
            .or(ctx.config.agent.system.as_deref());
        Plan {
            system: session.system().or(configured),
            max_tokens: chain
                .iter()
                .map(|target| target.max_tokens)
                .max()
                .unwrap_or(ctx.config.agent.max_tokens),
            first_model: chain.first().map(|target| target.model.as_str()),
        }
    }
}

async fn run(
    ctx: &Context,
    session: &Session,
    content: String,
    model: Option<&str>,
    channel: Channel,
    deltas: Option<&DeltaSender>,
) -> Result<MessageReply, MessageError> {
    let received = Instant::now();
    ctx.metrics.count_message(channel);
    session.touch();
    let model = model.or(session.model());
    let plan = Plan::new(ctx, session, model);
    let history = history(ctx, session).await?;
    let received_at = unix_now();
    let prompt = Prompt::measure(plan.system, &history, &content);
    let mut unfinished = deltas.map(|deltas| {
        let unfinished = Unfinished::new(ctx, deltas, prompt);
        match plan.first_model {
            Some(first) => unfinished.with_model(first),
            None => unfinished,
        }
    });
    let call = Call {
        history: &history,
        message: &content,
        model,
        system: session.system(),
        // Set by `call_agent` from the live timeout, once the budget check has passed.
        deadline: received,
    };
    let result = call_agent(ctx, call, deltas).await;
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
    let usage = reply.usage.clone().map(|usage| {
        let ceiling = UsageCeiling::new(
            prompt,
            reply.content.len() as u64,
            u64::from(plan.max_tokens),
        );
        charge(ctx, usage, ceiling)
    });
    if let Some(store) = stored(ctx, session) {
        keep(
            ctx,
            store,
            session,
            &content,
            received_at,
            &reply,
            usage.as_ref(),
        )
        .await?;
    }
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
        model: reply.model,
    })
}

/// Returns the session store when it keeps `session` (HTTP sessions; a WebSocket's session
/// lives with its connection).
fn stored<'a>(ctx: &'a Context, session: &Session) -> Option<&'a Store> {
    ctx.store
        .as_ref()
        .filter(|_| session.kind() == SessionKind::Http)
}

/// Returns the session's history: from memory, or read back from the store when a restart
/// or memory pressure left it there.
async fn history(ctx: &Context, session: &Session) -> Result<Vec<Turn>, MessageError> {
    if let Some(history) = session.loaded_history() {
        return Ok(history);
    }
    let Some(store) = stored(ctx, session) else {
        return Ok(Vec::new());
    };
    let limits = ctx.session_limits();
    let turns = store
        .history(
            session.id(),
            limits.max_history_messages,
            limits.max_history_bytes,
        )
        .await
        .map_err(|error| storage_failed(ctx, &error))?;
    session.fill(turns.clone(), &limits);
    // Trimmed to the session's budget; the turns as read if pressure dropped them again.
    Ok(session.loaded_history().unwrap_or(turns))
}

/// Commits the exchange's two turns (and today's spend, which includes it) before the reply
/// is returned, so a reply a client has received survives a crash or a power cut.
async fn keep(
    ctx: &Context,
    store: &Store,
    session: &Session,
    content: &str,
    received_at: u64,
    reply: &crate::agent::Reply,
    usage: Option<&Usage>,
) -> Result<(), MessageError> {
    let turns = vec![
        StoredTurn {
            seq: 0,
            role: Role::User,
            content: content.to_owned(),
            created_at: received_at,
            model: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
        },
        StoredTurn {
            seq: 0,
            role: Role::Assistant,
            content: reply.content.clone(),
            created_at: unix_now(),
            model: reply.model.clone(),
            input_tokens: usage.map(|usage| usage.input_tokens),
            output_tokens: usage.map(|usage| usage.output_tokens),
            cost_usd: usage.map(|usage| usage.cost_usd),
        },
    ];
    let create = (!session.in_store()).then(|| session.record());
    // A reply that cost nothing leaves the day's total as it was: no upsert to commit.
    let spend = usage
        .filter(|usage| usage.cost_usd > 0.0)
        .map(|_| ctx.budget.today_total(SystemTime::now()));
    store
        .append(session.id(), create, turns, spend)
        .await
        .map_err(|error| storage_failed(ctx, &error))?;
    session.mark_in_store();
    Ok(())
}

/// Logs a failed store operation at debug level (the store logs each episode once and
/// counts each failed write) and returns the message's error.
fn storage_failed(_ctx: &Context, error: &StoreError) -> MessageError {
    log::debug!("{error}");
    MessageError::Storage
}

/// Calls the agent with `call` (its deadline set here, from the live timeout).
async fn call_agent(
    ctx: &Context,
    mut call: Call<'_>,
    deltas: Option<&DeltaSender>,
) -> Result<crate::agent::Reply, MessageError> {
    let agent = ctx.agent.as_ref().ok_or(MessageError::NoAgent)?;
    call.deadline = admit(ctx)?;
    let deadline = call.deadline;
    let call = match deltas {
        Some(deltas) => agent.reply_stream(call, deltas),
        None => agent.reply(call),
    };
    let reply = contained(ctx, call, deadline).await;
    agent.record(reply.as_ref().map(|_| ()));
    reply.map_err(MessageError::Agent)
}

/// Admits one call to a model: refuses it when today's budget is spent, else returns its
/// deadline. One reading of the live settings for the whole call, so a reload lands between
/// calls.
fn admit(ctx: &Context) -> Result<Instant, MessageError> {
    let (daily_usd, timeout_secs) = {
        let live = ctx.live();
        (live.daily_budget_usd, live.agent_timeout_secs)
    };
    ctx.budget
        .check(daily_usd, SystemTime::now())
        .map_err(|exhausted| MessageError::BudgetExhausted {
            retry_after: exhausted.retry_after,
        })?;
    let now = Instant::now();
    Ok(now
        .checked_add(Duration::from_secs(timeout_secs))
        .unwrap_or(now))
}

/// Runs a call to a model until `deadline`. A panic in an agent or a provider must not take
/// the connection task (or an executor thread) with it: it becomes an upstream error (the
/// client gets 502), counted and logged, and the daemon keeps serving.
async fn contained<T>(
    ctx: &Context,
    call: impl Future<Output = Result<T, AgentError>>,
    deadline: Instant,
) -> Result<T, AgentError> {
    std::panic::AssertUnwindSafe(call)
        .catch_unwind()
        .or(async {
            async_io::Timer::at(deadline).await;
            Ok(Err(AgentError::Timeout))
        })
        .await
        .unwrap_or_else(|_| {
            log::error!("the model call panicked while answering a message");
            ctx.metrics.count_error(ErrorKind::Internal);
            Err(AgentError::Upstream("the model call panicked".to_owned()))
        })
}
