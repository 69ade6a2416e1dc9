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
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    agent::{AgentError, DeltaSender, StreamProgress, Usage},
    context::Context,
    cost::{CostConfig, micro_usd},
    metrics::{Channel, ErrorKind, TokenType},
    sessions::{Role, Session, Turn},
};

/// A message as clients send it over HTTP or in a WebSocket text frame: a JSON object with a
/// string `content`, an optional `session_id`, an optional boolean `stream` and no other
/// field.
///
/// `Deserialize` is written by hand because serde's derive also accepts a JSON array in field
/// order (`[null, "hi"]`), a second, undocumented wire format (found by fuzzing).
#[derive(Debug)]
pub struct IncomingMessage {
    /// The session to continue; absent opens a new one (HTTP only).
    pub session_id: Option<String>,
    /// The message text.
    pub content: String,
    /// Stream the reply as deltas (`text/event-stream` over HTTP, delta frames over `/ws`).
    pub stream: bool,
}

impl<'de> Deserialize<'de> for IncomingMessage {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MessageVisitor)
    }
}

/// Reads an [`IncomingMessage`] from a map only.
struct MessageVisitor;

impl<'de> serde::de::Visitor<'de> for MessageVisitor {
    type Value = IncomingMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with `content` and optional `session_id` and `stream`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;

        const FIELDS: &[&str] = &["session_id", "content", "stream"];
        let mut session_id: Option<Option<String>> = None;
        let mut content: Option<String> = None;
        let mut stream: Option<bool> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "session_id" if session_id.is_some() => {
                    return Err(A::Error::duplicate_field("session_id"));
                }
                "session_id" => session_id = Some(map.next_value()?),
                "content" if content.is_some() => return Err(A::Error::duplicate_field("content")),
                "content" => content = Some(map.next_value()?),
                "stream" if stream.is_some() => return Err(A::Error::duplicate_field("stream")),
                "stream" => stream = Some(map.next_value()?),
                other => return Err(A::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(IncomingMessage {
            session_id: session_id.flatten(),
            content: content.ok_or_else(|| A::Error::missing_field("content"))?,
            stream: stream.unwrap_or(false),
        })
    }
}

/// Decodes a message as sent in an HTTP body or a WebSocket text frame.
///
/// Pure, so it can be fuzzed (`fuzz/fuzz_targets/message.rs`).
///
/// # Errors
///
/// Returns the JSON error when `text` is not an object with a string `content`, an optional
/// string `session_id`, an optional boolean `stream` and no other field.
pub fn parse_message(text: &str) -> Result<IncomingMessage, serde_json::Error> {
    serde_json::from_str(text)
}

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
    let mut unfinished = deltas.map(|deltas| Unfinished {
        ctx,
        deltas,
        prompt,
        armed: true,
    });
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
    ctx.budget
        .check(SystemTime::now())
        .map_err(|exhausted| MessageError::BudgetExhausted {
            retry_after: exhausted.retry_after,
        })?;
    let timeout = Duration::from_secs(ctx.live().agent.timeout_secs);
    let now = Instant::now();
    let deadline = now.checked_add(timeout).unwrap_or(now);
    let call = match deltas {
        Some(deltas) => agent.reply_stream(history, content, deltas, deadline),
        None => agent.reply(history, content, deadline),
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

/// What was sent to the agent for one exchange, measured for estimates and for the
/// [`UsageCeiling`]: the system prompt, the history and the new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prompt {
    chars: u64,
    bytes: u64,
    turns: u64,
}

impl Prompt {
    fn measure(system: Option<&str>, history: &[Turn], content: &str) -> Prompt {
        let texts = system
            .into_iter()
            .chain(history.iter().map(|turn| turn.content.as_str()))
            .chain(std::iter::once(content));
        let mut prompt = Prompt {
            chars: 0,
            bytes: 0,
            turns: 0,
        };
        for text in texts {
            prompt.chars += text.chars().count() as u64;
            prompt.bytes += text.len() as u64;
            prompt.turns += 1;
        }
        prompt
    }
}

/// Tokens a chat template adds around each message (role markers, separators), at most.
const TOKENS_PER_TURN: u64 = 16;
/// Tokens an upstream may add to any prompt (its own preamble), at most.
const TOKENS_PER_PROMPT: u64 = 512;

/// The most one exchange can plausibly use, so an upstream reporting absurd usage (by bug or
/// by malice) cannot charge the day's budget beyond what was actually sent and received.
///
/// Tokenizers in use are byte-level: a token covers at least one byte of text, so a text
/// never has more tokens than bytes. Input is bounded by the prompt's bytes plus template
/// overhead; output by the request's `max_tokens` (which the upstream must honour), or the
/// reply's bytes for an agent that ignores it, plus one turn's overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UsageCeiling {
    input_tokens: u64,
    output_tokens: u64,
}

impl UsageCeiling {
    fn new(prompt: Prompt, reply_bytes: u64, max_tokens: u64) -> UsageCeiling {
        UsageCeiling {
            input_tokens: prompt
                .bytes
                .saturating_add(prompt.turns.saturating_mul(TOKENS_PER_TURN))
                .saturating_add(TOKENS_PER_PROMPT),
            output_tokens: max_tokens.max(reply_bytes).saturating_add(TOKENS_PER_TURN),
        }
    }

    /// Returns `usage` with its tokens held to the ceiling and its cost priced again, or
    /// `None` when it is within the ceiling.
    fn clamp(&self, usage: &Usage, cost: &CostConfig) -> Option<Usage> {
        if usage.input_tokens <= self.input_tokens && usage.output_tokens <= self.output_tokens {
            return None;
        }
        let input_tokens = usage.input_tokens.min(self.input_tokens);
        let output_tokens = usage.output_tokens.min(self.output_tokens);
        let price = cost.price(&usage.model);
        let cost_usd = if price.input_usd_per_mtok > 0.0 || price.output_usd_per_mtok > 0.0 {
            cost.cost_usd(&usage.model, input_tokens, output_tokens)
        } else {
            // An agent that prices its own model: scale its figure with the tokens.
            let reported = usage.input_tokens.saturating_add(usage.output_tokens);
            let kept = input_tokens.saturating_add(output_tokens);
            usage.cost_usd * (kept as f64 / reported.max(1) as f64)
        };
        Some(Usage {
            model: usage.model.clone(),
            input_tokens,
            output_tokens,
            cost_usd,
            estimated: usage.estimated,
        })
    }
}

/// Charges `usage`, held to `ceiling`, and returns what was charged. Usage beyond the
/// ceiling is counted as `agent_malformed` and logged, not charged.
fn charge(ctx: &Context, usage: Usage, ceiling: UsageCeiling) -> Usage {
    let usage = match ceiling.clamp(&usage, &ctx.config.cost) {
        None => usage,
        Some(clamped) => {
            ctx.metrics.count_error(ErrorKind::AgentMalformed);
            log::warn!(
                "model {}: the upstream reported {} input and {} output tokens (${}), more than \
                 this exchange can use; charging {} and {} (${}) instead",
                usage.model,
                usage.input_tokens,
                usage.output_tokens,
                micro_usd(usage.cost_usd),
                clamped.input_tokens,
                clamped.output_tokens,
                micro_usd(clamped.cost_usd),
            );
            clamped
        }
    };
    account(ctx, &usage);
    usage
}

/// Counts tokens and charges the cost to today's budget.
fn account(ctx: &Context, usage: &Usage) {
    ctx.metrics
        .count_tokens(&usage.model, TokenType::Input, usage.input_tokens);
    ctx.metrics
        .count_tokens(&usage.model, TokenType::Output, usage.output_tokens);
    // The spend writer saves it off the executor and reports a failing disk itself.
    ctx.budget
        .spend(&usage.model, usage.cost_usd, SystemTime::now());
}

/// Charges what a stream produced when it does not finish normally: the client went away
/// (the future is dropped) or the upstream failed after sending text.
struct Unfinished<'a> {
    ctx: &'a Context,
    deltas: &'a DeltaSender,
    prompt: Prompt,
    armed: bool,
}

impl Unfinished<'_> {
    /// Records time to first token; charges the partial stream unless it `succeeded` (then
    /// the reply's usage is charged instead).
    fn finish(&mut self, succeeded: bool) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let progress = self.deltas.progress();
        if let Some(first) = progress.first_delta_after {
            self.ctx
                .metrics
                .time_to_first_token
                .record(first.as_secs_f64());
        }
        if succeeded {
            return;
        }
        let produced = progress.sent_chars > 0 || progress.output_tokens.is_some();
        if !produced {
            return;
        }
        let (input_tokens, output_tokens, estimated) = partial_tokens(&progress, self.prompt);
        let model = progress
            .model
            .or_else(|| {
                self.ctx
                    .agent
                    .as_ref()
                    .and_then(|agent| agent.models().into_iter().next())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let usage = Usage {
            cost_usd: self
                .ctx
                .config
                .cost
                .cost_usd(&model, input_tokens, output_tokens),
            model,
            input_tokens,
            output_tokens,
            estimated,
        };
        // Text is at most four bytes a character.
        let ceiling = UsageCeiling::new(
            self.prompt,
            progress.sent_chars.saturating_mul(4),
            u64::from(self.ctx.config.agent.max_tokens),
        );
        let usage = charge(self.ctx, usage, ceiling);
        log::info!(
            "stream ended early; charged {} input and {} output tokens{}",
            usage.input_tokens,
            usage.output_tokens,
            if usage.estimated { " (estimated)" } else { "" }
        );
    }
}

/// Returns the input and output tokens to charge for a stream that did not finish, and
/// whether they are estimates.
///
/// Upstreams report output tokens at the start (Anthropic: 1) and at the end, so a cut
/// stream's report lags what it delivered: at least an estimate of the text sent is charged.
fn partial_tokens(progress: &StreamProgress, prompt: Prompt) -> (u64, u64, bool) {
    let input = progress.input_tokens;
    let delivered = crate::provider::estimate_tokens(progress.sent_chars);
    let output = progress
        .output_tokens
        .filter(|reported| *reported >= delivered);
    (
        input.unwrap_or_else(|| crate::provider::estimate_tokens(prompt.chars)),
        output.unwrap_or(delivered),
        input.is_none() || output.is_none(),
    )
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_objects_with_content_and_an_optional_session() {
        let message = parse_message(r#"{"content":"hi"}"#).unwrap();
        assert_eq!((message.session_id, message.content.as_str()), (None, "hi"));
        let message = parse_message(r#"{"session_id":"abc","content":"hi"}"#).unwrap();
        assert_eq!(message.session_id.as_deref(), Some("abc"));
        let message = parse_message(r#"{"session_id":null,"content":"hi"}"#).unwrap();
        assert_eq!(message.session_id, None);
    }

    fn usage(model: &str, input_tokens: u64, output_tokens: u64, cost_usd: f64) -> Usage {
        Usage {
            model: model.to_owned(),
            input_tokens,
            output_tokens,
            cost_usd,
            estimated: false,
        }
    }

    #[test]
    fn usage_beyond_what_was_sent_and_received_is_held_to_the_ceiling() {
        let prompt = Prompt {
            chars: 100,
            bytes: 120,
            turns: 3,
        };
        let ceiling = UsageCeiling::new(prompt, 200, 1024);
        assert_eq!(
            ceiling,
            UsageCeiling {
                input_tokens: 120 + 3 * 16 + 512,
                output_tokens: 1024 + 16,
            }
        );
        let cost = CostConfig::default();
        // Plausible usage passes untouched.
        assert_eq!(
            ceiling.clamp(&usage("claude-sonnet-4-5", 600, 1000, 0.0168), &cost),
            None
        );
        // 10^18 tokens of a priced model: held to the ceiling and priced again.
        let clamped = ceiling
            .clamp(
                &usage("claude-sonnet-4-5", 1e18 as u64, 1e18 as u64, 9e13),
                &cost,
            )
            .unwrap();
        assert_eq!((clamped.input_tokens, clamped.output_tokens), (680, 1040));
        assert!((clamped.cost_usd - (680.0 * 3.0 + 1040.0 * 15.0) / 1e6).abs() < 1e-12);
        // An agent pricing its own model: its figure shrinks with the tokens.
        let clamped = ceiling
            .clamp(&usage("own-model", 6800, 0, 10.0), &cost)
            .unwrap();
        assert_eq!(clamped.input_tokens, 680);
        assert!((clamped.cost_usd - 1.0).abs() < 1e-12);
        // A reply longer than max_tokens (an agent that ignores it) may cost its bytes.
        let long = UsageCeiling::new(prompt, 5000, 1024);
        assert_eq!(long.output_tokens, 5016);
    }

    #[test]
    fn a_cut_stream_is_charged_at_least_the_text_it_delivered() {
        let prompt = Prompt {
            chars: 400,
            bytes: 400,
            turns: 2,
        };
        // Anthropic says 1 output token at the start; 40 characters went out.
        let progress = StreamProgress {
            input_tokens: Some(50),
            output_tokens: Some(1),
            sent_chars: 40,
            ..StreamProgress::default()
        };
        assert_eq!(partial_tokens(&progress, prompt), (50, 10, true));
        // A report ahead of the text is kept as reported.
        let progress = StreamProgress {
            output_tokens: Some(30),
            ..progress
        };
        assert_eq!(partial_tokens(&progress, prompt), (50, 30, false));
        // Nothing reported: both estimated, the prompt (system prompt included) by its size.
        let progress = StreamProgress {
            sent_chars: 8,
            ..StreamProgress::default()
        };
        assert_eq!(partial_tokens(&progress, prompt), (100, 2, true));
    }

    #[test]
    fn arrays_in_field_order_are_refused() {
        // Found by fuzzing: serde's derive accepted `[session_id, content]`.
        for text in [r#"["",""]"#, r#"[null,"hi"]"#, r#"["hi"]"#] {
            let error = parse_message(text).unwrap_err().to_string();
            assert!(
                error.contains("an object with `content`"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn unknown_duplicate_and_missing_fields_are_refused() {
        let unknown = parse_message(r#"{"content":"x","role":"system"}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `role`"),
            "{unknown}"
        );
        let duplicate = parse_message(r#"{"content":"x","content":"y"}"#).unwrap_err();
        assert!(
            duplicate.to_string().contains("duplicate field `content`"),
            "{duplicate}"
        );
        let missing = parse_message(r#"{"session_id":"abc"}"#).unwrap_err();
        assert!(
            missing.to_string().contains("missing field `content`"),
            "{missing}"
        );
        assert!(parse_message(r#"{"content":7}"#).is_err());
    }
}
