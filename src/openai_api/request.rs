//! The `POST /v1/chat/completions` request body: a strict, bounded parser into a typed
//! [`ChatRequest`].
//!
//! The visitors are written by hand rather than derived for three reasons: serde's derive
//! also accepts a JSON array in field order (a second wire format, see `gateway/message.rs`);
//! a refusal must name the exact parameter (`messages.[3].content.[0].type`, OpenAI's own
//! spelling), which serde's errors do not carry; and the limits (messages, content parts,
//! `stop` entries) must stop the parse when they are crossed, not after a 10,000-element
//! `Vec` has been built. Values of parameters blufio refuses are never walked: the first
//! token that is not `null` ends the parse.
//!
//! What is accepted and why:
//! - honoured: `model`, `messages`, `stream`, `stream_options.include_usage`, `max_tokens`,
//!   `max_completion_tokens`, `temperature`, `top_p`, `stop`, `user`;
//! - accepted and ignored, because they change nothing in a text answer: `metadata`, `seed`
//!   (no upstream promises determinism), `store`, `logprobs: false`, `top_logprobs: 0`,
//!   `parallel_tool_calls` (no tools can be given), `n: 1`, `service_tier`,
//!   `prompt_cache_key`, `safety_identifier`, `response_format: {"type": "text"}`,
//!   `modalities: ["text"]`, `logit_bias: {}`, and `frequency_penalty` / `presence_penalty`
//!   at 0, their default: many clients (LangChain among them) always send the zeros, but any
//!   other value would change the answer, and Anthropic has no such parameter, so it is
//!   refused rather than honoured by one provider and dropped by another;
//! - refused, naming the parameter: `tools`, `tool_choice`, `functions`, `function_call`,
//!   `audio`, `prediction`, `web_search_options`, `reasoning_effort`, `verbosity`, image,
//!   audio and file parts, `n` > 1, `logprobs: true`, other response formats and modalities;
//! - `null` is the same as an absent field, as in OpenAI's API;
//! - anything else is an unknown parameter, as OpenAI's own server answers.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::{
    chat::ChatMessage,
    error::ApiError,
    message::MessagesSeed,
    params::{
        MetadataSeed, ModalitiesSeed, NullOnly, NullOrEmptyMap, Nullable, ResponseFormatSeed,
        StopSeed, StreamOptionsSeed,
    },
    state::{State, next_key, once},
};

/// A valid `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model alias asked for.
    pub model: String,
    /// The conversation, oldest first; never empty.
    pub messages: Vec<ChatMessage>,
    /// Stream the answer as `chat.completion.chunk` events.
    pub stream: bool,
    /// Send a last chunk with the token usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The most tokens to generate (`max_completion_tokens`, or the older `max_tokens`).
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling, 0 to 1.
    pub top_p: Option<f64>,
    /// Sequences that end the answer, at most [`MAX_STOP`].
    pub stop: Vec<String>,
    /// The end user's id, passed on to upstreams that take one.
    pub user: Option<String>,
}

/// Parses a request body. Pure and total: any input, truncated or garbage, gives a request or
/// an [`ApiError`] (status 400) naming the parameter at fault, never a panic (fuzzed as such).
///
/// # Errors
///
/// Returns a 400 [`ApiError`] when the body is not JSON, breaks a limit, names an unknown
/// parameter or one blufio cannot honour, or has a value of the wrong type or range.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let state = State::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = RequestSeed(&state)
        .deserialize(&mut deserializer)
        .and_then(|raw| deserializer.end().map(|()| raw));
    match parsed {
        Ok(raw) => raw.finish(),
        Err(error) => Err(state.into_error(&error)),
    }
}

/// How the parser treats each top-level field of OpenAI's request body. A closed set, so the
/// compiler lists every place a new parameter must be handled.
#[derive(Clone, Copy)]
enum Field {
    Model,
    Messages,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    Temperature,
    TopP,
    Stop,
    User,
    /// A string that changes nothing blufio sends (`service_tier`, cache and safety keys).
    IgnoredString,
    Metadata,
    Seed,
    /// A boolean that changes nothing for a text answer (`store`, `parallel_tool_calls`).
    IgnoredBool,
    Logprobs,
    TopLogprobs,
    N,
    /// `frequency_penalty` and `presence_penalty`: accepted at 0 only.
    Penalty,
    LogitBias,
    ResponseFormat,
    Modalities,
    /// A parameter blufio cannot honour: accepted only as `null`.
    Refused,
}

/// Every top-level field of OpenAI's request body, so a parameter can be told apart from a
/// typo; fields of other APIs (Anthropic's `system`, say) fall through to "unknown".
const FIELDS: &[(&str, Field)] = &[
    ("model", Field::Model),
    ("messages", Field::Messages),
    ("stream", Field::Stream),
    ("stream_options", Field::StreamOptions),
    ("max_tokens", Field::MaxTokens),
    ("max_completion_tokens", Field::MaxCompletionTokens),
    ("temperature", Field::Temperature),
    ("top_p", Field::TopP),
    ("stop", Field::Stop),
    ("user", Field::User),
    ("service_tier", Field::IgnoredString),
    ("prompt_cache_key", Field::IgnoredString),
    ("safety_identifier", Field::IgnoredString),
    ("metadata", Field::Metadata),
    ("seed", Field::Seed),
    ("store", Field::IgnoredBool),
    ("parallel_tool_calls", Field::IgnoredBool),
    ("logprobs", Field::Logprobs),
    ("top_logprobs", Field::TopLogprobs),
    ("n", Field::N),
    ("frequency_penalty", Field::Penalty),
    ("presence_penalty", Field::Penalty),
    ("logit_bias", Field::LogitBias),
    ("response_format", Field::ResponseFormat),
    ("modalities", Field::Modalities),
    ("tools", Field::Refused),
    ("tool_choice", Field::Refused),
    ("functions", Field::Refused),
    ("function_call", Field::Refused),
    ("audio", Field::Refused),
    ("prediction", Field::Refused),
    ("web_search_options", Field::Refused),
    ("reasoning_effort", Field::Refused),
    ("verbosity", Field::Refused),
];

/// The top-level fields before the checks that involve more than one of them.
#[derive(Default)]
struct Raw {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Vec<String>,
    user: Option<String>,
}

impl Raw {
    fn finish(self) -> Result<ChatRequest, ApiError> {
        let model = match self.model {
            Some(model) if !model.is_empty() => model,
            Some(_) => return Err(ApiError::invalid_value("model", "`model` is empty")),
            None => return Err(ApiError::invalid_request("model", "`model` is required")),
        };
        let messages = match self.messages {
            Some(messages) if !messages.is_empty() => messages,
            Some(_) => return Err(ApiError::invalid_value("messages", "`messages` is empty")),
            None => {
                return Err(ApiError::invalid_request(
                    "messages",
                    "`messages` is required",
                ));
            }
        };
        let stream = self.stream.unwrap_or(false);
        if self.include_usage.is_some() && !stream {
            return Err(ApiError::invalid_value(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(old), Some(new)) if old != new => {
                return Err(ApiError::invalid_value(
                    "max_tokens",
                    "`max_tokens` and `max_completion_tokens` differ; give one",
                ));
            }
            (old, new) => new.or(old),
        };
        if max_tokens == Some(0) {
            let param = if self.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid_value(
                param,
                format!("`{param}` must be at least 1"),
            ));
        }
        in_range("temperature", self.temperature, 2.0)?;
        in_range("top_p", self.top_p, 1.0)?;
        Ok(ChatRequest {
            model,
            messages,
            stream,
            include_usage: self.include_usage.unwrap_or(false),
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop,
            user: self.user,
        })
    }
}

fn in_range(param: &str, value: Option<f64>, max: f64) -> Result<(), ApiError> {
    match value {
        Some(value) if !(0.0..=max).contains(&value) => Err(ApiError::invalid_value(
            param,
            format!("`{param}` must be between 0 and {max}, got {value}"),
        )),
        _ => Ok(()),
    }
}

struct RequestSeed<'s>(&'s State);

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = Raw;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let state = self.0;
        let mut raw = Raw::default();
        let mut seen = Vec::new();
        while let Some(key) = next_key(&mut map)? {
            let Some(&(name, field)) = FIELDS.iter().find(|(name, _)| *name == key) else {
                return Err(state.refuse(ApiError::unknown_parameter(&key)));
            };
            once(state, &mut seen, name, || name.to_owned())?;
            let at = || name.to_owned();
            match field {
                Field::Model => raw.model = state.at(at, map.next_value())?,
                Field::Messages => {
                    raw.messages =
                        state.at(at, map.next_value_seed(Nullable(MessagesSeed(state))))?
                }
                Field::Stream => raw.stream = state.at(at, map.next_value())?,
                Field::StreamOptions => {
                    raw.include_usage = state
                        .at(at, map.next_value_seed(Nullable(StreamOptionsSeed(state))))?
                        .flatten();
                }
                Field::MaxTokens => raw.max_tokens = state.at(at, map.next_value())?,
                Field::MaxCompletionTokens => {
                    raw.max_completion_tokens = state.at(at, map.next_value())?
                }
                Field::Temperature => raw.temperature = state.at(at, map.next_value())?,
                Field::TopP => raw.top_p = state.at(at, map.next_value())?,
                Field::Stop => {
                    raw.stop = state
                        .at(at, map.next_value_seed(Nullable(StopSeed(state))))?
                        .unwrap_or_default()
                }
                Field::User => raw.user = state.at(at, map.next_value())?,
                Field::IgnoredString => {
                    state.at(at, map.next_value::<Option<String>>())?;
                }
                Field::Metadata => {
                    state.at(at, map.next_value_seed(Nullable(MetadataSeed(state))))?;
                }
                Field::Seed => {
                    state.at(at, map.next_value::<Option<i64>>())?;
                }
                Field::IgnoredBool => {
                    state.at(at, map.next_value::<Option<bool>>())?;
                }
                Field::Logprobs => {
                    if state.at(at, map.next_value::<Option<bool>>())? == Some(true) {
                        return Err(state
                            .refuse(ApiError::unsupported(name, "`logprobs` is not supported")));
                    }
                }
                Field::TopLogprobs => {
                    if state
                        .at(at, map.next_value::<Option<u32>>())?
                        .is_some_and(|n| n > 0)
                    {
                        return Err(state.refuse(ApiError::unsupported(
                            name,
                            "`top_logprobs` is not supported",
                        )));
                    }
                }
                Field::N => match state.at(at, map.next_value::<Option<u32>>())? {
                    Some(0) => {
                        return Err(
                            state.refuse(ApiError::invalid_value(name, "`n` must be at least 1"))
                        );
                    }
                    Some(2..) => {
                        return Err(state.refuse(ApiError::unsupported(
                            name,
                            "`n` greater than 1 is not supported: one choice per request",
                        )));
                    }
                    _ => {}
                },
                Field::Penalty => {
                    if state
                        .at(at, map.next_value::<Option<f64>>())?
                        .is_some_and(|value| value != 0.0)
                    {
                        return Err(state.refuse(ApiError::unsupported(
                            name,
                            format!("`{name}` other than 0 is not supported"),
                        )));
                    }
                }
                Field::LogitBias => {
                    state.at(at, map.next_value_seed(NullOrEmptyMap(state, name)))?;
                }
                Field::ResponseFormat => {
                    state.at(at, map.next_value_seed(Nullable(ResponseFormatSeed(state))))?;
                }
                Field::Modalities => {
                    state.at(at, map.next_value_seed(Nullable(ModalitiesSeed(state))))?;
                }
                Field::Refused => state.at(at, map.next_value_seed(NullOnly(state, name)))?,
            }
        }
        Ok(raw)
    }
}
