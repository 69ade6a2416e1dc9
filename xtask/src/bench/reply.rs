//! What the fake upstream (`upstream.rs`) says: the answer a request gets, read from its
//! body by a scan for three keys, and the bytes of a `chat.completion`, of the
//! `chat.completion.chunk` events and of OpenAI-shaped errors.
//!
//! Pure functions; the sockets and threads are in `upstream.rs`.

use std::fmt::Write as _;
use std::io::Write as _;

use super::chunked::find;
use crate::json;

/// The answer's text; streamed as its first word, then the rest.
const CONTENT: (&str, &str) = ("Hello", " from the fake upstream.");
const PROMPT_TOKENS: u64 = 12;
const COMPLETION_TOKENS: u64 = 7;
/// A fixed `created`, so answers cost no clock read.
const CREATED: u64 = 1_764_000_000;

/// The fake's answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer<'a> {
    Completion { model: &'a str },
    Stream { model: &'a str, include_usage: bool },
    Error { status: u16, body: String },
}

/// Decides the answer to a request: a completion, a stream, or an OpenAI-shaped error.
pub(super) fn answer<'a>(method: &str, path: &str, body: &'a [u8]) -> Answer<'a> {
    if path != "/v1/chat/completions" {
        return error(404, "unknown path", "not_found");
    }
    if method != "POST" {
        return error(405, "use POST", "method_not_allowed");
    }
    let fields = match scan_fields(body) {
        Ok(fields) => fields,
        Err(message) => return error(400, message, "invalid_request_error"),
    };
    if fields.stream {
        Answer::Stream {
            model: fields.model,
            include_usage: fields.include_usage,
        }
    } else {
        Answer::Completion {
            model: fields.model,
        }
    }
}

/// The fields of a request the fake answers by.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Fields<'a> {
    pub(super) model: &'a str,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

/// Reads `model`, `stream` and `stream_options.include_usage` by scanning for their keys.
///
/// Not a JSON parse, which costs more than the rest of an answer in the bench's debug build:
/// the bodies are the bench's own, as blufio relays them, where each key occurs once. A key
/// inside a string cannot match, since JSON escapes the quotes around it there.
///
/// # Errors
///
/// A body that is not an object, or without a plain string `model`.
pub(super) fn scan_fields(body: &[u8]) -> std::result::Result<Fields<'_>, &'static str> {
    let trimmed = body.trim_ascii();
    if !(trimmed.starts_with(b"{") && trimmed.ends_with(b"}")) {
        return Err("the body is not a JSON object");
    }
    let model = value_after(body, b"\"model\"")
        .and_then(|value| value.strip_prefix(b"\""))
        .and_then(|value| {
            let end = value.iter().position(|byte| *byte == b'"')?;
            let name = &value[..end];
            // An escaped name would need decoding; the bench sends none.
            (!name.contains(&b'\\')).then_some(name)
        })
        .and_then(|name| std::str::from_utf8(name).ok())
        .ok_or("`model` is missing or not a plain string")?;
    let is_true =
        |key: &[u8]| value_after(body, key).is_some_and(|value| value.starts_with(b"true"));
    Ok(Fields {
        model,
        stream: is_true(b"\"stream\""),
        include_usage: is_true(b"\"include_usage\""),
    })
}

/// Returns what follows `key` and its colon, without leading whitespace.
fn value_after<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = find(body, key)? + key.len();
    let rest = body[at..].trim_ascii_start().strip_prefix(b":")?;
    Some(rest.trim_ascii_start())
}

fn error(status: u16, message: &str, code: &str) -> Answer<'static> {
    Answer::Error {
        status,
        body: format!(
            r#"{{"error":{{"message":{},"type":"invalid_request_error","param":null,"code":"{code}"}}}}"#,
            json::quote(message)
        ),
    }
}

/// A `chat.completion` with usage.
pub(super) fn completion(model: &str) -> String {
    format!(
        r#"{{"id":"chatcmpl-fake","object":"chat.completion","created":{CREATED},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}{}"}},"finish_reason":"stop"}}],"usage":{}}}"#,
        json::quote(model),
        CONTENT.0,
        CONTENT.1,
        usage()
    )
}

fn usage() -> String {
    format!(
        r#"{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{COMPLETION_TOKENS},"total_tokens":{}}}"#,
        PROMPT_TOKENS + COMPLETION_TOKENS
    )
}

fn chunk_event(model: &str, choices: &str, usage: Option<&str>) -> String {
    let mut event = format!(
        r#"data: {{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":{CREATED},"model":{},"choices":[{choices}]"#,
        json::quote(model)
    );
    if let Some(usage) = usage {
        let _ = write!(event, r#","usage":{usage}"#);
    }
    event.push_str("}\n\n");
    event
}

/// The first event: the role and the first word.
pub(super) fn first_event(model: &str) -> String {
    chunk_event(
        model,
        &format!(
            r#"{{"index":0,"delta":{{"role":"assistant","content":"{}"}},"finish_reason":null}}"#,
            CONTENT.0
        ),
        None,
    )
}

pub(super) fn delta_event(model: &str, text: &str) -> String {
    chunk_event(
        model,
        &format!(
            r#"{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}"#,
            json::quote(text)
        ),
        None,
    )
}

/// The events after the first: the rest of the text, the finish reason, the usage chunk when
/// asked for, and `[DONE]`.
pub(super) fn rest_events(model: &str, include_usage: bool) -> String {
    let mut events = delta_event(model, CONTENT.1);
    events.push_str(&chunk_event(
        model,
        r#"{"index":0,"delta":{},"finish_reason":"stop"}"#,
        None,
    ));
    if include_usage {
        events.push_str(&chunk_event(model, "", Some(&usage())));
    }
    events.push_str("data: [DONE]\n\n");
    events
}

pub(super) const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
    Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

pub(super) fn write_json(output: &mut Vec<u8>, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let _ = write!(
        output,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::stream::{Tally, scan_events};
    use super::*;

    #[test]
    fn a_plain_request_gets_a_completion_with_usage_for_its_model() {
        assert_eq!(
            answer(
                "POST",
                "/v1/chat/completions",
                br#"{"model":"fast","messages":[]}"#
            ),
            Answer::Completion { model: "fast" }
        );
        let reply: Value = serde_json::from_str(&completion("fast")).unwrap();
        assert_eq!(reply["object"], "chat.completion");
        assert_eq!(reply["model"], "fast");
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            "Hello from the fake upstream."
        );
        assert_eq!(reply["usage"]["total_tokens"], 19);
    }

    #[test]
    fn bad_requests_get_openai_errors() {
        let post = ("POST", "/v1/chat/completions");
        let get = ("GET", "/v1/chat/completions");
        let elsewhere = ("POST", "/v1/messages");
        for (head, body, want) in [
            (&post, &b"{"[..], 400),
            (&post, br#"{"messages":[]}"#, 400),
            (&get, br#"{"model":"fast"}"#, 405),
            (&elsewhere, br#"{"model":"fast"}"#, 404),
        ] {
            let Answer::Error { status, body } = answer(head.0, head.1, body) else {
                panic!("an error got an answer");
            };
            assert_eq!(status, want, "{body}");
            let error: Value = serde_json::from_str(&body).unwrap();
            assert!(error["error"]["message"].is_string(), "{body}");
        }
    }

    #[test]
    fn the_key_scan_reads_what_a_json_parse_would() {
        for body in [
            r#"{"model":"fast","messages":[{"role":"user","content":"\"model\": \"x\""}]}"#,
            r#"{ "messages": [], "model" : "slow", "stream" : true, "stream_options": { "include_usage" : true } }"#,
            r#"{"stream_options":{"include_usage":false},"stream":true,"model":"fast"}"#,
            r#"{"model":"fast","stream":false}"#,
        ] {
            let value: Value = serde_json::from_str(body).unwrap();
            let fields = scan_fields(body.as_bytes()).unwrap();
            assert_eq!(fields.model, value["model"], "{body}");
            assert_eq!(fields.stream, value["stream"] == true, "{body}");
            assert_eq!(
                fields.include_usage,
                value["stream_options"]["include_usage"] == true,
                "{body}"
            );
        }
        for body in [
            "[]",
            r#"{"model":3}"#,
            r#"{"model":"a\"b"}"#,
            r#"{"model":"#,
        ] {
            assert!(scan_fields(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn streamed_events_are_chunks_then_usage_then_done() {
        let request = br#"{"model":"fast","stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(
            answer("POST", "/v1/chat/completions", request),
            Answer::Stream {
                model: "fast",
                include_usage: true
            }
        );
        for (include_usage, chunks) in [(true, 4), (false, 3)] {
            let events = first_event("fast") + &rest_events("fast", include_usage);
            let mut tally = Tally::default();
            assert_eq!(scan_events(events.as_bytes(), &mut tally), events.len());
            assert_eq!(tally.chunks, chunks, "{events}");
            assert!(tally.done && !tally.data_after_done);
            for event in events
                .split("\n\n")
                .filter(|event| event.starts_with("data: {"))
            {
                let chunk: Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
                assert_eq!(chunk["object"], "chat.completion.chunk");
            }
            assert_eq!(
                events.contains(r#""usage":{"prompt_tokens""#),
                include_usage
            );
        }
    }
}
