//! The OpenAI Chat Completions API, as OpenAI, Ollama, llama.cpp's server and vLLM serve it:
//! the request body, the reply and the streamed chunks.
//!
//! Pure functions over JSON. The request goes to `POST {base_url}/v1/chat/completions`, with
//! a bearer key when one is configured (local servers usually need none). Streams ask for
//! the final usage chunk (`stream_options.include_usage`); servers that ignore it leave the
//! usage to be estimated.

use std::iter;

use serde::{Serialize, de::MapAccess};
use serde_json::Value;
use trillium_client::{Conn, KnownHeaderName};

use super::{
    chat::{Content, Messages, Parsed, Request, StreamItem, WireMessage},
    loose::{Fields, First, Object, Str, Text, U64},
    sse::SseEvent,
};
use crate::{
    config::Secret,
    openai_api::{ChatRole, FinishReason},
};

/// Builds `{model, max_tokens, messages, stream}` and the sampling settings; the configured
/// system prompt is the first message.
///
/// A chat client's messages go up in their places, as sent, except that `developer` is sent
/// as `system`: the role OpenAI gave newer models, which servers such as Ollama do not know,
/// and which OpenAI treats alike. The configured system prompt is added only to a
/// conversation that brings no instructions of its own.
///
/// Written straight from typed fields, in the order (and bytes) a `json!` tree gave: a tree
/// hashed every key into its own map on each request, the costliest part of building it.
///
/// # Errors
///
/// Only if serde_json fails to write strings and numbers, which it does not; the request
/// path keeps no panic, so the caller answers an error instead.
pub(crate) fn request_body(request: &Request<'_>) -> Result<Vec<u8>, serde_json::Error> {
    let default_system = request
        .system
        .filter(|_| !request.messages.has_system())
        .map(|system| WireMessage {
            role: "system",
            content: Content::Text(system),
        });
    let messages: Vec<WireMessage<'_>> = match request.messages {
        Messages::Session { history, message } => default_system
            .into_iter()
            .chain(history.iter().map(|turn| WireMessage {
                role: turn.role.as_str(),
                content: Content::Text(&turn.content),
            }))
            .chain(iter::once(WireMessage {
                role: "user",
                content: Content::Text(message),
            }))
            .collect(),
        Messages::Chat(conversation) => default_system
            .into_iter()
            .chain(conversation.iter().map(|message| {
                let role = match message.role {
                    ChatRole::System | ChatRole::Developer => "system",
                    ChatRole::User => "user",
                    ChatRole::Assistant => "assistant",
                };
                WireMessage {
                    role,
                    content: Content::of(message),
                }
            }))
            .collect(),
    };
    let sampling = &request.sampling;
    serde_json::to_vec(&Body {
        model: request.model,
        max_tokens: request.max_tokens,
        messages,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        stop: sampling.stop,
        user: sampling.user,
        stream: request.stream,
        stream_options: request.stream.then_some(StreamOptions {
            include_usage: true,
        }),
    })
}

/// The request body, fields in the order they are written.
#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Adds the bearer key when one is configured; local servers usually take none.
pub(crate) fn authorize(conn: Conn, key: Option<&Secret>) -> Conn {
    match key {
        Some(key) => conn.with_request_header(
            KnownHeaderName::Authorization,
            format!("Bearer {}", key.expose()),
        ),
        None => conn,
    }
}

/// Reads a (non-streamed) reply: `choices[0].message.content` and the usage.
///
/// Only those fields are read (`loose.rs`), each as leniently as before: one of an
/// unexpected type reads as absent, except the content, which must be a string or `null`.
pub(crate) fn parse_reply(body: &str) -> Result<Parsed, String> {
    let reply: Object<Reply> =
        serde_json::from_str(body).map_err(|error| format!("reply is not JSON: {error}"))?;
    let reply = reply.0.unwrap_or_default();
    let Some(choice) = reply.choices.0 else {
        return Err("reply has no choices[0].message".to_owned());
    };
    let Some(message) = choice.message.0 else {
        return Err("reply has no choices[0].message".to_owned());
    };
    let content = match message.content {
        Text::String(text) => text,
        Text::Null => String::new(),
        Text::Other => return Err("choices[0].message.content is not a string".to_owned()),
    };
    let usage = reply.usage.0.unwrap_or_default();
    Ok(Parsed {
        content,
        model: reply.model.0,
        input_tokens: usage.prompt_tokens.0,
        output_tokens: usage.completion_tokens.0,
        finish: choice
            .finish_reason
            .0
            .as_deref()
            .map(FinishReason::from_openai),
    })
}

/// The fields of a reply blufio reads; the rest is skipped.
#[derive(Default)]
struct Reply {
    model: Str,
    choices: First<Choice>,
    usage: Object<ReplyUsage>,
}

impl<'de> Fields<'de> for Reply {
    const NAMES: &'static [&'static str] = &["model", "choices", "usage"];
    fn take<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.model = map.next_value()?,
            1 => self.choices = map.next_value()?,
            _ => self.usage = map.next_value()?,
        }
        Ok(())
    }
}

#[derive(Default)]
struct Choice {
    message: Object<ReplyMessage>,
    finish_reason: Str,
}

impl<'de> Fields<'de> for Choice {
    const NAMES: &'static [&'static str] = &["message", "finish_reason"];
    fn take<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.message = map.next_value()?,
            _ => self.finish_reason = map.next_value()?,
        }
        Ok(())
    }
}

#[derive(Default)]
struct ReplyMessage {
    content: Text,
}

impl<'de> Fields<'de> for ReplyMessage {
    const NAMES: &'static [&'static str] = &["content"];
    fn take<A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.content = map.next_value()?;
        Ok(())
    }
}

#[derive(Default)]
struct ReplyUsage {
    prompt_tokens: U64,
    completion_tokens: U64,
}

impl<'de> Fields<'de> for ReplyUsage {
    const NAMES: &'static [&'static str] = &["prompt_tokens", "completion_tokens"];
    fn take<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.prompt_tokens = map.next_value()?,
            _ => self.completion_tokens = map.next_value()?,
        }
        Ok(())
    }
}

/// Reads one streamed chunk: a content delta, the usage chunk, or `[DONE]`.
pub(crate) fn parse_event(event: &SseEvent) -> Result<Vec<StreamItem>, String> {
    if event.data.trim() == "[DONE]" {
        return Ok(vec![StreamItem::Done]);
    }
    let value: Value = serde_json::from_str(&event.data)
        .map_err(|error| format!("stream chunk is not JSON: {error}"))?;
    if let Some(message) = value["error"]["message"].as_str() {
        return Ok(vec![StreamItem::Failed(
            message.chars().take(200).collect(),
        )]);
    }
    let mut items = Vec::new();
    if let Some(text) = value["choices"][0]["delta"]["content"].as_str() {
        items.push(StreamItem::Delta(text.to_owned()));
    }
    if let Some(reason) = value["choices"][0]["finish_reason"].as_str() {
        items.push(StreamItem::Finish(FinishReason::from_openai(reason)));
    }
    if value["usage"].is_object() || value["model"].is_string() {
        items.push(StreamItem::Usage {
            model: value["model"].as_str().map(str::to_owned),
            input_tokens: value["usage"]["prompt_tokens"].as_u64(),
            output_tokens: value["usage"]["completion_tokens"].as_u64(),
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::chat::{
        Sampling,
        tests::{chat_message, request, two_turns},
    };
    use serde_json::json;

    /// The body sent up, read back for comparison with a `json!` literal.
    fn body_of(request: &Request<'_>) -> Value {
        serde_json::from_slice(&request_body(request).unwrap()).unwrap()
    }

    #[test]
    fn the_body_is_written_in_a_fixed_key_order_with_unset_settings_left_out() {
        let conversation = [
            chat_message(ChatRole::User, &["a \"quoted\" line\n"]),
            chat_message(ChatRole::Assistant, &["one", "two"]),
        ];
        let stop = vec!["END".to_owned()];
        let full = Request {
            model: "m",
            max_tokens: 7,
            system: Some("sys"),
            messages: Messages::Chat(&conversation),
            sampling: Sampling {
                temperature: Some(0.5),
                top_p: Some(1.0),
                stop: &stop,
                user: Some("u"),
            },
            stream: true,
        };
        assert_eq!(
            String::from_utf8(request_body(&full).unwrap()).unwrap(),
            concat!(
                r#"{"model":"m","max_tokens":7,"messages":["#,
                r#"{"role":"system","content":"sys"},"#,
                r#"{"role":"user","content":"a \"quoted\" line\n"},"#,
                r#"{"role":"assistant","content":[{"type":"text","text":"one"},"#,
                r#"{"type":"text","text":"two"}]}],"#,
                r#""temperature":0.5,"top_p":1.0,"stop":["END"],"user":"u","stream":true,"#,
                r#""stream_options":{"include_usage":true}}"#,
            )
        );
        let bare = Request {
            system: None,
            sampling: Sampling::default(),
            stream: false,
            ..full
        };
        assert_eq!(
            String::from_utf8(request_body(&bare).unwrap()).unwrap(),
            concat!(
                r#"{"model":"m","max_tokens":7,"messages":["#,
                r#"{"role":"user","content":"a \"quoted\" line\n"},"#,
                r#"{"role":"assistant","content":[{"type":"text","text":"one"},"#,
                r#"{"type":"text","text":"two"}]}]}"#,
            )
        );
    }

    #[test]
    fn a_chat_conversation_goes_up_in_place_with_its_sampling() {
        let conversation = [
            chat_message(ChatRole::Developer, &["be brief"]),
            chat_message(ChatRole::User, &["hi", "there"]),
        ];
        let stop = vec!["a".to_owned(), "b".to_owned()];
        let request = Request {
            model: "llama3.2",
            max_tokens: 10,
            system: Some("unused: the client brought instructions"),
            messages: Messages::Chat(&conversation),
            sampling: Sampling {
                temperature: Some(1.5),
                top_p: None,
                stop: &stop,
                user: Some("u"),
            },
            stream: false,
        };
        assert_eq!(
            body_of(&request),
            json!({
                "model": "llama3.2", "max_tokens": 10, "temperature": 1.5,
                "stop": ["a", "b"], "user": "u",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
                ],
            })
        );
        let only_user = [chat_message(ChatRole::User, &["x"])];
        let body = body_of(&Request {
            messages: Messages::Chat(&only_user),
            ..request
        });
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "x");
    }

    #[test]
    fn finish_reasons_are_read_from_replies_and_chunks() {
        let parsed =
            parse_reply(r#"{"choices":[{"message":{"content":"x"},"finish_reason":"length"}]}"#)
                .unwrap();
        assert_eq!(parsed.finish, Some(FinishReason::Length));
        let items = parse_event(&SseEvent {
            event: String::new(),
            data: r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#.to_owned(),
        })
        .unwrap();
        assert_eq!(items, vec![StreamItem::Finish(FinishReason::Stop)]);
    }

    #[test]
    fn the_system_prompt_leads_and_the_history_follows() {
        let history = two_turns();
        let body = body_of(&request(
            "llama3.2",
            32,
            Some("sys"),
            &history,
            "again",
            true,
        ));
        assert_eq!(
            body,
            json!({
                "model": "llama3.2", "max_tokens": 32, "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "again"},
                ],
            })
        );
    }

    #[test]
    fn a_reply_reads_the_first_choice_and_usage() {
        let parsed = parse_reply(
            r#"{"model":"gpt","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"}}],
                "usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#,
        )
        .unwrap();
        assert_eq!(parsed.content, "Hi");
        assert_eq!(
            (parsed.input_tokens, parsed.output_tokens),
            (Some(4), Some(2))
        );
        let no_usage = parse_reply(r#"{"choices":[{"message":{"content":"x"}}]}"#).unwrap();
        assert_eq!(no_usage.input_tokens, None);
        assert!(parse_reply(r#"{"choices":[]}"#).is_err());
        assert!(parse_reply(r#"{"choices":[{"message":{"content":5}}]}"#).is_err());
    }

    /// The reading of a reply through a `Value` tree that `parse_reply` replaced.
    fn parse_reply_by_value(body: &str) -> Result<Parsed, ()> {
        let value: Value = serde_json::from_str(body).map_err(|_| ())?;
        let message = &value["choices"][0]["message"];
        if !message.is_object() {
            return Err(());
        }
        let content = match &message["content"] {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            _ => return Err(()),
        };
        Ok(Parsed {
            content,
            model: value["model"].as_str().map(str::to_owned),
            input_tokens: value["usage"]["prompt_tokens"].as_u64(),
            output_tokens: value["usage"]["completion_tokens"].as_u64(),
            finish: value["choices"][0]["finish_reason"]
                .as_str()
                .map(FinishReason::from_openai),
        })
    }

    #[test]
    fn odd_replies_read_as_they_did_through_a_value_tree() {
        let replies = [
            r#"{"choices":[{"message":{"content":"x"}}]}"#,
            r#"{"choices":[{"message":{"content":null}}],"model":null}"#,
            r#"{"choices":[{"message":{}}],"model":5,"usage":[1,2]}"#,
            r#"{"choices":[{"message":{"content":"x"},"finish_reason":7}],"usage":"none"}"#,
            r#"{"choices":[{"message":{"content":"a\u00e9\n"},"finish_reason":"length"},
                {"message":5}],"usage":{"prompt_tokens":-1,"completion_tokens":2.5}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":{"a":[1]}},
                "choices":[{"message":{"content":"x","extra":{"deep":[[{}]]}}}]}"#,
            r#"{"choices":[{"message":{"content":["x"]}}]}"#,
            r#"{"choices":[{"message":{"content":{"text":"x"}}}]}"#,
            r#"{"choices":[{"message":{"content":true}}]}"#,
            r#"{"choices":[{"message":"x"}]}"#,
            r#"{"choices":[5,{"message":{"content":"x"}}]}"#,
            r#"{"choices":[]}"#,
            r#"{"choices":{"0":{"message":{"content":"x"}}}}"#,
            r#"{"choices":null}"#,
            "{}",
            r#"[{"choices":[{"message":{"content":"x"}}]}]"#,
            r#""choices""#,
            "null",
            "{",
            r#"{"choices":[{"message":{"content":"x"}}]} trailing"#,
            // A repeated key: the last one counts, as in a `Value`.
            r#"{"choices":[],"model":"a","choices":[{"message":{"content":"x","content":"y"}}],
                "usage":{"prompt_tokens":1},"usage":{"completion_tokens":2},"model":"b"}"#,
            r#"{"choices":[{"message":{"content":"x"}}],"choices":5}"#,
            r#"{"choices":[{"message":{"content":"x"},"message":{}}]}"#,
            r#"{"\u0063hoices":[{"message":{"content":"escaped key"}}]}"#,
        ];
        for reply in replies {
            assert_eq!(
                parse_reply(reply).map_err(|_| ()),
                parse_reply_by_value(reply),
                "{reply}"
            );
        }
    }

    #[test]
    fn stream_chunks_become_deltas_usage_and_done() {
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        assert_eq!(
            parse_event(&event(r#"{"choices":[{"delta":{"content":"He"}}]}"#)).unwrap(),
            vec![StreamItem::Delta("He".into())]
        );
        assert_eq!(
            parse_event(&event(
                r#"{"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#
            ))
            .unwrap(),
            vec![StreamItem::Usage {
                model: Some("m".into()),
                input_tokens: Some(3),
                output_tokens: Some(5)
            }]
        );
        assert_eq!(
            parse_event(&event("[DONE]")).unwrap(),
            vec![StreamItem::Done]
        );
        assert!(parse_event(&event("{")).is_err());
    }
}
