//! One entry of `messages` in a chat completions request: its role and its text, given as a
//! string or as an array of `{"type": "text", "text": ...}` parts.
//!
//! Tool and function messages, tool calls, audio and every non-text part are refused with
//! the parameter's path (`messages.[2].content.[0].type`), since answering as if they had not
//! been sent would mislead the client.

use std::{borrow::Cow, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    chat::{ChatMessage, ChatRole, MAX_CONTENT_PARTS, MAX_MESSAGES},
    error::ApiError,
    state::{State, next_key, once},
};

/// Reads message number `index`.
struct MessageSeed<'s> {
    state: &'s State,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ChatMessage;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<ChatMessage, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ChatMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object with `role` and `content`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatMessage, A::Error> {
        let Self { state, index } = self;
        let path = |name: &str| format!("messages.[{index}].{name}");
        let mut role = None;
        let mut parts = None;
        let mut seen = Vec::new();
        while let Some(key) = next_key(&mut map)? {
            match &*key {
                "role" => {
                    once(state, &mut seen, "role", || path("role"))?;
                    let name: Cow<'de, str> = state.at(|| path("role"), map.next_value())?;
                    let Some(parsed) = ChatRole::parse(&name) else {
                        let message = format!(
                            "role `{name}` is not supported; \
                             use `system`, `developer`, `user` or `assistant`"
                        );
                        return Err(state.refuse(ApiError::unsupported(path("role"), message)));
                    };
                    role = Some(parsed);
                }
                "content" => {
                    once(state, &mut seen, "content", || path("content"))?;
                    parts = Some(state.at(
                        || path("content"),
                        map.next_value_seed(ContentSeed { state, index }),
                    )?);
                }
                // A participant's name and an earlier refusal's text change nothing blufio
                // sends upstream; both are plain strings.
                "name" | "refusal" => {
                    let name = if key == "name" { "name" } else { "refusal" };
                    once(state, &mut seen, name, || path(name))?;
                    state.at(|| path(name), map.next_value::<Option<Cow<'de, str>>>())?;
                }
                "tool_calls" | "function_call" | "tool_call_id" | "audio" => {
                    let name = path(&key);
                    return Err(state.refuse(ApiError::unsupported(
                        name.clone(),
                        format!("`{name}` is not supported by this gateway"),
                    )));
                }
                other => return Err(state.refuse(ApiError::unknown_parameter(&path(other)))),
            }
        }
        let role = role.ok_or_else(|| {
            state.refuse(ApiError::invalid_request(
                path("role"),
                format!("`{}` is required", path("role")),
            ))
        })?;
        let parts = parts.ok_or_else(|| {
            state.refuse(ApiError::invalid_request(
                path("content"),
                format!("`{}` is required", path("content")),
            ))
        })?;
        Ok(ChatMessage { role, parts })
    }
}

/// A message's `content`: a string, or an array of text parts.
struct ContentSeed<'s> {
    state: &'s State,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for ContentSeed<'_> {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<String>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of text parts")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<String>, E> {
        Ok(vec![text.to_owned()])
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Vec<String>, E> {
        Ok(vec![text])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let Self { state, index } = self;
        let mut parts = Vec::new();
        loop {
            let part = parts.len();
            if part == MAX_CONTENT_PARTS {
                return match seq.next_element::<de::IgnoredAny>()? {
                    None => Ok(parts),
                    Some(_) => Err(state.refuse(ApiError::invalid_value(
                        format!("messages.[{index}].content"),
                        format!(
                            "`messages.[{index}].content` has more than {MAX_CONTENT_PARTS} parts"
                        ),
                    ))),
                };
            }
            let seed = PartSeed { state, index, part };
            match state.at(
                || format!("messages.[{index}].content.[{part}]"),
                seq.next_element_seed(seed),
            )? {
                Some(text) => parts.push(text),
                None if parts.is_empty() => {
                    let param = format!("messages.[{index}].content");
                    return Err(state.refuse(ApiError::invalid_value(
                        param.clone(),
                        format!("`{param}` is an empty array"),
                    )));
                }
                None => return Ok(parts),
            }
        }
    }
}

/// One content part; only `{"type": "text", "text": ...}` is accepted.
struct PartSeed<'s> {
    state: &'s State,
    index: usize,
    part: usize,
}

impl<'de> DeserializeSeed<'de> for PartSeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PartSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a content part {"type": "text", "text": ...}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let Self { state, index, part } = self;
        let path = |name: &str| format!("messages.[{index}].content.[{part}].{name}");
        let mut kind = None;
        let mut text = None;
        let mut seen = Vec::new();
        while let Some(key) = next_key(&mut map)? {
            match &*key {
                "type" => {
                    once(state, &mut seen, "type", || path("type"))?;
                    let value: Cow<'de, str> = state.at(|| path("type"), map.next_value())?;
                    if value != "text" {
                        return Err(state.refuse(ApiError::unsupported(
                            path("type"),
                            format!(
                                "content parts of type `{value}` are not supported; only `text`"
                            ),
                        )));
                    }
                    kind = Some(());
                }
                "text" => {
                    once(state, &mut seen, "text", || path("text"))?;
                    text = Some(state.at(|| path("text"), map.next_value::<String>())?);
                }
                // The payload of a part that is not text: refused before it is read, even
                // when `type` comes after it.
                "image_url" | "input_audio" | "file" | "refusal" => {
                    return Err(state.refuse(ApiError::unsupported(
                        path("type"),
                        format!("content parts of type `{key}` are not supported; only `text`"),
                    )));
                }
                other => return Err(state.refuse(ApiError::unknown_parameter(&path(other)))),
            }
        }
        kind.ok_or_else(|| {
            state.refuse(ApiError::invalid_request(
                path("type"),
                format!("`{}` is required", path("type")),
            ))
        })?;
        text.ok_or_else(|| {
            state.refuse(ApiError::invalid_request(
                path("text"),
                format!("`{}` is required", path("text")),
            ))
        })
    }
}

pub(super) struct MessagesSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_> {
    type Value = Vec<ChatMessage>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_> {
    type Value = Vec<ChatMessage>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let state = self.0;
        let mut messages = Vec::new();
        loop {
            let index = messages.len();
            if index == MAX_MESSAGES {
                return match seq.next_element::<de::IgnoredAny>()? {
                    None => Ok(messages),
                    Some(_) => Err(state.refuse(ApiError::invalid_value(
                        "messages",
                        format!("`messages` has more than {MAX_MESSAGES} entries"),
                    ))),
                };
            }
            let seed = MessageSeed { state, index };
            match state.at(
                || format!("messages.[{index}]"),
                seq.next_element_seed(seed),
            )? {
                Some(message) => messages.push(message),
                None => return Ok(messages),
            }
        }
    }
}
