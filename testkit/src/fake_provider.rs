//! A fake model provider on 127.0.0.1:0 (plain HTTP or TLS with a CA made in the test): it
//! answers scripted responses in order, records every request, counts connections and
//! notices when a client cuts a stream.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The server side of TLS; nothing can be one in a build without the `tls` feature.
#[cfg(feature = "tls")]
pub type TlsConfig = Arc<rustls::ServerConfig>;
#[cfg(not(feature = "tls"))]
pub type TlsConfig = std::convert::Infallible;

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// A JSON (or any) body with a status and extra headers.
    Body {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Waits, then answers 200 with the body.
    Slow(Duration, String),
    /// An event stream: each chunk is written and flushed, `gap` apart. With `hang`, the
    /// server then keeps the stream open (sending comments) until the client goes away.
    Stream {
        chunks: Vec<String>,
        gap: Duration,
        hang: bool,
    },
    /// Says nothing at all (not even a status line) for a while, then answers as the inner one.
    Delayed(Duration, Box<Scripted>),
}

impl Scripted {
    pub fn ok(body: &str) -> Scripted {
        Scripted::Body {
            status: 200,
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    /// A stream of `chunks` 5 ms apart that then hangs (sending comments) until the client
    /// goes away.
    pub fn hanging(chunks: Vec<String>) -> Scripted {
        Scripted::Stream {
            chunks,
            gap: Duration::from_millis(5),
            hang: true,
        }
    }

    pub fn status(status: u16, headers: &[(&str, &str)], body: &str) -> Scripted {
        Scripted::Body {
            status,
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            body: body.to_owned(),
        }
    }
}

/// A request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::http::find_header(&self.headers, name)
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Scripted>>,
    fallback: Mutex<Option<Scripted>>,
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    stream_cut: AtomicBool,
    stopping: AtomicBool,
}

/// The running fake.
pub struct FakeProvider {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
}

impl FakeProvider {
    /// Starts a plain-HTTP fake.
    pub fn start() -> FakeProvider {
        FakeProvider::start_with(None)
    }

    /// Starts a fake; with a TLS config it speaks HTTPS.
    pub fn start_with(tls: Option<TlsConfig>) -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accept_shared = Arc::clone(&shared);
        let is_tls = tls.is_some();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                accept_shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&accept_shared);
                #[cfg_attr(not(feature = "tls"), allow(clippy::clone_on_copy))]
                let tls = tls.clone();
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    match tls {
                        #[cfg(not(feature = "tls"))]
                        Some(never) => match never {},
                        #[cfg(feature = "tls")]
                        Some(config) => {
                            let connection = rustls::ServerConnection::new(config).unwrap();
                            serve(rustls::StreamOwned::new(connection, stream), &shared);
                        }
                        None => serve(stream, &shared),
                    }
                });
            }
        });
        FakeProvider {
            addr,
            tls: is_tls,
            shared,
        }
    }

    /// The base URL to configure as `[agent] base_url`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Queues answers, used in order.
    pub fn push(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.shared.script.lock().unwrap().extend(answers);
    }

    /// Sets the answer used once the queue is empty.
    pub fn set_fallback(&self, answer: Scripted) {
        *self.shared.fallback.lock().unwrap() = Some(answer);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until a client cut a stream short; returns whether it did.
    pub fn wait_for_stream_cut(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.shared.stream_cut.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve<S: Read + Write>(stream: S, shared: &Shared) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, value)| value.parse::<usize>().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let close = headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
        });
        shared.requests.lock().unwrap().push(Recorded {
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        });
        let answer = shared
            .script
            .lock()
            .unwrap()
            .pop_front()
            .or_else(|| shared.fallback.lock().unwrap().clone())
            .expect("the fake provider has an answer scripted");
        let stream = reader.get_mut();
        let mut answer = answer;
        while let Scripted::Delayed(wait, inner) = answer {
            std::thread::sleep(wait);
            answer = *inner;
        }
        let keep_going = match answer {
            Scripted::Body {
                status,
                headers,
                body,
            } => write_body(stream, status, &headers, &body),
            Scripted::Slow(wait, body) => {
                std::thread::sleep(wait);
                write_body(stream, 200, &[], &body)
            }
            Scripted::Stream { chunks, gap, hang } => {
                if write_stream(stream, &chunks, gap, hang).is_err() {
                    shared.stream_cut.store(true, Ordering::SeqCst);
                }
                false
            }
            Scripted::Delayed(..) => unreachable!("unwrapped above"),
        };
        if !keep_going || close {
            return;
        }
    }
}

fn write_body<S: Write>(
    stream: &mut S,
    status: u16,
    headers: &[(String, String)],
    body: &str,
) -> bool {
    let mut head = format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).is_ok()
        && stream.write_all(body.as_bytes()).is_ok()
        && stream.flush().is_ok()
}

fn write_stream<S: Write>(
    stream: &mut S,
    chunks: &[String],
    gap: Duration,
    hang: bool,
) -> std::io::Result<()> {
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    stream.flush()?;
    let mut chunk = |text: &str| -> std::io::Result<()> {
        write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
        stream.flush()
    };
    for text in chunks {
        chunk(text)?;
        std::thread::sleep(gap);
    }
    if hang {
        // Until the client goes away (bounded, so a broken test cannot hang forever).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            chunk(": still thinking\n\n")?;
            std::thread::sleep(Duration::from_millis(25));
        }
        return Ok(());
    }
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()
}

/// Anthropic's documented reply body, ended by `end_turn`.
pub fn anthropic_reply(text: &str, input_tokens: u64, output_tokens: u64) -> String {
    anthropic_reply_stopped(text, "end_turn", input_tokens, output_tokens)
}

/// Anthropic's documented reply body with its `stop_reason` (`end_turn`, `max_tokens`,
/// `stop_sequence`).
pub fn anthropic_reply_stopped(
    text: &str,
    stop_reason: &str,
    input_tokens: u64,
    output_tokens: u64,
) -> String {
    serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    })
    .to_string()
}

/// OpenAI's documented reply body, ended by `stop`.
pub fn openai_reply(text: &str, prompt_tokens: u64, completion_tokens: u64) -> String {
    openai_reply_finished(text, "stop", prompt_tokens, completion_tokens)
}

/// The `created` of every OpenAI-shaped answer of the fake (a fixed time: answers are
/// compared whole).
pub const OPENAI_CREATED: u64 = 1_700_000_000;

/// OpenAI's documented reply body with its `finish_reason` (`stop`, `length`), every field
/// the official SDKs require present, so a client validating strictly accepts it.
pub fn openai_reply_finished(
    text: &str,
    finish_reason: &str,
    prompt_tokens: u64,
    completion_tokens: u64,
) -> String {
    serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": OPENAI_CREATED,
        "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": null}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })
    .to_string()
}

/// Anthropic's documented event stream for `deltas`, as SSE chunks (one event per chunk).
pub fn anthropic_stream(deltas: &[&str], input_tokens: u64, output_tokens: u64) -> Vec<String> {
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut chunks = vec![event(
        "message_start",
        serde_json::json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
    )];
    chunks.push(event(
        "content_block_start",
        serde_json::json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
    ));
    chunks.push(event("ping", serde_json::json!({"type": "ping"})));
    for delta in deltas {
        chunks.push(event(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": delta}}),
        ));
    }
    chunks.push(event(
        "content_block_stop",
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    ));
    chunks.push(event(
        "message_delta",
        serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": output_tokens}}),
    ));
    chunks.push(event(
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    ));
    chunks
}

/// OpenAI's documented chunk stream for `deltas` (the first one carrying the role, the last
/// one `finish_reason`),
/// ending with the usage chunk and `[DONE]`: one chunk per delta, then those two, so a test
/// can remove the usage chunk by its index.
pub fn openai_stream(deltas: &[&str], prompt_tokens: u64, completion_tokens: u64) -> Vec<String> {
    let data = |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut chunk = serde_json::json!({"id": "c1", "object": "chat.completion.chunk",
            "created": OPENAI_CREATED, "model": "test-model", "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    let mut chunks: Vec<String> = deltas
        .iter()
        .enumerate()
        .map(|(index, delta)| {
            let finish_reason = (index + 1 == deltas.len()).then_some("stop");
            let mut delta = serde_json::json!({"content": delta});
            if index == 0 {
                delta["role"] = "assistant".into();
            }
            data(
                serde_json::json!([{"index": 0, "delta": delta,
                    "finish_reason": finish_reason}]),
                None,
            )
        })
        .collect();
    chunks.push(data(
        serde_json::json!([]),
        Some(serde_json::json!({"prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens})),
    ));
    chunks.push("data: [DONE]\n\n".to_owned());
    chunks
}

/// An Anthropic stream of "partial" (`input_tokens` in its `message_start`) cut after its
/// first text delta, that then hangs: the upstream keeps "thinking".
pub fn anthropic_hanging(input_tokens: u64) -> Scripted {
    let mut chunks = anthropic_stream(&["partial"], input_tokens, 0);
    chunks.truncate(4);
    Scripted::hanging(chunks)
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, server TLS config).
#[cfg(feature = "tls")]
pub fn tls_pair() -> (String, Arc<rustls::ServerConfig>) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "blufio test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![server_cert.der().clone()], key)
    .unwrap();
    (ca_cert.pem(), Arc::new(config))
}
