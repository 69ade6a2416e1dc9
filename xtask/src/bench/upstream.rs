//! The fake upstream of the gateway scenario: an OpenAI Chat Completions server in this
//! process, fast enough that the bench measures blufio and not it.
//!
//! One thread per connection with blocking sockets and HTTP/1.1 keep-alive: a request costs
//! the fake one read, a scan for three keys and one write of an answer made once per
//! connection, a few microseconds, where a Python fake would be the bottleneck.
//! `POST /v1/chat/completions` answers a `chat.completion` with usage, or with
//! `"stream": true` the `chat.completion.chunk` events and `data: [DONE]` in chunked framing
//! (with the usage chunk when `stream_options.include_usage` is set); the bytes are made in
//! `reply.rs`. A request for the model [`SLOW_MODEL`] gets a held stream: the first chunk at
//! once, then a chunk every [`HOLD_TICK`] until [`FakeUpstream::release`], as a model thinking
//! between tokens. It checks no API key and keeps no request: it is a load target, not a test
//! double (that is `blufio_testkit::fake_provider`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use super::chunked::{self, LAST_CHUNK, encode_chunk, find};
use super::reply::{
    Answer, STREAM_HEAD, answer, completion, delta_event, first_event, rest_events, write_json,
};
use crate::project::Result;

/// The upstream model id whose streams are held until released.
pub(super) const SLOW_MODEL: &str = "slow";
/// How often a held stream sends a chunk.
pub(super) const HOLD_TICK: Duration = Duration::from_secs(2);
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
    /// Connections open now.
    open: AtomicUsize,
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

    /// Returns how many connections are open now.
    pub(super) fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
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
                shared.open.fetch_add(1, Ordering::AcqRel);
                // A connection ends when its peer closes it or sends nonsense; either way there
                // is nobody to tell.
                let _ = serve(stream, &shared);
                shared.open.fetch_sub(1, Ordering::AcqRel);
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
        match answer(&head.method, &head.path, &body) {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::client::Client;
    use super::super::stream::StreamClient;
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
