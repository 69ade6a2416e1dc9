//! What both wire formats share: the chat turns sent up, and what a reply or a streamed
//! event says once a wire has read it.

use std::iter;

use serde_json::{Value, json};

use crate::agent::Turn;

/// What one call asks: the model and its settings, the earlier turns and the new message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub(crate) model: &'a str,
    pub(crate) max_tokens: u32,
    pub(crate) system: Option<&'a str>,
    pub(crate) history: &'a [Turn],
    pub(crate) message: &'a str,
    pub(crate) stream: bool,
}

/// Returns the history (oldest first) then the new message as `{role, content}` objects,
/// the form both APIs take.
pub(crate) fn messages<'a>(history: &'a [Turn], message: &'a str) -> impl Iterator<Item = Value> {
    history
        .iter()
        .map(|turn| json!({ "role": turn.role.as_str(), "content": turn.content }))
        .chain(iter::once(json!({ "role": "user", "content": message })))
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
            history,
            message,
            stream,
        }
    }
}
