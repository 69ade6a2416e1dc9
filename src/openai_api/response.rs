//! Encoding answers in OpenAI's shapes: a `chat.completion` object, the
//! `chat.completion.chunk` events of a stream (each a whole SSE `data:` line), and the
//! `/v1/models` list.
//!
//! A stream is, as OpenAI sends it: a first chunk with the role and empty content, one chunk
//! per content delta, a chunk with an empty delta and the `finish_reason`, then, when the
//! client asked for `stream_options.include_usage`, a chunk with empty `choices` and the
//! `usage` (every earlier chunk then carries `"usage": null`), and `data: [DONE]`.

use serde::Serialize;

/// The last event of every stream.
pub const DONE: &str = "data: [DONE]\n\n";

/// An SSE comment, sent while the upstream is silent so proxies and clients do not time the
/// stream out; OpenAI's SDKs skip comments.
pub const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// Why the model stopped, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The token limit.
    Length,
    /// The model refused (Anthropic's `refusal`).
    ContentFilter,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
        }
    }

    /// Maps an Anthropic `stop_reason`. Reasons that cannot occur without tools or server
    /// tools (`tool_use`, `pause_turn`) and unknown ones count as a natural end: the text the
    /// client got is all there is, and `stop` is what an SDK treats as complete.
    pub fn from_anthropic(stop_reason: &str) -> Self {
        match stop_reason {
            "max_tokens" | "model_context_window_exceeded" => Self::Length,
            "refusal" => Self::ContentFilter,
            _ => Self::Stop,
        }
    }

    /// Reads an OpenAI-compatible upstream's `finish_reason`. `tool_calls` and
    /// `function_call` cannot occur with no tools given; they and unknown reasons count as a
    /// natural end, as in [`FinishReason::from_anthropic`].
    pub fn from_openai(finish_reason: &str) -> Self {
        match finish_reason {
            "length" => Self::Length,
            "content_filter" => Self::ContentFilter,
            _ => Self::Stop,
        }
    }
}

/// Tokens of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// Tokens sent to the model.
    pub prompt_tokens: u64,
    /// Tokens the model produced.
    pub completion_tokens: u64,
}

#[derive(Serialize)]
struct UsageBody {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<TokenUsage> for UsageBody {
    fn from(usage: TokenUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
        }
    }
}

/// An id in OpenAI's form, `chatcmpl-` and 32 hex digits, from random bits the caller draws
/// (the module has no randomness of its own).
pub fn completion_id(bits: u128) -> String {
    format!("chatcmpl-{bits:032x}")
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: UsageBody,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

/// Serialises a value made only of strings, integers and options: that cannot fail, but the
/// request path keeps no panic, so a failure would give an empty object.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

/// A whole `chat.completion` object; `model` is the alias the client asked for.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    content: &str,
    finish_reason: FinishReason,
    usage: TokenUsage,
) -> String {
    to_json(&Completion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content,
            },
            logprobs: None,
            finish_reason: finish_reason.as_str(),
        }],
        usage: usage.into(),
    })
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// Present (as `null` until the last chunk) only when the client asked for usage.
    #[serde(skip_serializing_if = "Absent::is_absent")]
    usage: Absent<UsageBody>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// A field that is left out, `null`, or a value.
enum Absent<T> {
    Omitted,
    Null,
    Value(T),
}

impl<T> Absent<T> {
    fn is_absent(&self) -> bool {
        matches!(self, Self::Omitted)
    }
}

impl<T: Serialize> Serialize for Absent<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Omitted | Self::Null => serializer.serialize_none(),
            Self::Value(value) => serializer.serialize_some(value),
        }
    }
}

/// Encodes the events of one streamed answer; each method returns one whole SSE event
/// (`data: {...}\n\n`).
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkEncoder {
    /// An encoder for one stream; `model` is the alias the client asked for.
    pub fn new(id: String, created: u64, model: String, include_usage: bool) -> Self {
        Self {
            id,
            created,
            model,
            include_usage,
        }
    }

    fn event(&self, choices: &[ChunkChoice<'_>], usage: Option<TokenUsage>) -> String {
        let usage = match (self.include_usage, usage) {
            (false, _) => Absent::Omitted,
            (true, None) => Absent::Null,
            (true, Some(usage)) => Absent::Value(usage.into()),
        };
        let json = to_json(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        });
        format!("data: {json}\n\n")
    }

    fn choice(delta: Delta<'_>, finish_reason: Option<FinishReason>) -> [ChunkChoice<'_>; 1] {
        [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish_reason.map(FinishReason::as_str),
        }]
    }

    /// The first event: the role, with empty content.
    pub fn start(&self) -> String {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        self.event(&Self::choice(delta, None), None)
    }

    /// One piece of the answer's text.
    pub fn delta(&self, text: &str) -> String {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.event(&Self::choice(delta, None), None)
    }

    /// The events that end the stream: the finish reason, the usage when asked for, and
    /// `[DONE]`, concatenated.
    pub fn finish(&self, finish_reason: FinishReason, usage: TokenUsage) -> String {
        let mut end = self.event(&Self::choice(Delta::default(), Some(finish_reason)), None);
        if self.include_usage {
            end.push_str(&self.event(&[], Some(usage)));
        }
        end.push_str(DONE);
        end
    }
}

/// One entry of the `/v1/models` list.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModelEntry<'a> {
    /// The alias clients ask for.
    pub id: &'a str,
    /// When the model was configured, in Unix seconds.
    pub created: u64,
    /// The provider's name.
    pub owned_by: &'a str,
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

/// The `/v1/models/{id}` body: one model object.
pub fn model_object(entry: ModelEntry<'_>) -> String {
    to_json(&ModelObject {
        id: entry.id,
        object: "model",
        created: entry.created,
        owned_by: entry.owned_by,
    })
}

/// The `/v1/models` body: `{"object": "list", "data": [...]}`.
pub fn models_list<'a>(entries: impl IntoIterator<Item = ModelEntry<'a>>) -> String {
    let data = entries
        .into_iter()
        .map(|entry| ModelObject {
            id: entry.id,
            object: "model",
            created: entry.created,
            owned_by: entry.owned_by,
        })
        .collect();
    to_json(&ModelList {
        object: "list",
        data,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{
        ChunkEncoder, DONE, FinishReason, ModelEntry, TokenUsage, completion, completion_id,
        models_list,
    };

    /// The JSON of each `data:` event of a stream, `[DONE]` as a string.
    fn events(stream: &str) -> Vec<Value> {
        assert!(stream.ends_with("\n\n"), "{stream:?}");
        stream
            .split_terminator("\n\n")
            .map(|event| {
                let data = event.strip_prefix("data: ").expect(event);
                serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
            })
            .collect()
    }

    fn stream(include_usage: bool) -> String {
        let encoder = ChunkEncoder::new(
            "chatcmpl-1".into(),
            1_700_000_000,
            "sonnet".into(),
            include_usage,
        );
        let usage = TokenUsage {
            prompt_tokens: 9,
            completion_tokens: 2,
        };
        [
            encoder.start(),
            encoder.delta("Hel"),
            encoder.delta("lo"),
            encoder.finish(FinishReason::Stop, usage),
        ]
        .concat()
    }

    #[test]
    fn anthropic_stop_reasons_map_to_openai_finish_reasons() {
        for (anthropic, openai) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("refusal", "content_filter"),
            ("something_new", "stop"),
        ] {
            assert_eq!(
                FinishReason::from_anthropic(anthropic).as_str(),
                openai,
                "{anthropic}"
            );
        }
    }

    #[test]
    fn openai_finish_reasons_pass_through() {
        for reason in ["stop", "length", "content_filter"] {
            assert_eq!(FinishReason::from_openai(reason).as_str(), reason);
        }
        assert_eq!(FinishReason::from_openai("tool_calls"), FinishReason::Stop);
    }

    #[test]
    fn a_completion_has_openai_shape_with_the_alias_and_total_tokens() {
        let body = completion(
            &completion_id(0xab),
            1_700_000_000,
            "sonnet",
            "Hi \"there\"",
            FinishReason::Length,
            TokenUsage {
                prompt_tokens: 10,
                completion_tokens: 5,
            },
        );
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({
                "id": "chatcmpl-000000000000000000000000000000ab",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "sonnet",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi \"there\""},
                    "logprobs": null,
                    "finish_reason": "length"
                }],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            })
        );
    }

    #[test]
    fn a_short_stream_without_usage_is_role_deltas_finish_done() {
        let events = events(&stream(false));
        let chunk = |delta: Value, finish_reason: Value| {
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "sonnet", "choices": [
                {"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}
            ]})
        };
        assert_eq!(
            events,
            [
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
                json!("[DONE]"),
            ]
        );
    }

    #[test]
    fn with_include_usage_every_chunk_has_null_usage_and_a_usage_chunk_comes_last() {
        let events = events(&stream(true));
        assert_eq!(events.len(), 6);
        for chunk in &events[..4] {
            assert_eq!(chunk["usage"], Value::Null, "{chunk}");
            assert!(chunk.as_object().unwrap().contains_key("usage"), "{chunk}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
        assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[4]["choices"], json!([]));
        assert_eq!(
            events[4]["usage"],
            json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
        );
        assert_eq!(events[5], "[DONE]");
    }

    #[test]
    fn without_include_usage_no_chunk_has_a_usage_key() {
        for chunk in &events(&stream(false))[..4] {
            assert!(!chunk.as_object().unwrap().contains_key("usage"), "{chunk}");
        }
    }

    #[test]
    fn a_delta_with_newlines_stays_one_sse_event() {
        let encoder = ChunkEncoder::new("chatcmpl-1".into(), 1, "m".into(), false);
        let event = encoder.delta("a\n\nb\r\n");
        assert_eq!(event.matches("\n\n").count(), 1);
        assert_eq!(
            events(&event)[0]["choices"][0]["delta"]["content"],
            "a\n\nb\r\n"
        );
        assert!(
            encoder
                .finish(FinishReason::Stop, TokenUsage::default())
                .ends_with(DONE)
        );
    }

    #[test]
    fn total_tokens_saturate_instead_of_overflowing() {
        let body = completion(
            "c",
            0,
            "m",
            "",
            FinishReason::Stop,
            TokenUsage {
                prompt_tokens: u64::MAX,
                completion_tokens: 1,
            },
        );
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["usage"]["total_tokens"],
            u64::MAX
        );
    }

    #[test]
    fn the_models_list_is_an_openai_list_of_model_objects() {
        let body = models_list([
            ModelEntry {
                id: "sonnet",
                created: 5,
                owned_by: "claude",
            },
            ModelEntry {
                id: "llama",
                created: 5,
                owned_by: "pi",
            },
        ]);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"object": "list", "data": [
                {"id": "sonnet", "object": "model", "created": 5, "owned_by": "claude"},
                {"id": "llama", "object": "model", "created": 5, "owned_by": "pi"}
            ]})
        );
        assert_eq!(models_list([]), r#"{"object":"list","data":[]}"#);
    }
}
