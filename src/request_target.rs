//! Absolute-form request targets (`GET http://host/health HTTP/1.1`) turned into origin form
//! before trillium-http parses them, and request lines longer than the head limit refused with
//! their own error (answered 414 by the listener).
//!
//! RFC 9112 §3.2.2 says a server must accept the absolute form and ignore `Host` in favour of
//! the target's authority. trillium-http 1.6.1 refuses such a request with 400 whenever the
//! authority and `Host` differ, so [`RequestTargetTransport`] (outside the deadline transport,
//! which still sees every byte as it arrives) rewrites the request line of each request that
//! starts on a fresh read: blufio serves no virtual hosts, so the authority
//! carries nothing it needs. Pipelined requests that trillium has already buffered are left as
//! they are. It does not validate anything else: the parser does.

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures_lite::{AsyncRead, AsyncWrite};
use trillium::Transport;

use crate::{
    connection::{MemoryCharge, Phase, Tracked},
    transport::{async_read_into, forward_async_write, forward_transport},
};

/// The longest request line, CRLF included: the parser's whole head limit (trillium-http's
/// `head_max_len`, 8 KiB). A longer one ends the connection with [`RequestLineTooLong`], which
/// the listener answers with 414 rather than the parser's 431.
pub(crate) const MAX_LINE: usize = 8 * 1024;

/// The error a request line longer than [`MAX_LINE`] fails its read with.
#[derive(Debug)]
pub(crate) struct RequestLineTooLong;

impl fmt::Display for RequestLineTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request line longer than {MAX_LINE} bytes")
    }
}

impl std::error::Error for RequestLineTooLong {}

/// Returns whether `error` is a [`RequestLineTooLong`].
pub(crate) fn is_request_line_too_long(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<RequestLineTooLong>())
}

fn request_line_too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, RequestLineTooLong)
}

/// Returns whether a request line of `length` bytes (CRLF excluded) cannot fit in a head.
fn too_long(length: usize) -> bool {
    length + 2 > MAX_LINE
}

/// Rewrites absolute-form request targets to origin form; see the module docs.
#[derive(Debug)]
pub struct RequestTargetTransport<T> {
    inner: T,
    tracked: Arc<Tracked>,
    line: Vec<u8>,
    pending: Vec<u8>,
    /// The request count when the last request line was taken; a new one starts after it.
    line_taken_at: Option<u64>,
    /// `line` and `pending` charged to the connection: a request line that arrives in pieces
    /// is held here, not in trillium-http's head buffer.
    charge: MemoryCharge,
}

impl<T> RequestTargetTransport<T> {
    /// Wraps `inner`; `tracked` tells where each request starts.
    pub fn new(inner: T, tracked: Arc<Tracked>) -> RequestTargetTransport<T> {
        RequestTargetTransport {
            charge: MemoryCharge::new(Some(Arc::clone(&tracked))),
            inner,
            tracked,
            line: Vec::new(),
            pending: Vec::new(),
            line_taken_at: None,
        }
    }

    /// Keeps the charge at what the two buffers hold.
    fn recharge(&mut self) {
        self.charge
            .set((self.line.capacity() + self.pending.capacity()) as u64);
    }

    /// Hands on the collected line (rewritten when it ends at `end` in absolute form).
    fn take_line(&mut self, end: Option<usize>, requests: u64, buf: &mut [u8]) -> usize {
        let mut line = std::mem::take(&mut self.line);
        if let Some(end) = end
            && let Some(rewritten) = line.get(..end).and_then(origin_form)
        {
            line.splice(..end, rewritten);
        }
        self.pending = line;
        self.line_taken_at = Some(requests);
        self.serve_pending(buf)
    }

    fn serve_pending(&mut self, buf: &mut [u8]) -> usize {
        let count = self.pending.len().min(buf.len());
        if let (Some(out), Some(from)) = (buf.get_mut(..count), self.pending.get(..count)) {
            out.copy_from_slice(from);
        }
        self.pending.drain(..count);
        if self.pending.is_empty() {
            // Handed on whole: free it rather than keep its capacity for the connection's life.
            self.pending = Vec::new();
        }
        self.recharge();
        count
    }
}

/// Returns the origin form of `line` when its target is in absolute form, else `None`.
pub fn origin_form(line: &[u8]) -> Option<Vec<u8>> {
    let mut parts = line.splitn(3, |byte| *byte == b' ');
    let (method, target, rest) = (parts.next()?, parts.next()?, parts.next()?);
    // Only a request line: a method token and an HTTP version, never a header line such as
    // `Referer: http://… x` that a pipelined head might put at the start of a read.
    if method.is_empty()
        || !method.iter().all(u8::is_ascii_uppercase)
        || !rest.starts_with(b"HTTP/")
    {
        return None;
    }
    let has_prefix = |prefix: &[u8]| {
        target
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    };
    let after_scheme = if has_prefix(b"http://") {
        target.get(7..)?
    } else if has_prefix(b"https://") {
        target.get(8..)?
    } else {
        return None;
    };
    let path = match after_scheme
        .iter()
        .position(|byte| matches!(byte, b'/' | b'?'))
    {
        Some(start) => {
            let path = after_scheme.get(start..)?;
            if path.starts_with(b"?") {
                [b"/".as_slice(), path].concat()
            } else {
                path.to_vec()
            }
        }
        None => b"/".to_vec(),
    };
    Some([method, b" ", &path, b" ", rest].concat())
}

async_read_into!(RequestTargetTransport<T>, T: AsyncRead + Unpin);

impl<T: AsyncRead + Unpin> RequestTargetTransport<T> {
    fn read_into(&mut self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(self.serve_pending(buf)));
        }
        // A request line is taken once per request: after the previous one reached its handler
        // (the count moved on), and not from a body or a WebSocket.
        let requests = self.tracked.requests();
        let phase = self.tracked.phase();
        if matches!(phase, Phase::Idle | Phase::Head) && self.line_taken_at != Some(requests) {
            // The common case: the whole request line arrives in self read and is already in
            // origin form. It goes straight to the caller, without a copy or an allocation.
            if self.line.is_empty() {
                let read = match Pin::new(&mut self.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(read)) => read,
                    other => return other,
                };
                let received = buf.get(..read).unwrap_or_default();
                let end = received.windows(2).position(|pair| pair == b"\r\n");
                match end.and_then(|end| received.get(..end)) {
                    Some(line) if too_long(line.len()) => {
                        return Poll::Ready(Err(request_line_too_long()));
                    }
                    Some(line) if origin_form(line).is_none() => {
                        self.line_taken_at = Some(requests);
                        return Poll::Ready(Ok(read));
                    }
                    _ if read == 0 => return Poll::Ready(Ok(0)),
                    // Absolute form, or a line still incomplete: collect it below.
                    _ => {
                        self.line.extend_from_slice(received);
                        self.recharge();
                    }
                }
            }
            // Collect the request line, then hand it on (rewritten if absolute-form).
            let mut chunk = [0u8; 1024];
            loop {
                let end = self.line.windows(2).position(|pair| pair == b"\r\n");
                if too_long(end.unwrap_or(self.line.len())) {
                    self.line = Vec::new();
                    return Poll::Ready(Err(request_line_too_long()));
                }
                if end.is_some() {
                    return Poll::Ready(Ok(self.take_line(end, requests, buf)));
                }
                let read = match Pin::new(&mut self.inner).poll_read(cx, &mut chunk) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(read)) => read,
                };
                if read == 0 {
                    return Poll::Ready(Ok(self.take_line(None, requests, buf)));
                }
                self.line
                    .extend_from_slice(chunk.get(..read).unwrap_or_default());
                self.recharge();
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(RequestTargetTransport<T>, inner, T: AsyncWrite + Unpin);
forward_transport!(RequestTargetTransport<T>, inner, T: Transport);

#[cfg(test)]
mod tests {
    use super::origin_form;

    #[test]
    fn absolute_form_becomes_origin_form() {
        let cases: [(&[u8], &[u8]); 4] = [
            (
                b"GET http://example.com/health HTTP/1.1",
                b"GET /health HTTP/1.1",
            ),
            (b"GET HTTPS://example.com:8443 HTTP/1.1", b"GET / HTTP/1.1"),
            (b"GET http://u@h?x=1 HTTP/1.1", b"GET /?x=1 HTTP/1.1"),
            (
                b"POST http://h/v1/messages?a HTTP/1.1",
                b"POST /v1/messages?a HTTP/1.1",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(origin_form(line).as_deref(), Some(expected));
        }
    }

    #[test]
    fn other_forms_are_left_alone() {
        for line in [
            b"GET /health HTTP/1.1".as_slice(),
            b"OPTIONS * HTTP/1.1",
            b"CONNECT example.com:443 HTTP/1.1",
            b"PRI * HTTP/2.0",
            b"GET http://nospace",
            b"Referer: http://example.com/ HTTP/1.1",
            b"GET http://example.com/ x",
        ] {
            assert_eq!(origin_form(line), None);
        }
    }
}
