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
    chat::{self, Messages, Parsed, Request, StreamItem},
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
pub(crate) fn request_body(request: &Request<'_>) -> Value {
    let default_system = request
        .system
        .filter(|_| !request.messages.has_system())
        .map(|system| json!({ "role": "system", "content": system }));
    let messages: Vec<Value> = match request.messages {
        Messages::Session { history, message } => default_system
            .into_iter()
            .chain(chat::session_messages(history, message))
            .collect(),
        Messages::Chat(conversation) => default_system
            .into_iter()
            .chain(conversation.iter().map(|message| {
                let role = match message.role {
                    ChatRole::System | ChatRole::Developer => "system",
                    ChatRole::User => "user",
                    ChatRole::Assistant => "assistant",
                };
                json!({ "role": role, "content": chat::content(message) })
            }))
            .collect(),
    };
    let mut body = chat::body(request, messages);
    chat::add_sampling(&mut body, &request.sampling, "stop");
    if let Value::Object(map) = &mut body {
        if let Some(user) = request.sampling.user {
            map.insert("user".into(), json!(user));
        }
        if request.stream {
            map.insert("stream".into(), json!(true));
            map.insert("stream_options".into(), json!({ "include_usage": true }));
        }
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
        finish: value["choices"][0]["finish_reason"]
            .as_str()
            .map(FinishReason::from_openai),
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
            request_body(&request),
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
        let body = request_body(&Request {
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
