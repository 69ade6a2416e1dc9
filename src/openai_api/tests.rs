//! Tests of the request parser: what it honours, accepts, refuses, and its limits.

use serde_json::{Value, json};

use super::{
    ApiError, ChatMessage, ChatRole, MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP, parse_request,
};

/// A minimal valid request with `extra` merged in at the top level.
fn request_with(extra: Value) -> Vec<u8> {
    let mut body = json!({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

fn refusal(body: &[u8]) -> ApiError {
    match parse_request(body) {
        Ok(request) => panic!("accepted: {request:?}"),
        Err(error) => error,
    }
}

#[track_caller]
fn assert_refused(extra: Value, param: &str, code: Option<&str>) {
    let error = refusal(&request_with(extra.clone()));
    assert_eq!(error.status, 400, "{extra}: {error}");
    assert_eq!(error.param.as_deref(), Some(param), "{extra}: {error}");
    assert_eq!(error.code, code, "{extra}: {error}");
}

#[track_caller]
fn assert_accepted(extra: Value) {
    if let Err(error) = parse_request(&request_with(extra.clone())) {
        panic!("{extra} refused: {error}");
    }
}

#[test]
fn a_full_request_is_read_into_its_typed_fields() {
    let request = parse_request(&request_with(json!({
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "really"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"}
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_completion_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "user": "u-1"
    })))
    .unwrap();
    assert_eq!(request.model, "sonnet");
    let roles: Vec<_> = request.messages.iter().map(|m| m.role).collect();
    use ChatRole::*;
    assert_eq!(roles, [System, Developer, User, Assistant, User]);
    assert_eq!(request.messages[4].parts, ["again"]);
    assert!(request.stream && request.include_usage);
    assert_eq!(request.max_tokens, Some(100));
    assert_eq!(request.temperature, Some(0.5));
    assert_eq!(request.top_p, Some(0.9));
    assert_eq!(request.stop, ["\n\n", "END"]);
    assert_eq!(request.user.as_deref(), Some("u-1"));
}

#[test]
fn defaults_are_no_stream_no_usage_no_limits() {
    let request = parse_request(&request_with(json!({}))).unwrap();
    assert!(!request.stream && !request.include_usage);
    assert_eq!(request.max_tokens, None);
    assert!(request.stop.is_empty());
    assert_eq!(request.user, None);
}

#[test]
fn content_may_be_a_string_or_an_array_of_text_parts() {
    let request = parse_request(&request_with(json!({"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "one"},
            {"text": "two", "type": "text"}
        ]}
    ]})))
    .unwrap();
    let message = &request.messages[0];
    assert_eq!(message.parts, ["one", "two"]);
    assert_eq!(message.text(), "one\ntwo");
    let single = ChatMessage {
        role: ChatRole::User,
        parts: vec!["just".to_owned()],
    };
    assert_eq!(single.text(), "just");
}

#[test]
fn stop_may_be_a_string_or_an_array() {
    let one = parse_request(&request_with(json!({"stop": "END"}))).unwrap();
    assert_eq!(one.stop, ["END"]);
    let many = parse_request(&request_with(json!({"stop": ["a", "b", "c", "d"]}))).unwrap();
    assert_eq!(many.stop, ["a", "b", "c", "d"]);
    let none = parse_request(&request_with(json!({"stop": null}))).unwrap();
    assert!(none.stop.is_empty());
}

#[test]
fn max_tokens_is_read_from_either_name() {
    let old = parse_request(&request_with(json!({"max_tokens": 7}))).unwrap();
    assert_eq!(old.max_tokens, Some(7));
    let both = parse_request(&request_with(
        json!({"max_tokens": 7, "max_completion_tokens": 7}),
    ));
    assert_eq!(both.unwrap().max_tokens, Some(7));
    assert_refused(
        json!({"max_tokens": 7, "max_completion_tokens": 8}),
        "max_tokens",
        Some("invalid_value"),
    );
    assert_refused(
        json!({"max_completion_tokens": 0}),
        "max_completion_tokens",
        Some("invalid_value"),
    );
}

#[test]
fn fields_that_change_nothing_for_a_text_answer_are_accepted() {
    for extra in [
        json!({"user": "someone"}),
        json!({"metadata": {"team": "a", "run": "b"}}),
        json!({"seed": 42}),
        json!({"store": false}),
        json!({"logprobs": false}),
        json!({"top_logprobs": 0}),
        json!({"parallel_tool_calls": true}),
        json!({"n": 1}),
        json!({"frequency_penalty": 0, "presence_penalty": 0.0}),
        json!({"logit_bias": {}}),
        json!({"response_format": {"type": "text"}}),
        json!({"modalities": ["text"]}),
        json!({"service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s"}),
        json!({"stream": true, "stream_options": {"include_obfuscation": false}}),
        json!({"tools": null, "tool_choice": null, "audio": null, "functions": null}),
        json!({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}),
        json!({"messages": [{"role": "assistant", "content": "no", "refusal": null}]}),
    ] {
        assert_accepted(extra);
    }
}

#[test]
fn parameters_blufio_cannot_honour_are_refused_by_name() {
    let unsupported = Some("unsupported_parameter");
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (json!({"tool_choice": "auto"}), "tool_choice"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"function_call": "auto"}), "function_call"),
        (
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            "audio",
        ),
        (
            json!({"prediction": {"type": "content", "content": "x"}}),
            "prediction",
        ),
        (json!({"reasoning_effort": "high"}), "reasoning_effort"),
        (json!({"web_search_options": {}}), "web_search_options"),
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
        (json!({"presence_penalty": -1}), "presence_penalty"),
        (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
    ] {
        assert_refused(extra, param, unsupported);
    }
}

#[test]
fn non_text_content_parts_are_refused_with_their_path() {
    let unsupported = Some("unsupported_parameter");
    let image = json!({"messages": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "x"}}
        ]}
    ]});
    assert_refused(image, "messages.[1].content.[1].type", unsupported);
    // The payload before its `type` is refused too, without being read.
    let audio_first = json!({"messages": [{"role": "user", "content": [
        {"input_audio": {"data": "x"}, "type": "input_audio"}
    ]}]});
    assert_refused(audio_first, "messages.[0].content.[0].type", unsupported);
    let file = json!({"messages": [{"role": "user", "content": [{"type": "file"}]}]});
    assert_refused(file, "messages.[0].content.[0].type", unsupported);
}

#[test]
fn tool_roles_and_tool_calls_in_messages_are_refused_with_their_path() {
    let unsupported = Some("unsupported_parameter");
    assert_refused(
        json!({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}),
        "messages.[0].role",
        unsupported,
    );
    assert_refused(
        json!({"messages": [{"role": "function", "content": "42"}]}),
        "messages.[0].role",
        unsupported,
    );
    assert_refused(
        json!({"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}),
        "messages.[0].content",
        None,
    );
    assert_refused(
        json!({"messages": [{"role": "assistant", "tool_calls": [], "content": "x"}]}),
        "messages.[0].tool_calls",
        unsupported,
    );
}

#[test]
fn unknown_fields_are_refused_by_name_at_every_level() {
    let unknown = Some("unknown_parameter");
    assert_refused(json!({"temprature": 1}), "temprature", unknown);
    assert_refused(json!({"system": "Anthropic's field"}), "system", unknown);
    assert_refused(
        json!({"stream": true, "stream_options": {"usage": true}}),
        "stream_options.usage",
        unknown,
    );
    assert_refused(
        json!({"messages": [{"role": "user", "content": "x", "cache_control": {}}]}),
        "messages.[0].cache_control",
        unknown,
    );
    assert_refused(
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "x", "extra": 1}
        ]}]}),
        "messages.[0].content.[0].extra",
        unknown,
    );
    let error = refusal(&request_with(json!({"temprature": 1})));
    assert!(error.message.contains("temprature"), "{error}");
}

#[test]
fn missing_empty_and_mistyped_values_name_the_parameter() {
    assert_eq!(
        refusal(br#"{"messages": [{"role": "user", "content": "x"}]}"#)
            .param
            .as_deref(),
        Some("model")
    );
    assert_eq!(
        refusal(br#"{"model": "m"}"#).param.as_deref(),
        Some("messages")
    );
    assert_refused(json!({"model": ""}), "model", Some("invalid_value"));
    assert_refused(json!({"messages": []}), "messages", Some("invalid_value"));
    assert_refused(json!({"temperature": "hot"}), "temperature", None);
    assert_refused(
        json!({"temperature": 2.5}),
        "temperature",
        Some("invalid_value"),
    );
    assert_refused(json!({"top_p": -0.1}), "top_p", Some("invalid_value"));
    assert_refused(json!({"max_tokens": -1}), "max_tokens", None);
    assert_refused(json!({"stream": "yes"}), "stream", None);
    assert_refused(json!({"stop": ["a", 1]}), "stop.[1]", None);
    assert_refused(
        json!({"messages": [{"content": "x"}]}),
        "messages.[0].role",
        None,
    );
    assert_refused(
        json!({"messages": [{"role": "user"}]}),
        "messages.[0].content",
        None,
    );
    assert_refused(
        json!({"messages": [{"role": "user", "content": 5}]}),
        "messages.[0].content",
        None,
    );
    assert_refused(
        json!({"messages": [{"role": "user", "content": []}]}),
        "messages.[0].content",
        Some("invalid_value"),
    );
    assert_refused(
        json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        "messages.[0].content.[0].text",
        None,
    );
    assert_refused(
        json!({"stream_options": {"include_usage": true}}),
        "stream_options",
        Some("invalid_value"),
    );
    assert_refused(
        json!({"metadata": {"k": {"nested": 1}}}),
        "metadata.k",
        None,
    );
    assert_refused(json!({"logit_bias": 5}), "logit_bias", None);
    assert_refused(json!({"logit_bias": [1]}), "logit_bias", None);
}

#[test]
fn a_body_cut_short_in_a_parameter_names_that_parameter() {
    let body = br#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "#;
    for (tail, param) in [
        (&b"\"logit_bias\": {"[..], "logit_bias"),
        (b"\"tools\": nu", "tools"),
        (b"\"stop\": [\"a\", ", "stop.[1]"),
    ] {
        let error = refusal(&[&body[..], tail].concat());
        assert_eq!(error.param.as_deref(), Some(param), "{error}");
        assert!(error.message.contains("not valid JSON"), "{error}");
    }
}

#[test]
fn a_key_given_twice_is_refused() {
    let error =
        refusal(br#"{"model": "a", "model": "b", "messages": [{"role": "user", "content": "x"}]}"#);
    assert_eq!(error.param.as_deref(), Some("model"));
    let error = refusal(
        br#"{"model": "a", "messages": [{"role": "user", "role": "system", "content": "x"}]}"#,
    );
    assert_eq!(error.param.as_deref(), Some("messages.[0].role"));
    for (rest, param) in [
        (
            r#""response_format": {"type": "text", "type": "json_object"}"#,
            "response_format.type",
        ),
        (
            r#""stream": true, "stream_options": {"include_usage": true, "include_usage": false}"#,
            "stream_options.include_usage",
        ),
    ] {
        let body = format!(
            r#"{{"model": "a", "messages": [{{"role": "user", "content": "x"}}], {rest}}}"#
        );
        assert_eq!(
            refusal(body.as_bytes()).param.as_deref(),
            Some(param),
            "{body}"
        );
    }
}

#[test]
fn the_body_must_be_one_object() {
    for body in [
        &br#"["sonnet", []]"#[..],
        b"\"text\"",
        b"null",
        b"",
        b"{} {}",
    ] {
        let error = refusal(body);
        assert_eq!(error.status, 400);
        assert_eq!(error.kind, "invalid_request_error");
    }
}

#[test]
fn the_limits_on_hostile_bodies_are_clear_errors() {
    let messages: Vec<Value> = (0..=MAX_MESSAGES)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    assert_refused(
        json!({"messages": messages}),
        "messages",
        Some("invalid_value"),
    );
    let at_limit: Vec<Value> = (0..MAX_MESSAGES)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    assert_accepted(json!({"messages": at_limit}));

    let parts: Vec<Value> = (0..=MAX_CONTENT_PARTS)
        .map(|_| json!({"type": "text", "text": "x"}))
        .collect();
    assert_refused(
        json!({"messages": [{"role": "user", "content": parts}]}),
        "messages.[0].content",
        Some("invalid_value"),
    );

    let stops: Vec<String> = (0..=MAX_STOP).map(|i| i.to_string()).collect();
    assert_refused(json!({"stop": stops}), "stop", Some("invalid_value"));

    let metadata: serde_json::Map<String, Value> =
        (0..17).map(|i| (i.to_string(), json!("v"))).collect();
    assert_refused(
        json!({"metadata": metadata}),
        "metadata",
        Some("invalid_value"),
    );
}

#[test]
fn deep_nesting_is_refused_without_recursing_through_it() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let body = format!(r#"{{"model": "m", "tools": {deep}, "messages": []}}"#);
    assert_eq!(refusal(body.as_bytes()).param.as_deref(), Some("tools"));
    let body = format!(r#"{{"model": "m", "messages": {deep}}}"#);
    assert_eq!(refusal(body.as_bytes()).status, 400);
    let body = format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": {deep}}}]}}"#);
    assert_eq!(
        refusal(body.as_bytes()).param.as_deref(),
        Some("messages.[0].content.[0]")
    );
}

#[test]
fn truncated_and_garbage_bodies_give_an_error_never_a_panic() {
    let valid = request_with(json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo"}]}],
        "stream": true, "stream_options": {"include_usage": true}, "stop": ["x"],
        "metadata": {"a": "b"}, "response_format": {"type": "text"}
    }));
    assert!(parse_request(&valid).is_ok());
    for end in 0..valid.len() {
        assert_eq!(refusal(&valid[..end]).status, 400, "{end}");
    }
    // Every byte replaced in turn by bytes that break strings, numbers and structure.
    for at in 0..valid.len() {
        for byte in [b'"', b'{', b']', 0xff, b'\\', b'-'] {
            let mut mangled = valid.clone();
            mangled[at] = byte;
            let _ = parse_request(&mangled);
        }
    }
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..2000 {
        let garbage: Vec<u8> = (0..64)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b"{}[]\":,0123456789.eE-truefalsn \\u"[(state % 33) as usize]
            })
            .collect();
        let _ = parse_request(&garbage);
    }
}

#[test]
fn syntax_and_type_errors_say_what_and_where() {
    let mistyped = refusal(&request_with(json!({"temperature": "hot"})));
    assert!(
        mistyped
            .message
            .starts_with("invalid `temperature`: invalid type: string"),
        "{mistyped}"
    );
    assert!(mistyped.message.contains("column"), "{mistyped}");
    let cut = refusal(br#"{"model": "m", "messages": [{"role": "user", "content": "x"#);
    assert_eq!(cut.param.as_deref(), Some("messages.[0].content"));
    assert!(
        cut.message
            .starts_with("the body is not valid JSON (in `messages.[0].content`): EOF"),
        "{cut}"
    );
    let garbage = refusal(b"garbage");
    assert_eq!(garbage.param.as_deref(), Some("body"));
    assert!(
        garbage.message.starts_with("the body is not valid JSON: "),
        "{garbage}"
    );
}
