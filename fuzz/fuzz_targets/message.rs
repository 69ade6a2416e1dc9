//! Fuzzes the gateway's message decoding (HTTP bodies and WebSocket text frames share
//! `gateway::parse_message`) and sends every accepted message through the real exchange with
//! the echo agent.
//!
//! Invariants: decoding never panics; an accepted message is exactly the JSON object it came
//! from (a string `content`, at most `session_id`, `stream` and `model` besides); the echo
//! agent's reply carries the content unchanged and the session's history stays within its
//! limits.
#![no_main]

use std::sync::{Arc, OnceLock};

use blufio::{
    Config, Context, EchoAgent,
    internals::{
        gateway::{self, parse_message},
        metrics::Channel,
        sessions::SessionKind,
    },
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// One daemon context per fuzzing process: building one per input would measure start-up.
fn context() -> &'static Arc<Context> {
    static CONTEXT: OnceLock<Arc<Context>> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        Context::builder(Config::for_tests())
            .with_agent(EchoAgent)
            .build()
            .expect("a context from the test config")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(message) = parse_message(text) else {
        return;
    };
    let value: Value = serde_json::from_str(text).expect("accepted text is JSON");
    let object = value.as_object().expect("accepted JSON is an object");
    assert!(
        object
            .keys()
            .all(|key| ["content", "session_id", "stream", "model"].contains(&key.as_str()))
    );
    assert_eq!(
        object.get("content").and_then(Value::as_str),
        Some(message.content.as_str())
    );
    match &message.session_id {
        Some(id) => assert_eq!(
            object.get("session_id").and_then(Value::as_str),
            Some(id.as_str())
        ),
        None => assert!(object.get("session_id").is_none_or(Value::is_null)),
    }

    let ctx = context();
    let Ok(guard) = ctx.open_session(SessionKind::WebSocket) else {
        panic!("the fuzzer holds one session at a time; admission must not refuse it");
    };
    let content = message.content.clone();
    let reply = async_io::block_on(gateway::exchange(
        ctx,
        guard.session(),
        content,
        message.model.as_deref(),
        Channel::WebSocket,
    ));
    match reply {
        Ok(reply) => {
            assert_eq!(reply.content, message.content);
            let json = reply.to_json();
            assert_eq!(json["content"].as_str(), Some(message.content.as_str()));
        }
        Err(error) => panic!("the echo agent failed: {error}"),
    }
    let info = guard.session().info();
    assert!(info.history_bytes <= ctx.config.gateway.max_history_bytes);
    assert!(info.history_messages <= ctx.config.gateway.max_history_messages);
});
