//! The messages of a chat request and the bounds a request is parsed within: what the
//! parser's pieces (`request.rs`, `message.rs`, `params.rs`) share, below all of them.

use std::borrow::Cow;

/// At most this many messages in one request: far beyond a real conversation, far below what
/// a hostile body of the maximum size could otherwise make the parser allocate entries for.
pub const MAX_MESSAGES: usize = 2048;
/// At most this many content parts in one message.
pub const MAX_CONTENT_PARTS: usize = 64;
/// At most this many `stop` sequences, OpenAI's own limit.
pub const MAX_STOP: usize = 4;
/// At most this many `metadata` entries, OpenAI's own limit.
pub const MAX_METADATA: usize = 16;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    /// Instructions for the model.
    System,
    /// Instructions for the model, the newer name OpenAI gives them for reasoning models;
    /// to blufio the same as `system`.
    Developer,
    /// The person.
    User,
    /// The model, in an earlier turn.
    Assistant,
}

impl ChatRole {
    pub(super) fn parse(name: &str) -> Option<Self> {
        match name {
            "system" => Some(Self::System),
            "developer" => Some(Self::Developer),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }
}

/// One message of the conversation the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: ChatRole,
    /// The text: one entry for a string `content`, one per part for an array of text parts.
    /// Kept apart so an upstream that takes parts (Anthropic's text blocks) gets them as sent.
    pub parts: Vec<String>,
}

impl ChatMessage {
    /// The whole text, parts joined by a newline so words at part boundaries stay apart.
    pub fn text(&self) -> Cow<'_, str> {
        match self.parts.as_slice() {
            [one] => Cow::Borrowed(one),
            parts => Cow::Owned(parts.join("\n")),
        }
    }
}
