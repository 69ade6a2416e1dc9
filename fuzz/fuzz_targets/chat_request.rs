//! Fuzzes `openai_api::parse_request`, the parser of `POST /v1/chat/completions` bodies.
//!
//! Invariants: it never panics; an accepted request keeps every bound (messages non-empty
//! and at most `MAX_MESSAGES`, each with 1 to `MAX_CONTENT_PARTS` parts, at most `MAX_STOP`
//! stop sequences, temperature in 0..=2 and top_p in 0..=1, `max_tokens` at least 1,
//! `include_usage` only when streaming) and is exactly what the JSON says, read a second way
//! through `serde_json::Value`; a refusal is a 400 naming a parameter (an unknown empty key
//! is called one in the message), and its body is the OpenAI error object with the same
//! fields.
#![no_main]

use blufio::internals::openai_api::{
    ApiError, ChatRequest, ChatRole, MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP, parse_request,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(request) => check_accepted(data, &request),
        Err(error) => check_refused(&error),
    }
});

fn check_accepted(data: &[u8], request: &ChatRequest) {
    assert!(!request.model.is_empty());
    assert!(!request.messages.is_empty());
    assert!(request.messages.len() <= MAX_MESSAGES);
    for message in &request.messages {
        assert!(!message.parts.is_empty());
        assert!(message.parts.len() <= MAX_CONTENT_PARTS);
    }
    assert!(request.stop.len() <= MAX_STOP);
    assert!(
        request
            .temperature
            .is_none_or(|value| (0.0..=2.0).contains(&value))
    );
    assert!(
        request
            .top_p
            .is_none_or(|value| (0.0..=1.0).contains(&value))
    );
    assert_ne!(request.max_tokens, Some(0));
    assert!(request.stream || !request.include_usage);

    // What was accepted is a JSON object, and the typed request says what it says.
    let value: Value = serde_json::from_slice(data).expect("an accepted body is JSON");
    assert_eq!(value["model"].as_str(), Some(request.model.as_str()));
    let messages = value["messages"]
        .as_array()
        .expect("accepted `messages` is an array");
    assert_eq!(messages.len(), request.messages.len());
    for (message, parsed) in messages.iter().zip(&request.messages) {
        let role = match parsed.role {
            ChatRole::System => "system",
            ChatRole::Developer => "developer",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        };
        assert_eq!(message["role"].as_str(), Some(role));
        let parts: Vec<&str> = match &message["content"] {
            Value::String(text) => vec![text.as_str()],
            Value::Array(parts) => parts
                .iter()
                .map(|part| {
                    assert_eq!(part["type"].as_str(), Some("text"));
                    part["text"].as_str().expect("a text part's text")
                })
                .collect(),
            other => panic!("accepted content {other}"),
        };
        assert_eq!(parts, parsed.parts);
    }
    let stop: Vec<&str> = match &value["stop"] {
        Value::Null => Vec::new(),
        Value::String(text) => vec![text.as_str()],
        Value::Array(entries) => entries
            .iter()
            .map(|entry| entry.as_str().expect("a stop string"))
            .collect(),
        other => panic!("accepted stop {other}"),
    };
    assert_eq!(stop, request.stop);
    assert_eq!(value["stream"].as_bool().unwrap_or(false), request.stream);
    assert_eq!(value["user"].as_str(), request.user.as_deref());
}

fn check_refused(error: &ApiError) {
    assert_eq!(error.status, 400, "{error}");
    assert_eq!(error.kind, "invalid_request_error", "{error}");
    let param = error.param.as_deref().expect("a refusal names a parameter");
    assert!(!error.message.is_empty(), "{error}");
    // An unknown key may be empty (`{"": 1}`), but then the message says so rather than
    // naming nothing.
    if error.code == Some("unknown_parameter") && (param.is_empty() || param.ends_with('.')) {
        assert!(error.message.contains("an empty key"), "{error}");
    }
    let body: Value = serde_json::from_str(&error.to_json()).expect("the error body is JSON");
    let object = body["error"].as_object().expect("one `error` object");
    assert_eq!(object.len(), 4, "{body}");
    assert_eq!(object["message"].as_str(), Some(error.message.as_str()));
    assert_eq!(object["type"].as_str(), Some(error.kind));
    assert_eq!(object["param"].as_str(), Some(param));
    assert_eq!(object["code"].as_str(), error.code);
}
