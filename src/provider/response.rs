//! Reading the upstream's answer: a whole JSON reply, or an event stream relayed to the
//! client delta by delta. Both are bounded, so a broken or hostile upstream cannot make the
//! daemon buffer without limit.

use futures_lite::AsyncReadExt;
use trillium_client::Conn;

use super::{
    chat::{Parsed, StreamItem},
    sse::SseParser,
    wire::Wire,
};
use crate::agent::{AgentError, DeltaSender};

/// The largest reply read from the upstream (a non-streamed body, or a stream's text).
const MAX_REPLY_BYTES: u64 = 4 * 1024 * 1024;
/// What one read of an upstream's event stream takes, at most. Held for the whole stream, and
/// streamed events are a few hundred bytes: a larger buffer only costs every stream in
/// flight more memory.
const STREAM_READ_BYTES: usize = 2 * 1024;
/// The largest event-stream line or event read from the upstream.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Reads and parses a non-streamed reply.
pub(crate) async fn read_reply(wire: Wire, conn: &mut Conn) -> Result<Parsed, AgentError> {
    // Bytes, not `read_string`: JSON is UTF-8 (RFC 8259), and decoding by the declared
    // charset would link every encoding_rs table (about 150 KB of the binary).
    let body = conn
        .response_body()
        .with_max_len(MAX_REPLY_BYTES)
        .read_bytes()
        .await
        .map_err(|error| AgentError::Upstream(format!("cannot read the reply: {error}")))?;
    let body = String::from_utf8(body)
        .map_err(|_| AgentError::Malformed("the reply is not UTF-8".to_owned()))?;
    wire.parse_reply(&body).map_err(AgentError::Malformed)
}

/// Reads an event stream to its final event, sending each text delta through `deltas` and
/// reporting usage as it arrives; returns the whole text and the last usage reported.
pub(crate) async fn read_stream(
    wire: Wire,
    conn: &mut Conn,
    deltas: &DeltaSender,
) -> Result<Parsed, AgentError> {
    let mut body = conn.response_body();
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    let mut buffer = vec![0; STREAM_READ_BYTES];
    let mut events = Vec::new();
    let mut reply = Parsed::default();
    let mut done = false;
    while !done {
        let read = body
            .read(&mut buffer)
            .await
            .map_err(|error| AgentError::Upstream(format!("the reply stream broke: {error}")))?;
        if read == 0 {
            return Err(AgentError::Upstream(
                "the reply stream ended before its final event".to_owned(),
            ));
        }
        let chunk = buffer.get(..read).unwrap_or_default();
        parser
            .push(chunk, &mut events)
            .map_err(|error| AgentError::Malformed(error.to_string()))?;
        for event in events.drain(..) {
            for item in wire.parse_event(&event).map_err(AgentError::Malformed)? {
                done |= take(item, &mut reply, deltas).await?;
            }
        }
    }
    Ok(reply)
}

/// Applies one stream item to the reply so far; returns whether it was the final event.
async fn take(
    item: StreamItem,
    reply: &mut Parsed,
    deltas: &DeltaSender,
) -> Result<bool, AgentError> {
    match item {
        StreamItem::Delta(text) => {
            if reply.content.len() + text.len() > MAX_REPLY_BYTES as usize {
                return Err(AgentError::Malformed(format!(
                    "the streamed reply is longer than {MAX_REPLY_BYTES} bytes"
                )));
            }
            reply.content.push_str(&text);
            if deltas.send(&text).await.is_err() {
                return Err(AgentError::Upstream(
                    "the client went away mid-stream".to_owned(),
                ));
            }
        }
        StreamItem::Usage {
            model,
            input_tokens,
            output_tokens,
        } => {
            deltas.report_usage(model.as_deref(), input_tokens, output_tokens);
            reply.model = model.or(reply.model.take());
            reply.input_tokens = input_tokens.or(reply.input_tokens);
            reply.output_tokens = output_tokens.or(reply.output_tokens);
        }
        StreamItem::Finish(reason) => reply.finish = Some(reason),
        StreamItem::Done => return Ok(true),
        StreamItem::Failed(kind) => {
            return Err(AgentError::Upstream(format!(
                "the reply stream reported an error: {kind}"
            )));
        }
        StreamItem::Nothing => {}
    }
    Ok(false)
}
