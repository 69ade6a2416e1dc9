//! Fuzzes whole HTTP/1.x requests through trillium-http's parser and blufio's real handler
//! stack (router, auth, sessions, messages with the echo agent, health, metrics, and
//! `/v1/chat/completions` and `/v1/models` up to the model lookup: the echo agent serves no
//! model alias, so a valid completion ends in a 404 and the upstream path is not reached),
//! in memory.
//!
//! The input is the byte stream a client sends; an in-memory transport hands it to the same
//! `HttpContext::run` loop trillium-server-common uses for a TCP connection, and captures what
//! the daemon writes back. No sockets and no threads per input. Invariants: no panic; every
//! response starts with an HTTP/1.x status line with a valid code; no input makes the daemon
//! answer 500 (an internal error); an error with a body is JSON; a response that says it is
//! JSON is JSON.
#![no_main]

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context as TaskContext, Poll},
};

use blufio::{
    Config, Context, EchoAgent,
    internals::http::{self, Scope},
};
use futures_lite::{AsyncRead, AsyncWrite};
use libfuzzer_sys::fuzz_target;
use trillium::{BoxedHandler, Handler, Info};
use trillium_http::{HttpConfig, HttpContext};

/// The bearer token the fuzzing daemon accepts; the seed corpus uses it.
const CONFIG: &str = "[gateway]\ntoken = \"fuzz-token-0123456789\"\nmax_message_bytes = 4096\n\
                      [agent]\nprovider = \"echo\"\n";

/// The client's bytes in, the daemon's bytes out.
#[derive(Debug)]
struct MemoryTransport {
    input: Vec<u8>,
    position: usize,
    output: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for MemoryTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let rest = &this.input[this.position..];
        let count = rest.len().min(buf.len());
        buf[..count].copy_from_slice(&rest[..count]);
        this.position += count;
        Poll::Ready(Ok(count))
    }
}

impl AsyncWrite for MemoryTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.output
            .lock()
            .expect("not poisoned")
            .extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl trillium::Transport for MemoryTransport {}

/// One daemon (context, handler, HTTP settings) per fuzzing process.
struct Daemon {
    http: Arc<HttpContext>,
    handler: BoxedHandler,
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let config = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("the fuzz config");
        let ctx = Context::builder(config)
            .with_agent(EchoAgent)
            .build()
            .expect("a context");
        // The same HTTP limits the daemon sets (src/daemon.rs).
        let mut http_config = HttpConfig::default();
        http_config.set_received_body_max_len(ctx.config.gateway.max_message_bytes);
        let mut handler = BoxedHandler::new(http::handler(ctx, Scope::All));
        let mut info = Info::from(HttpContext::new().with_config(http_config));
        async_io::block_on(handler.init(&mut info));
        Daemon {
            http: Arc::new(HttpContext::from(info)),
            handler,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let daemon = daemon();
    let output = Arc::new(Mutex::new(Vec::new()));
    let transport = MemoryTransport {
        input: data.to_vec(),
        position: 0,
        output: Arc::clone(&output),
    };
    let handler = &daemon.handler;
    // Errors (malformed heads, closed input) are answered or dropped by trillium, as on TCP.
    let _ = async_io::block_on(daemon.http.clone().run(transport, |conn| async move {
        let conn = trillium::Conn::from(conn);
        let conn = handler.run(conn).await;
        let conn = handler.before_send(conn).await;
        conn.into_inner::<MemoryTransport>()
    }));
    let output = output.lock().expect("not poisoned");
    check_responses(&output);
});

/// Checks every response in `output`, in order, as a client would read them.
fn check_responses(mut output: &[u8]) {
    while !output.is_empty() {
        let head_end = find(output, b"\r\n\r\n").expect("every response has a complete head");
        let head = std::str::from_utf8(&output[..head_end]).expect("response heads are text");
        let status_line = head.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.1 ") || status_line.starts_with("HTTP/1.0 "),
            "bad status line {status_line:?}"
        );
        let status: u16 = status_line[9..]
            .get(..3)
            .and_then(|code| code.parse().ok())
            .expect("a three-digit status");
        assert!((100..600).contains(&status), "status {status}");
        assert_ne!(
            status, 500,
            "input made the daemon fail internally:\n{head}"
        );
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
            })
        };
        let body_start = head_end + 4;
        if status == 101 {
            // A WebSocket upgrade: the rest is frames, not HTTP.
            return;
        }
        let length: usize = match header("content-length") {
            Some(length) => length.parse().expect("a numeric content-length"),
            None if header("transfer-encoding").is_some() => return,
            None => 0,
        };
        let rest = &output[body_start..];
        // A HEAD response declares a length but sends no body; the next response follows.
        let head_only = rest.is_empty() || rest.starts_with(b"HTTP/1.");
        let length = if head_only { 0 } else { length };
        let body = rest.get(..length).expect("the body is as long as declared");
        if !head_only
            && header("content-type").is_some_and(|kind| kind.starts_with("application/json"))
        {
            serde_json::from_slice::<serde_json::Value>(body)
                .unwrap_or_else(|error| panic!("a JSON response that is not JSON: {error}"));
        }
        output = &output[body_start + length..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
