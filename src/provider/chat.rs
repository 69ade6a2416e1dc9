//! What both wire formats share: the chat turns sent up, and what a reply or a streamed
//! event says once a wire has read it.

use std::iter;

use serde::{Serialize, Serializer};
use serde_json::{Value, json};

use crate::{
    agent::Turn,
    openai_api::{ChatMessage, ChatRole, FinishReason},
};

/// What one call asks: the model and its settings, and the conversation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub(crate) model: &'a str,
    pub(crate) max_tokens: u32,
    /// The configured system prompt, for a conversation that brings none of its own.
    pub(crate) system: Option<&'a str>,
    pub(crate) messages: Messages<'a>,
    pub(crate) sampling: Sampling<'a>,
    pub(crate) stream: bool,
}

/// The conversation sent up.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Messages<'a> {
    /// A blufio session: its earlier turns, then the new user message.
    Session {
        history: &'a [Turn],
        message: &'a str,
    },
    /// A `/v1/chat/completions` client's whole conversation, its system messages included.
    Chat(&'a [ChatMessage]),
}

/// The sampling settings a `/v1/chat/completions` client may give; all unset for a session.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sampling<'a> {
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) stop: &'a [String],
    pub(crate) user: Option<&'a str>,
}

impl Messages<'_> {
    /// Returns every text sent up, for estimates.
    pub(crate) fn chars(&self) -> usize {
        match self {
            Messages::Session { history, message } => {
                history
                    .iter()
                    .map(|turn| turn.content.chars().count())
                    .sum::<usize>()
                    + message.chars().count()
            }
            Messages::Chat(messages) => messages
                .iter()
                .flat_map(|message| &message.parts)
                .map(|part| part.chars().count())
                .sum(),
        }
    }

    /// Returns whether the conversation carries its own system (or developer) message.
    pub(crate) fn has_system(&self) -> bool {
        match self {
            Messages::Session { .. } => false,
            Messages::Chat(messages) => messages.iter().any(|message| is_system(message.role)),
        }
    }
}

/// Whether a chat role is an instruction to the model rather than a turn of the dialogue.
pub(crate) fn is_system(role: ChatRole) -> bool {
    matches!(role, ChatRole::System | ChatRole::Developer)
}

/// One `{role, content}` message as both APIs take it, written without a JSON tree.
#[derive(Debug, Serialize)]
pub(crate) struct WireMessage<'a> {
    pub(crate) role: &'a str,
    pub(crate) content: Content<'a>,
}

/// A message's content: a string, or text blocks, as [`content`] builds it.
#[derive(Debug)]
pub(crate) enum Content<'a> {
    Text(&'a str),
    Blocks(&'a [String]),
}

impl<'a> Content<'a> {
    /// A chat message's content as sent: a string for one part, text blocks for several.
    pub(crate) fn of(message: &'a ChatMessage) -> Content<'a> {
        match message.parts.as_slice() {
            [one] => Content::Text(one),
            parts => Content::Blocks(parts),
        }
    }
}

impl Serialize for Content<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct TextBlock<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            text: &'a str,
        }
        match self {
            Content::Text(text) => serializer.serialize_str(text),
            Content::Blocks(parts) => {
                serializer.collect_seq(parts.iter().map(|text| TextBlock { kind: "text", text }))
            }
        }
    }
}

/// Returns a chat message's content as sent: a string for one part, text blocks (the form
/// both APIs take) for several.
pub(crate) fn content(message: &ChatMessage) -> Value {
    match message.parts.as_slice() {
        [one] => json!(one),
        parts => Value::Array(
            parts
                .iter()
                .map(|text| json!({ "type": "text", "text": text }))
                .collect(),
        ),
    }
}

/// Returns a session's history (oldest first) then the new message as `{role, content}`
/// objects, the form both APIs take.
pub(crate) fn session_messages<'a>(
    history: &'a [Turn],
    message: &'a str,
) -> impl Iterator<Item = Value> {
    history
        .iter()
        .map(|turn| json!({ "role": turn.role.as_str(), "content": turn.content }))
        .chain(iter::once(json!({ "role": "user", "content": message })))
}

/// Adds the sampling settings both APIs name alike, and the stop sequences under `stop_key`.
pub(crate) fn add_sampling(body: &mut Value, sampling: &Sampling<'_>, stop_key: &str) {
    let Value::Object(map) = body else { return };
    if let Some(temperature) = sampling.temperature {
        map.insert("temperature".into(), json!(temperature));
    }
    if let Some(top_p) = sampling.top_p {
        map.insert("top_p".into(), json!(top_p));
    }
    if !sampling.stop.is_empty() {
        map.insert(stop_key.into(), json!(sampling.stop));
    }
}

/// Returns `{model, max_tokens, messages}`, the fields both APIs' requests start from.
pub(crate) fn body(request: &Request<'_>, messages: Vec<Value>) -> Value {
    json!({ "model": request.model, "max_tokens": request.max_tokens, "messages": messages })
}

/// A reply as a provider's wire format reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) content: String,
    pub(crate) model: Option<String>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    /// Why the model stopped, when the upstream said.
    pub(crate) finish: Option<FinishReason>,
}

/// One thing a streamed event says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamItem {
    Delta(String),
    Usage {
        model: Option<String>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    },
    Finish(FinishReason),
    Done,
    Failed(String),
    Nothing,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::Role;

    /// A user turn and the assistant's answer, for the wires' request tests.
    pub(crate) fn two_turns() -> [Turn; 2] {
        [
            Turn {
                role: Role::User,
                content: "hi".into(),
            },
            Turn {
                role: Role::Assistant,
                content: "hello".into(),
            },
        ]
    }

    /// A chat message of `parts`.
    pub(crate) fn chat_message(role: ChatRole, parts: &[&str]) -> ChatMessage {
        ChatMessage {
            role,
            parts: parts.iter().map(|part| (*part).to_owned()).collect(),
        }
    }

    /// A request, in the order the wires' request tests give it.
    pub(crate) fn request<'a>(
        model: &'a str,
        max_tokens: u32,
        system: Option<&'a str>,
        history: &'a [Turn],
        message: &'a str,
        stream: bool,
    ) -> Request<'a> {
        Request {
            model,
            max_tokens,
            system,
            messages: Messages::Session { history, message },
            sampling: Sampling::default(),
            stream,
        }
    }
}
