//! The Anthropic Messages API: the request body, the reply and the streamed events.
//!
//! Pure functions over JSON, so every documented shape is tested without a socket. The
//! request goes to `POST {base_url}/v1/messages` with `x-api-key` and `anthropic-version`
//! (`authorize`).

use serde_json::{Value, json};
use trillium_client::Conn;

use super::{
    chat::{self, Messages, Parsed, Request, Sampling, StreamItem},
    sse::SseEvent,
};
use crate::{
    config::Secret,
    openai_api::{ChatRole, FinishReason},
};

/// The API version header value this code speaks.
pub(crate) const VERSION: &str = "2023-06-01";

/// Builds `{model, max_tokens, system, messages, stream}` and the sampling settings.
///
/// A chat client's system and developer messages, wherever they stand, become the top-level
/// `system` (joined by a blank line): Anthropic takes instructions only there. Its
/// `temperature` runs from 0 to 1 where OpenAI's runs to 2, so a higher one is sent as 1
/// (the most random Anthropic offers) rather than refused by the upstream; `stop` becomes
/// `stop_sequences` and `user` becomes `metadata.user_id`.
pub(crate) fn request_body(request: &Request<'_>) -> Value {
    let (messages, system): (Vec<Value>, Option<String>) = match request.messages {
        Messages::Session { history, message } => (
            chat::session_messages(history, message).collect(),
            request.system.map(str::to_owned),
        ),
        Messages::Chat(conversation) => {
            let instructions: Vec<_> = conversation
                .iter()
                .filter(|message| chat::is_system(message.role))
                .map(|message| message.text())
                .collect();
            let messages = conversation
                .iter()
                .filter_map(|message| {
                    let role = match message.role {
                        ChatRole::User => "user",
                        ChatRole::Assistant => "assistant",
                        ChatRole::System | ChatRole::Developer => return None,
                    };
                    Some(json!({ "role": role, "content": chat::content(message) }))
                })
                .collect();
            let system = if instructions.is_empty() {
                request.system.map(str::to_owned)
            } else {
                Some(instructions.join("\n\n"))
            };
            (messages, system)
        }
    };
    let mut body = chat::body(request, messages);
    let sampling = Sampling {
        temperature: request.sampling.temperature.map(|value| value.min(1.0)),
        ..request.sampling
    };
    chat::add_sampling(&mut body, &sampling, "stop_sequences");
    if let Value::Object(map) = &mut body {
        if let Some(system) = system {
            map.insert("system".into(), json!(system));
        }
        if let Some(user) = request.sampling.user {
            map.insert("metadata".into(), json!({ "user_id": user }));
        }
        if request.stream {
            map.insert("stream".into(), json!(true));
        }
    }
    body
}

/// Adds the key header (empty when no key is set: the upstream then answers 401) and the
/// API version.
pub(crate) fn authorize(conn: Conn, key: Option<&Secret>) -> Conn {
    conn.with_request_header(
        "x-api-key",
        key.map_or(String::new(), |key| key.expose().to_owned()),
    )
    .with_request_header("anthropic-version", VERSION)
}

/// Reads a (non-streamed) reply: the text blocks joined, the model and the usage.
pub(crate) fn parse_reply(body: &str) -> Result<Parsed, String> {
    let value: Value =
        serde_json::from_str(body).map_err(|error| format!("reply is not JSON: {error}"))?;
    let blocks = value["content"]
        .as_array()
        .ok_or("reply has no content array")?;
    let content = blocks
        .iter()
        .filter(|block| block["type"] == "text")
        .filter_map(|block| block["text"].as_str())
        .collect::<String>();
    Ok(Parsed {
        content,
        model: value["model"].as_str().map(str::to_owned),
        input_tokens: value["usage"]["input_tokens"].as_u64(),
        output_tokens: value["usage"]["output_tokens"].as_u64(),
        finish: value["stop_reason"]
            .as_str()
            .map(FinishReason::from_anthropic),
    })
}

/// Reads one streamed event (`message_start`, `content_block_delta`, `message_delta`,
/// `message_stop`, `ping`, `error`); a `message_delta` says both the usage and why the
/// model stopped.
pub(crate) fn parse_event(event: &SseEvent) -> Result<Vec<StreamItem>, String> {
    let value: Value = serde_json::from_str(&event.data)
        .map_err(|error| format!("stream event is not JSON: {error}"))?;
    let kind = value["type"].as_str().unwrap_or(event.event.as_str());
    if kind == "message_delta"
        && let Some(reason) = value["delta"]["stop_reason"].as_str()
    {
        return Ok(vec![
            StreamItem::Finish(FinishReason::from_anthropic(reason)),
            usage_delta(&value),
        ]);
    }
    Ok(vec![match kind {
        "message_start" => StreamItem::Usage {
            model: value["message"]["model"].as_str().map(str::to_owned),
            input_tokens: value["message"]["usage"]["input_tokens"].as_u64(),
            output_tokens: value["message"]["usage"]["output_tokens"].as_u64(),
        },
        "content_block_delta" => match value["delta"]["text"].as_str() {
            Some(text) if value["delta"]["type"] == "text_delta" => {
                StreamItem::Delta(text.to_owned())
            }
            _ => StreamItem::Nothing,
        },
        "message_delta" => usage_delta(&value),
        "message_stop" => StreamItem::Done,
        "error" => StreamItem::Failed(
            value["error"]["type"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
        ),
        _ => StreamItem::Nothing,
    }])
}

/// The usage a `message_delta` reports.
fn usage_delta(value: &Value) -> StreamItem {
    StreamItem::Usage {
        model: None,
        input_tokens: value["usage"]["input_tokens"].as_u64(),
        output_tokens: value["usage"]["output_tokens"].as_u64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::chat::tests::{chat_message, request, two_turns};

    #[test]
    fn the_request_carries_the_whole_history_then_the_message() {
        let history = two_turns();
        let body = request_body(&request("m", 64, Some("be brief"), &history, "again", true));
        assert_eq!(
            body,
            json!({
                "model": "m", "max_tokens": 64, "system": "be brief", "stream": true,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "again"},
                ],
            })
        );
        let body = request_body(&request("m", 64, None, &[], "x", false));
        assert!(body.get("system").is_none() && body.get("stream").is_none());
    }

    #[test]
    fn a_reply_joins_text_blocks_and_reads_usage() {
        let parsed = parse_reply(
            r#"{"type":"message","model":"claude-x","stop_reason":"end_turn",
                "content":[{"type":"text","text":"Hel"},{"type":"tool_use"},{"type":"text","text":"lo"}],
                "usage":{"input_tokens":12,"output_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(parsed.content, "Hello");
        assert_eq!(parsed.model.as_deref(), Some("claude-x"));
        assert_eq!(
            (parsed.input_tokens, parsed.output_tokens),
            (Some(12), Some(3))
        );
        assert!(parse_reply("{\"content\": 3}").is_err());
        assert!(parse_reply("<html>").is_err());
    }

    /// The one item an event says.
    fn one(event: &SseEvent) -> StreamItem {
        let mut items = parse_event(event).unwrap();
        assert_eq!(items.len(), 1, "{items:?}");
        items.remove(0)
    }

    #[test]
    fn a_chat_conversation_moves_instructions_to_system_and_maps_sampling() {
        let conversation = [
            chat_message(ChatRole::System, &["be brief"]),
            chat_message(ChatRole::User, &["hi", "there"]),
            chat_message(ChatRole::Developer, &["no emoji"]),
            chat_message(ChatRole::Assistant, &["hello"]),
            chat_message(ChatRole::User, &["again"]),
        ];
        let stop = vec!["END".to_owned()];
        let request = Request {
            model: "claude-x",
            max_tokens: 100,
            system: Some("the configured default, unused"),
            messages: Messages::Chat(&conversation),
            sampling: Sampling {
                temperature: Some(1.7),
                top_p: Some(0.5),
                stop: &stop,
                user: Some("u-1"),
            },
            stream: false,
        };
        assert_eq!(
            request_body(&request),
            json!({
                "model": "claude-x", "max_tokens": 100,
                "system": "be brief\n\nno emoji",
                "temperature": 1.0, "top_p": 0.5, "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"},
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "again"},
                ],
            })
        );
        let without_instructions = [chat_message(ChatRole::User, &["x"])];
        let body = request_body(&Request {
            messages: Messages::Chat(&without_instructions),
            ..request
        });
        assert_eq!(body["system"], "the configured default, unused");
    }

    #[test]
    fn stop_reasons_are_read_from_replies_and_message_deltas() {
        let parsed =
            parse_reply(r#"{"content":[],"stop_reason":"max_tokens","usage":{}}"#).unwrap();
        assert_eq!(parsed.finish, Some(FinishReason::Length));
        let items = parse_event(&SseEvent {
            event: String::new(),
            data: r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}"#.to_owned(),
        })
        .unwrap();
        assert_eq!(
            items,
            vec![
                StreamItem::Finish(FinishReason::Stop),
                StreamItem::Usage {
                    model: None,
                    input_tokens: None,
                    output_tokens: Some(5)
                }
            ]
        );
    }

    #[test]
    fn stream_events_become_deltas_usage_and_done() {
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        assert_eq!(
            one(&event(
                r#"{"type":"message_start","message":{"model":"c","usage":{"input_tokens":9,"output_tokens":1}}}"#
            )),
            StreamItem::Usage {
                model: Some("c".into()),
                input_tokens: Some(9),
                output_tokens: Some(1)
            }
        );
        assert_eq!(
            one(&event(
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#
            )),
            StreamItem::Delta("Hi".into())
        );
        assert_eq!(
            one(&event(
                r#"{"type":"message_delta","usage":{"output_tokens":7}}"#
            )),
            StreamItem::Usage {
                model: None,
                input_tokens: None,
                output_tokens: Some(7)
            }
        );
        assert_eq!(one(&event(r#"{"type":"message_stop"}"#)), StreamItem::Done);
        assert_eq!(
            one(&event(
                r#"{"type":"error","error":{"type":"overloaded_error"}}"#
            )),
            StreamItem::Failed("overloaded_error".into())
        );
        assert_eq!(one(&event(r#"{"type":"ping"}"#)), StreamItem::Nothing);
        assert!(parse_event(&event("not json")).is_err());
    }
}
