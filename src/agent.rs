//! The [`Agent`] trait: whatever answers messages sent to `/v1/messages` and `/ws`.
//!
//! A host that embeds blufio supplies its own agent through
//! [`ContextBuilder::with_agent`](crate::ContextBuilder::with_agent). The gateway hands the
//! agent the session history and the new message, and does the token and cost accounting
//! from the [`Usage`] it reports. A streaming agent sends text deltas through a
//! [`DeltaSender`] as they arrive; the built-in providers live in `provider/`.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use async_io::Timer;

/// Who is speaking in a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client.
    User,
    /// The agent.
    Assistant,
}

impl Role {
    /// Returns `"user"` or `"assistant"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message in a session's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

/// A boxed future, so [`Agent`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an [`Agent`] call resolves to.
pub type ReplyFuture<'a> = BoxFuture<'a, Result<Reply, AgentError>>;

/// What the gateway asks of an agent in one call.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The session's earlier turns, oldest first, without `message`.
    pub history: &'a [Turn],
    /// The new message.
    pub message: &'a str,
    /// The model alias the client asked for (`"model"` in the message, else the session's);
    /// `None` for the default model. An agent with a single model may ignore it.
    pub model: Option<&'a str>,
    /// The session's own system prompt (`"system"` when it was created), which replaces the
    /// model's configured one; `None` keeps that.
    pub system: Option<&'a str>,
    /// When the gateway gives up on the call (`[agent] timeout_secs` from its start), so an
    /// agent that retries need not start a wait that would end past it.
    pub deadline: Instant,
}

/// Answers messages.
pub trait Agent: Send + Sync + 'static {
    /// Returns the reply to the call's message, given the session's history.
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a>;

    /// Returns the model names this agent reports usage for, so their token counters exist
    /// from start-up.
    fn models(&self) -> Vec<String> {
        Vec::new()
    }

    /// Like [`Agent::reply`], sending the text through `deltas` as it is produced. The
    /// default sends the whole reply as one delta.
    ///
    /// When `deltas` reports the client gone, the agent should stop (returning an error is
    /// fine); the gateway drops the future anyway, which must cancel any upstream request.
    fn reply_stream<'a>(&'a self, call: Call<'a>, deltas: &'a DeltaSender) -> ReplyFuture<'a> {
        Box::pin(async move {
            let reply = self.reply(call).await?;
            // A departed client is the gateway's concern; the reply is complete either way.
            let _ = deltas.send(&reply.content).await;
            Ok(reply)
        })
    }

    /// Returns the upstream's state for `/v1/health`, for agents that call one.
    fn upstream(&self) -> Option<UpstreamStatus> {
        None
    }

    /// Records the outcome of one call (the gateway calls it, timeouts included), so
    /// [`Agent::upstream`] can report the last error and when it happened.
    fn record(&self, _outcome: Result<(), &AgentError>) {}
}

/// What `/v1/health` shows about an agent's upstream. Never the key itself.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStatus {
    /// `anthropic` or `openai`.
    pub provider: &'static str,
    /// The configured model.
    pub model: String,
    /// Whether an API key is configured.
    pub api_key_set: bool,
    /// The last failure's error code (`agent_upstream`, `agent_timeout`, ...) and detail.
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_error_at: Option<SystemTime>,
    /// When the last call succeeded.
    pub last_success_at: Option<SystemTime>,
}

/// The client went away; stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected;

/// Where a streaming agent sends text deltas, and reports usage as the upstream tells it.
///
/// The gateway reads the usage even when the stream is cut short, so tokens of an abandoned
/// reply still count against the budget.
#[derive(Debug)]
pub struct DeltaSender {
    sender: async_channel::Sender<String>,
    started: Instant,
    progress: Mutex<StreamProgress>,
}

/// What a stream has produced so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamProgress {
    /// The model, once the upstream names it.
    pub model: Option<String>,
    /// Input tokens, once the upstream reports them.
    pub input_tokens: Option<u64>,
    /// Output tokens, once the upstream reports them.
    pub output_tokens: Option<u64>,
    /// Characters of text sent so far (for estimates).
    pub sent_chars: u64,
    /// Time from the start to the first delta.
    pub first_delta_after: Option<Duration>,
}

impl DeltaSender {
    /// Wraps the sending half of the channel the gateway reads deltas from.
    pub fn new(sender: async_channel::Sender<String>) -> DeltaSender {
        DeltaSender {
            sender,
            started: Instant::now(),
            progress: Mutex::new(StreamProgress::default()),
        }
    }

    /// Sends one text delta; waits while the client is slow (the channel is bounded).
    ///
    /// # Errors
    ///
    /// Returns [`Disconnected`] when the client is gone.
    pub async fn send(&self, text: &str) -> Result<(), Disconnected> {
        if text.is_empty() {
            return Ok(());
        }
        {
            let mut progress = self.lock();
            progress.sent_chars += text.chars().count() as u64;
            if progress.first_delta_after.is_none() {
                progress.first_delta_after = Some(self.started.elapsed());
            }
        }
        self.sender
            .send(text.to_owned())
            .await
            .map_err(|_| Disconnected)
    }

    /// Records usage as the upstream reports it; `None` leaves a value unchanged.
    pub fn report_usage(
        &self,
        model: Option<&str>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    ) {
        let mut progress = self.lock();
        if let Some(model) = model {
            progress.model = Some(model.to_owned());
        }
        if input_tokens.is_some() {
            progress.input_tokens = input_tokens;
        }
        if output_tokens.is_some() {
            progress.output_tokens = output_tokens;
        }
    }

    /// Returns what the stream has produced so far.
    pub fn progress(&self) -> StreamProgress {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamProgress> {
        crate::sync::lock(&self.progress)
    }
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The reply text.
    pub content: String,
    /// Tokens and money spent producing it, when the agent knows.
    pub usage: Option<Usage>,
    /// The model alias that answered (a fallback's when the one asked for failed), when the
    /// agent routes by alias; clients see it as the reply's `"model"`.
    pub model: Option<String>,
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
    /// Whether the tokens were estimated from the text (the upstream reported none, or a
    /// stream was cut before it did) rather than reported.
    pub estimated: bool,
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
    /// The upstream refused the request itself (a 4xx other than 429: bad key, unknown
    /// model, prompt too long); retrying will not help (HTTP 502).
    Rejected {
        /// The upstream's HTTP status.
        status: u16,
    },
    /// The upstream answered something that is not the documented JSON (HTTP 502).
    Malformed(String),
    /// The message names a model this agent does not serve (HTTP 404).
    UnknownModel(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Upstream(message) => write!(f, "agent upstream failed: {message}"),
            AgentError::Timeout => f.write_str("agent timed out"),
            AgentError::RateLimited { .. } => f.write_str("agent is rate limited"),
            AgentError::Rejected { status } => {
                write!(f, "the model provider refused the request (HTTP {status})")?;
                // A hint that names no setting: clients are not operators; the log and
                // `blufio status` say what to check.
                match status {
                    401 | 403 => f.write_str(": it did not accept the gateway's API key"),
                    404 => f.write_str(": it does not know the model"),
                    _ => Ok(()),
                }
            }
            AgentError::Malformed(detail) => {
                write!(f, "the model provider answered malformed data: {detail}")
            }
            AgentError::UnknownModel(model) if model.is_empty() => {
                f.write_str("no model was named and no default model is configured")
            }
            AgentError::UnknownModel(model) => write!(f, "there is no model named {model:?}"),
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
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
        let message = call.message;
        Box::pin(async move {
            Ok(Reply {
                content: message.to_owned(),
                usage: Some(Usage {
                    model: "echo".to_owned(),
                    input_tokens: message.split_whitespace().count() as u64,
                    output_tokens: message.split_whitespace().count() as u64,
                    cost_usd: 0.0,
                    estimated: false,
                }),
                // The echo agent serves no alias.
                model: None,
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
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
        Box::pin(async move {
            Timer::after(self.delay).await;
            EchoAgent.reply(call).await
        })
    }

    fn models(&self) -> Vec<String> {
        EchoAgent.models()
    }
}
