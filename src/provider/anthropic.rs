//! The Anthropic Messages API: the request body, the reply and the streamed events.
//!
//! Pure functions over JSON, so every documented shape is tested without a socket. The
//! request goes to `POST {base_url}/v1/messages` with `x-api-key` and `anthropic-version`
//! (`authorize`).

use serde_json::{Value, json};
use trillium_client::Conn;

use super::{
    chat::{self, Parsed, Request, StreamItem},
    sse::SseEvent,
};
use crate::config::Secret;

/// The API version header value this code speaks.
pub(crate) const VERSION: &str = "2023-06-01";

/// Builds `{model, max_tokens, system, messages, stream}` from the whole history.
pub(crate) fn request_body(request: &Request<'_>) -> Value {
    let messages: Vec<Value> = chat::messages(request.history, request.message).collect();
    let mut body = chat::body(request, messages);
    if let Value::Object(map) = &mut body {
        if let Some(system) = request.system {
            map.insert("system".into(), json!(system));
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
    })
}

/// Reads one streamed event (`message_start`, `content_block_delta`, `message_delta`,
/// `message_stop`, `ping`, `error`).
pub(crate) fn parse_event(event: &SseEvent) -> Result<StreamItem, String> {
    let value: Value = serde_json::from_str(&event.data)
        .map_err(|error| format!("stream event is not JSON: {error}"))?;
    let kind = value["type"].as_str().unwrap_or(event.event.as_str());
    Ok(match kind {
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
        "message_delta" => StreamItem::Usage {
            model: None,
            input_tokens: value["usage"]["input_tokens"].as_u64(),
            output_tokens: value["usage"]["output_tokens"].as_u64(),
        },
        "message_stop" => StreamItem::Done,
        "error" => StreamItem::Failed(
            value["error"]["type"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
        ),
        _ => StreamItem::Nothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::chat::tests::{request, two_turns};

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

    #[test]
    fn stream_events_become_deltas_usage_and_done() {
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        assert_eq!(
            parse_event(&event(
                r#"{"type":"message_start","message":{"model":"c","usage":{"input_tokens":9,"output_tokens":1}}}"#
            ))
            .unwrap(),
            StreamItem::Usage {
                model: Some("c".into()),
                input_tokens: Some(9),
                output_tokens: Some(1)
            }
        );
        assert_eq!(
            parse_event(&event(
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#
            ))
            .unwrap(),
            StreamItem::Delta("Hi".into())
        );
        assert_eq!(
            parse_event(&event(
                r#"{"type":"message_delta","usage":{"output_tokens":7}}"#
            ))
            .unwrap(),
            StreamItem::Usage {
                model: None,
                input_tokens: None,
                output_tokens: Some(7)
            }
        );
        assert_eq!(
            parse_event(&event(r#"{"type":"message_stop"}"#)).unwrap(),
            StreamItem::Done
        );
        assert_eq!(
            parse_event(&event(
                r#"{"type":"error","error":{"type":"overloaded_error"}}"#
            ))
            .unwrap(),
            StreamItem::Failed("overloaded_error".into())
        );
        assert_eq!(
            parse_event(&event(r#"{"type":"ping"}"#)).unwrap(),
            StreamItem::Nothing
        );
        assert!(parse_event(&event("not json")).is_err());
    }
}
