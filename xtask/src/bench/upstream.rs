//! The fake upstream of the gateway scenario: an OpenAI Chat Completions server in this
//! process, fast enough that the bench measures blufio and not it.
//!
//! One thread per connection with blocking sockets and HTTP/1.1 keep-alive: a request costs
//! the fake one read, a scan for three keys and one write of an answer made once per
//! connection, a few microseconds, where a Python fake would be the bottleneck. `POST /v1/chat/completions` answers a `chat.completion` with
//! usage, or with `"stream": true` the `chat.completion.chunk` events and `data: [DONE]` in
//! chunked framing (with the usage chunk when `stream_options.include_usage` is set). A
//! request for the model [`SLOW_MODEL`] gets a held stream: the first chunk at once, then a
//! chunk every [`HOLD_TICK`] until [`FakeUpstream::release`], as a model thinking between
//! tokens. It checks no API key and keeps no request: it is a load target, not a test double
//! (that is `blufio_testkit::fake_provider`).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use super::chunked::{self, LAST_CHUNK, encode_chunk, find};
use crate::json;
use crate::project::Result;

/// The upstream model id whose streams are held until released.
pub(super) const SLOW_MODEL: &str = "slow";
/// How often a held stream sends a chunk.
pub(super) const HOLD_TICK: Duration = Duration::from_secs(2);
/// The answer's text; streamed as its first word, then the rest.
const CONTENT: (&str, &str) = ("Hello", " from the fake upstream.");
const PROMPT_TOKENS: u64 = 12;
const COMPLETION_TOKENS: u64 = 7;
/// A fixed `created`, so answers cost no clock read.
const CREATED: u64 = 1_764_000_000;
/// Stack of a connection thread: it parses small bodies, and 1,000 held streams should
/// not reserve 8 MiB each.
const THREAD_STACK: usize = 256 * 1024;

/// A running fake upstream on `127.0.0.1:0`; dropping it stops accepting and ends held
/// streams.
#[derive(Debug)]
pub(super) struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    stopped: AtomicBool,
    /// Bumped by `release`; a held stream ends when it differs from the value it started with.
    generation: Mutex<u64>,
    released: Condvar,
    /// Streams that sent their first chunk and wait for a release.
    held: AtomicUsize,
    /// Completions answered (plain or streamed), to prove the load reached the fake.
    completions: AtomicU64,
    /// Connections accepted, to show whether blufio reuses its upstream connections.
    connections: AtomicU64,
}

impl FakeUpstream {
    pub(super) fn start() -> Result<FakeUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|error| format!("fake upstream: cannot bind 127.0.0.1:0: {error}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        thread::Builder::new()
            .name("fake-upstream".to_owned())
            .spawn(move || accept(&listener, &accepting))?;
        Ok(FakeUpstream { addr, shared })
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns how many streams are held open now.
    pub(super) fn held(&self) -> usize {
        self.shared.held.load(Ordering::Acquire)
    }

    /// Returns how many completions were answered so far.
    pub(super) fn completions(&self) -> u64 {
        self.shared.completions.load(Ordering::Relaxed)
    }

    /// Returns how many connections were accepted so far.
    pub(super) fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Lets every held stream finish: its last chunks, usage and `data: [DONE]`.
    pub(super) fn release(&self) {
        let mut generation = self
            .shared
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation += 1;
        self.shared.released.notify_all();
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.release();
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else {
            // Out of file descriptors or threads: the peer sees a refused or reset
            // connection, which the bench reports; back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("fake-upstream-conn".to_owned())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                // A connection ends when its peer closes it or sends nonsense; either way there
                // is nobody to tell.
                let _ = serve(stream, &shared);
            });
        if spawned.is_err() {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Serves one keep-alive connection until the peer closes it.
fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = Vec::with_capacity(8 * 1024);
    let mut output = Vec::with_capacity(4 * 1024);
    // The last completion answered on this connection: the model, the whole response.
    let mut cached = (String::new(), Vec::new());
    let mut scratch = [0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(end) = find(&input, b"\r\n\r\n") {
                break end;
            }
            let read = stream.read(&mut scratch)?;
            if read == 0 {
                return Ok(());
            }
            input.extend_from_slice(&scratch[..read]);
        };
        let head = parse_head(&input[..head_end]).map_err(invalid)?;
        input.drain(..head_end + 4);
        if head.expect_continue {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if head.chunked {
            let mut body = Vec::new();
            loop {
                let decoded = chunked::decode(&input, &mut body).map_err(invalid)?;
                input.drain(..decoded.consumed);
                if decoded.done {
                    break body;
                }
                let read = stream.read(&mut scratch)?;
                if read == 0 {
                    return Ok(());
                }
                input.extend_from_slice(&scratch[..read]);
            }
        } else {
            while input.len() < head.content_length {
                let read = stream.read(&mut scratch)?;
                if read == 0 {
                    return Ok(());
                }
                input.extend_from_slice(&scratch[..read]);
            }
            input.drain(..head.content_length).collect()
        };
        output.clear();
        match answer(&head, &body) {
            Answer::Completion { model } => {
                shared.completions.fetch_add(1, Ordering::Relaxed);
                // A connection asks for one model again and again: its answer is made once.
                if cached.0 != model {
                    cached.0 = model.to_owned();
                    cached.1.clear();
                    write_json(&mut cached.1, 200, &completion(model));
                }
                stream.write_all(&cached.1)?;
            }
            Answer::Error { status, body } => {
                write_json(&mut output, status, &body);
                stream.write_all(&output)?;
            }
            Answer::Stream {
                model,
                include_usage,
            } => {
                shared.completions.fetch_add(1, Ordering::Relaxed);
                output.extend_from_slice(STREAM_HEAD);
                encode_chunk(&mut output, first_event(model).as_bytes());
                if model == SLOW_MODEL {
                    stream.write_all(&output)?;
                    hold(&mut stream, shared)?;
                    output.clear();
                }
                encode_chunk(&mut output, rest_events(model, include_usage).as_bytes());
                output.extend_from_slice(LAST_CHUNK);
                stream.write_all(&output)?;
            }
        }
        if head.close {
            return Ok(());
        }
    }
}

/// Sends a chunk every [`HOLD_TICK`] until the next release.
fn hold(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    let lock = || {
        shared
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    let started = *lock();
    shared.held.fetch_add(1, Ordering::AcqRel);
    let result = loop {
        let (generation, _) = shared
            .released
            .wait_timeout_while(lock(), HOLD_TICK, |generation| *generation == started)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *generation != started {
            break Ok(());
        }
        drop(generation);
        let mut tick = Vec::with_capacity(256);
        encode_chunk(&mut tick, delta_event(SLOW_MODEL, " .").as_bytes());
        if let Err(error) = stream.write_all(&tick) {
            break Err(error);
        }
    };
    shared.held.fetch_sub(1, Ordering::AcqRel);
    result
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// What the fake needs of a request head.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) content_length: usize,
    pub(super) chunked: bool,
    pub(super) expect_continue: bool,
    pub(super) close: bool,
}

/// Parses a request head (without its blank line).
pub(super) fn parse_head(bytes: &[u8]) -> std::result::Result<Head, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "request head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut words = request_line.split(' ');
    let (Some(method), Some(path), Some(_version)) = (words.next(), words.next(), words.next())
    else {
        return Err(format!("malformed request line `{request_line}`"));
    };
    let mut head = Head {
        method: method.to_owned(),
        path: path.to_owned(),
        ..Head::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line `{line}`"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value
                .parse()
                .map_err(|_| format!("malformed Content-Length `{value}`"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(head)
}

/// The fake's answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer<'a> {
    Completion { model: &'a str },
    Stream { model: &'a str, include_usage: bool },
    Error { status: u16, body: String },
}

/// Decides the answer to a request: a completion, a stream, or an OpenAI-shaped error.
pub(super) fn answer<'a>(head: &Head, body: &'a [u8]) -> Answer<'a> {
    if head.path != "/v1/chat/completions" {
        return error(404, "unknown path", "not_found");
    }
    if head.method != "POST" {
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

fn delta_event(model: &str, text: &str) -> String {
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

const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
    Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

fn write_json(output: &mut Vec<u8>, status: u16, body: &str) {
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
    use std::time::Instant;

    use serde_json::Value;

    use super::super::client::Client;
    use super::super::stream::{StreamClient, Tally, scan_events};
    use super::*;

    fn post(body: &str, extra: &str) -> Vec<u8> {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn request_heads_give_framing_and_expectations() {
        let head = parse_head(
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 42\r\nExpect: 100-continue\r\nConnection: close",
        )
        .unwrap();
        assert_eq!(
            head,
            Head {
                method: "POST".to_owned(),
                path: "/v1/chat/completions".to_owned(),
                content_length: 42,
                chunked: false,
                expect_continue: true,
                close: true,
            }
        );
        let head = parse_head(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked").unwrap();
        assert!(head.chunked && !head.close);
        let error = parse_head(b"POST /\r\nHost: x").unwrap_err();
        assert!(error.contains("request line"), "{error}");
        let error = parse_head(b"POST / HTTP/1.1\r\nContent-Length: many").unwrap_err();
        assert!(error.contains("`many`"), "{error}");
    }

    #[test]
    fn a_plain_request_gets_a_completion_with_usage_for_its_model() {
        let head = parse_head(b"POST /v1/chat/completions HTTP/1.1").unwrap();
        assert_eq!(
            answer(&head, br#"{"model":"fast","messages":[]}"#),
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
        let post = parse_head(b"POST /v1/chat/completions HTTP/1.1").unwrap();
        let get = parse_head(b"GET /v1/chat/completions HTTP/1.1").unwrap();
        let elsewhere = parse_head(b"POST /v1/messages HTTP/1.1").unwrap();
        for (head, body, want) in [
            (&post, &b"{"[..], 400),
            (&post, br#"{"messages":[]}"#, 400),
            (&get, br#"{"model":"fast"}"#, 405),
            (&elsewhere, br#"{"model":"fast"}"#, 404),
        ] {
            let Answer::Error { status, body } = answer(head, body) else {
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
        let head = parse_head(b"POST /v1/chat/completions HTTP/1.1").unwrap();
        let request = br#"{"model":"fast","stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(
            answer(&head, request),
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

    #[test]
    fn the_fake_serves_completions_and_streams_on_one_keep_alive_connection() {
        let fake = FakeUpstream::start().unwrap();
        let mut client = Client::connect(fake.addr()).unwrap();
        for _ in 0..3 {
            let (status, body) = client.send(&post(r#"{"model":"fast"}"#, "")).unwrap();
            assert_eq!(status, 200);
            assert!(body.ends_with(b"\"total_tokens\":19}}"));
        }
        drop(client);
        let mut stream =
            StreamClient::open(fake.addr(), &post(r#"{"model":"fast","stream":true}"#, ""))
                .unwrap();
        assert!(stream.finish().unwrap());
        assert_eq!(stream.tally.chunks, 3);
        assert_eq!(fake.completions(), 4);
    }

    #[test]
    fn the_fake_reads_bodies_after_100_continue_and_chunked_bodies() {
        let fake = FakeUpstream::start().unwrap();
        let mut stream = TcpStream::connect(fake.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // trillium-client asks before sending a body over 1 KiB.
        let body = r#"{"model":"fast"}"#;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(body.as_bytes()).unwrap();
        let mut chunked_request =
            b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        encode_chunk(&mut chunked_request, br#"{"model":"#);
        encode_chunk(&mut chunked_request, br#""fast"}"#);
        chunked_request.extend_from_slice(LAST_CHUNK);
        stream.write_all(&chunked_request).unwrap();
        let mut answers = Vec::new();
        let mut buffer = [0u8; 4096];
        while answers
            .windows(8)
            .filter(|window| window == b"\"stop\"}]")
            .count()
            < 2
        {
            let read = stream.read(&mut buffer).unwrap();
            assert!(read > 0, "{}", String::from_utf8_lossy(&answers));
            answers.extend_from_slice(&buffer[..read]);
        }
        assert_eq!(fake.completions(), 2);
    }

    #[test]
    fn a_slow_stream_is_held_after_its_first_chunk_until_released() {
        let fake = FakeUpstream::start().unwrap();
        let request = post(r#"{"model":"slow","stream":true}"#, "");
        let mut streams: Vec<StreamClient> = (0..3)
            .map(|_| StreamClient::open(fake.addr(), &request).unwrap())
            .collect();
        for stream in &mut streams {
            stream.wait_first_chunk().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.held() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fake.held(), 3);
        assert!(!streams[0].tally.done);
        fake.release();
        for stream in &mut streams {
            assert!(stream.finish().unwrap());
        }
        assert_eq!(fake.held(), 0);
    }
}
