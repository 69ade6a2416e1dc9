//! The message clients send, over HTTP or in a WebSocket text frame, and its strict parser.

use std::fmt;

use serde::Deserialize;

/// A message as clients send it over HTTP or in a WebSocket text frame: a JSON object with a
/// string `content`, an optional `session_id`, an optional boolean `stream`, an optional
/// non-empty string `model` and no other field.
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
    /// The model alias for this message only; `None`: the session's, else the default.
    pub model: Option<String>,
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
        f.write_str("an object with `content` and optional `session_id`, `stream` and `model`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;

        const FIELDS: &[&str] = &["session_id", "content", "stream", "model"];
        let mut session_id: Option<Option<String>> = None;
        let mut content: Option<String> = None;
        let mut stream: Option<bool> = None;
        let mut model: Option<Option<String>> = None;
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
                "model" if model.is_some() => return Err(A::Error::duplicate_field("model")),
                "model" => model = Some(non_empty(map.next_value()?, "a model alias")?),
                other => return Err(A::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(IncomingMessage {
            session_id: session_id.flatten(),
            content: content.ok_or_else(|| A::Error::missing_field("content"))?,
            stream: stream.unwrap_or(false),
            model: model.flatten(),
        })
    }
}

/// Refuses `""` for an optional name (`expected` says what it names): an empty model or
/// system prompt is a client's mistake, not a request for the default.
pub(crate) fn non_empty<E: serde::de::Error>(
    value: Option<String>,
    expected: &'static str,
) -> Result<Option<String>, E> {
    match value {
        Some(text) if text.is_empty() => {
            Err(E::invalid_value(serde::de::Unexpected::Str(""), &expected))
        }
        other => Ok(other),
    }
}

/// Decodes a message as sent in an HTTP body or a WebSocket text frame.
///
/// Pure, so it can be fuzzed (`fuzz/fuzz_targets/message.rs`).
///
/// # Errors
///
/// Returns the JSON error when `text` is not an object with a string `content`, an optional
/// string `session_id`, an optional boolean `stream`, an optional non-empty string `model`
/// and no other field.
pub fn parse_message(text: &str) -> Result<IncomingMessage, serde_json::Error> {
    serde_json::from_str(text)
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

    #[test]
    fn a_message_may_name_a_model_but_not_an_empty_one() {
        let message = parse_message(r#"{"content":"hi","model":"llama"}"#).unwrap();
        assert_eq!(message.model.as_deref(), Some("llama"));
        let message = parse_message(r#"{"content":"hi","model":null}"#).unwrap();
        assert_eq!(message.model, None);
        let empty = parse_message(r#"{"content":"hi","model":""}"#).unwrap_err();
        assert!(
            empty.to_string().contains("expected a model alias"),
            "{empty}"
        );
        for bad in [
            r#"{"content":"hi","model":7}"#,
            r#"{"content":"hi","model":["llama"]}"#,
            r#"{"content":"hi","model":"a","model":"b"}"#,
        ] {
            assert!(parse_message(bad).is_err(), "{bad}");
        }
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
