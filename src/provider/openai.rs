//! The OpenAI Chat Completions API, as OpenAI, Ollama, llama.cpp's server and vLLM serve it:
//! the request body, the reply and the streamed chunks.
//!
//! Pure functions over JSON. The request goes to `POST {base_url}/v1/chat/completions`, with
//! a bearer key when one is configured (local servers usually need none). Streams ask for
//! the final usage chunk (`stream_options.include_usage`); servers that ignore it leave the
//! usage to be estimated.

use serde_json::{Value, json};
use trillium_client::{Conn, KnownHeaderName};

use super::{
    chat::{self, Parsed, Request, StreamItem},
    sse::SseEvent,
};
use crate::config::Secret;

/// Builds `{model, max_tokens, messages, stream}`; the system prompt is the first message.
pub(crate) fn request_body(request: &Request<'_>) -> Value {
    let messages: Vec<Value> = request
        .system
        .map(|system| json!({ "role": "system", "content": system }))
        .into_iter()
        .chain(chat::messages(request.history, request.message))
        .collect();
    let mut body = chat::body(request, messages);
    if request.stream
        && let Value::Object(map) = &mut body
    {
        map.insert("stream".into(), json!(true));
        map.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    body
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
pub(crate) fn parse_reply(body: &str) -> Result<Parsed, String> {
    let value: Value =
        serde_json::from_str(body).map_err(|error| format!("reply is not JSON: {error}"))?;
    let message = &value["choices"][0]["message"];
    if !message.is_object() {
        return Err("reply has no choices[0].message".to_owned());
    }
    let content = match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        _ => return Err("choices[0].message.content is not a string".to_owned()),
    };
    Ok(Parsed {
        content,
        model: value["model"].as_str().map(str::to_owned),
        input_tokens: value["usage"]["prompt_tokens"].as_u64(),
        output_tokens: value["usage"]["completion_tokens"].as_u64(),
    })
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
    use crate::provider::chat::tests::{request, two_turns};

    #[test]
    fn the_system_prompt_leads_and_the_history_follows() {
        let history = two_turns();
        let body = request_body(&request(
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
