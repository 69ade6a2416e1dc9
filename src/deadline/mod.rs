//! Read and write deadlines on every connection: the defence against slow clients.
//!
//! trillium bounds the size of request heads and bodies but not how long a client may take
//! to send them, so a slowloris client could hold a connection (and a file descriptor)
//! forever. [`DeadlineAcceptor`] wraps each accepted transport so that a read or write that
//! makes no progress for `[daemon] request_timeout_secs` fails with `TimedOut` and the
//! connection closes. Idle keep-alive connections close the same way. WebSockets stay open
//! because the gateway pings them more often than the deadline.
//!
//! A stall deadline alone lets a client drip one byte just before each deadline and hold a
//! head open for hours, so a transport made with [`DeadlineTransport::tracked`] also enforces
//! whole-phase deadlines from the connection's [`Tracked`] phase: a head must be complete
//! within the timeout of its first byte, and a body within the timeout of its head. It also
//! returns the pieces of a head to the parser so that its buffer grows only with bytes received
//! ([`HeadReads`]): heads are bounded by bytes and time, not by how they are split.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use std::{sync::Arc, time::Instant};

use async_io::Timer;
use futures_lite::AsyncWrite;
use trillium::Transport;
use trillium_server_common::Acceptor;

mod head;

use head::HeadReads;

use crate::{
    connection::{Phase, Tracked},
    transport::{async_read_into, forward_transport},
};

/// Wraps accepted connections in [`DeadlineTransport`].
#[derive(Debug, Clone, Copy)]
pub struct DeadlineAcceptor {
    timeout: Duration,
}

impl DeadlineAcceptor {
    /// Creates an acceptor whose connections fail after `timeout` without progress.
    pub fn new(timeout: Duration) -> DeadlineAcceptor {
        DeadlineAcceptor { timeout }
    }
}

impl<Input: Transport> Acceptor<Input> for DeadlineAcceptor {
    type Output = DeadlineTransport<Input>;
    type Error = std::convert::Infallible;

    async fn accept(&self, input: Input) -> Result<Self::Output, Self::Error> {
        Ok(DeadlineTransport::new(input, self.timeout))
    }

    fn is_secure(&self) -> bool {
        false
    }
}

/// A transport whose reads and writes time out when they stall.
#[derive(Debug)]
pub struct DeadlineTransport<T> {
    inner: T,
    timeout: Duration,
    read_deadline: Stall,
    write_deadline: Stall,
    tracked: Option<Arc<Tracked>>,
    phase: Option<(Phase, Instant)>,
    phase_timer: LazyTimer,
    expired: Option<Phase>,
    head: HeadReads,
}

/// A timer that is re-registered only when it fires, not every time its deadline moves.
///
/// Registering an async-io timer wakes the reactor thread (a syscall and a context switch),
/// and every request moves three deadlines (read, write, phase). Deadlines only ever move
/// later, so a timer armed for an earlier one may stay: when it fires, [`LazyTimer::expired`]
/// finds the deadline not yet reached and arms it again, once per timeout at most.
#[derive(Debug)]
struct LazyTimer {
    timer: Timer,
    armed: Option<Instant>,
}

impl LazyTimer {
    fn new() -> LazyTimer {
        LazyTimer {
            timer: Timer::never(),
            armed: None,
        }
    }

    /// Returns true once `deadline` has passed; otherwise makes sure the task is woken no
    /// later than `deadline`.
    fn expired(&mut self, deadline: Instant, cx: &mut TaskContext<'_>) -> bool {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            match self.armed {
                Some(at) if at > now && at <= deadline => {}
                _ => {
                    self.timer.set_at(deadline);
                    self.armed = Some(deadline);
                }
            }
            match Pin::new(&mut self.timer).poll(cx) {
                Poll::Pending => return false,
                // Fired for an earlier deadline: look again.
                Poll::Ready(_) => self.armed = None,
            }
        }
    }
}

/// The stall deadline of one direction: when the current wait for progress started.
#[derive(Debug)]
struct Stall {
    waiting_since: Option<Instant>,
    timer: LazyTimer,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            waiting_since: None,
            timer: LazyTimer::new(),
        }
    }
}

/// The capacity of the buffer a connection's first request head is read into (the listener
/// hands it to trillium-http with the bytes it peeked). Most heads (probes, scrapes, API
/// calls) fit in one read of it.
pub(crate) const HEAD_BUFFER_INITIAL: usize = 512;

impl<T> DeadlineTransport<T> {
    /// Wraps `inner` with the stall deadline only.
    pub fn new(inner: T, timeout: Duration) -> DeadlineTransport<T> {
        DeadlineTransport {
            inner,
            timeout,
            read_deadline: Stall::new(),
            write_deadline: Stall::new(),
            tracked: None,
            phase: None,
            phase_timer: LazyTimer::new(),
            expired: None,
            head: HeadReads::default(),
        }
    }

    /// Wraps `inner` with the stall deadline and the head and body deadlines of `tracked`.
    pub fn tracked(inner: T, timeout: Duration, tracked: Arc<Tracked>) -> DeadlineTransport<T> {
        DeadlineTransport {
            tracked: Some(tracked),
            ..DeadlineTransport::new(inner, timeout)
        }
    }

    /// Returns the phase whose whole-phase deadline closed the connection, if one did.
    pub fn expired(&self) -> Option<Phase> {
        self.expired
    }

    /// Checks the whole-phase deadline before a read: an error once the head (or body) has
    /// taken longer than the timeout in total, however the bytes were spaced.
    fn check_phase(&mut self, cx: &mut TaskContext<'_>) -> Option<io::Error> {
        let tracked = self.tracked.as_ref()?;
        // Reading a body is part of the request's body deadline, which started with its head.
        let phase = match tracked.phase() {
            Phase::Head => Phase::Head,
            Phase::Busy | Phase::Body => Phase::Busy,
            Phase::Idle | Phase::Upgraded => {
                self.phase = None;
                return None;
            }
        };
        let timeout = self.timeout;
        let started = match self.phase {
            Some((current, started)) if current == phase => started,
            _ => {
                let now = Instant::now();
                self.phase = Some((phase, now));
                now
            }
        };
        if !self.phase_timer.expired(started + timeout, cx) {
            return None;
        }
        let what = if phase == Phase::Head {
            "request head"
        } else {
            "request body"
        };
        log::debug!("closing connection: {what} not complete within {timeout:?}");
        self.expired = Some(phase);
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} not complete within {timeout:?}"),
        ))
    }
}

/// Polls `result`; while it is pending, fails once it has made no progress for `timeout`.
fn with_deadline<R>(
    result: Poll<io::Result<R>>,
    stall: &mut Stall,
    timeout: Duration,
    cx: &mut TaskContext<'_>,
    what: &str,
) -> Poll<io::Result<R>> {
    match result {
        Poll::Ready(result) => {
            stall.waiting_since = None;
            Poll::Ready(result)
        }
        Poll::Pending => {
            let since = *stall.waiting_since.get_or_insert_with(Instant::now);
            if stall.timer.expired(since + timeout, cx) {
                stall.waiting_since = None;
                log::debug!("closing connection: {what} stalled for {timeout:?}");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} stalled for {timeout:?}"),
                )))
            } else {
                Poll::Pending
            }
        }
    }
}

impl<T: Transport> DeadlineTransport<T> {
    /// Reads a later piece of a request head into `buf`, holding received bytes back until
    /// they fill it or end the head (see [`HeadReads`]).
    fn read_head(&mut self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let staged = self.head.staged.len();
            let wanted = buf.len();
            // The staged bytes never exceed a buffer the caller gave; if it now offers less,
            // hand over what fits.
            let Some(scratch) = buf.get_mut(staged..).filter(|free| !free.is_empty()) else {
                return Poll::Ready(Ok(self.release_staged(buf)));
            };
            let read = match Pin::new(&mut self.inner).poll_read(cx, scratch) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(self.release_staged(buf))),
                Poll::Ready(Ok(read)) => read,
            };
            // Bytes arrived: the stall deadline starts again from now.
            self.read_deadline.waiting_since = None;
            let received = scratch.get(..read).unwrap_or_default();
            let ended = self.head.scan(received);
            if ended || staged + read == wanted {
                // The new bytes already follow the staged ones' place in `buf`.
                if let Some(front) = buf.get_mut(..staged) {
                    front.copy_from_slice(&self.head.staged);
                }
                self.head.staged = Vec::new();
                self.charge_staged();
                return Poll::Ready(Ok(staged + read));
            }
            self.head.staged.extend_from_slice(received);
            self.charge_staged();
        }
    }

    /// Charges the staged bytes' buffer to the connection, as it grows and when it is freed.
    fn charge_staged(&mut self) {
        let capacity = self.head.staged.capacity() as u64;
        if let Some(tracked) = &self.tracked {
            if capacity > self.head.charged {
                tracked.charge(capacity - self.head.charged);
            } else {
                tracked.release(self.head.charged - capacity);
            }
        }
        self.head.charged = capacity;
    }

    /// Hands over as many staged bytes as fit in `buf`.
    fn release_staged(&mut self, buf: &mut [u8]) -> usize {
        let count = self.head.staged.len().min(buf.len());
        if let (Some(out), Some(from)) = (buf.get_mut(..count), self.head.staged.get(..count)) {
            out.copy_from_slice(from);
        }
        self.head.staged.drain(..count);
        if self.head.staged.is_empty() {
            self.head.staged = Vec::new();
        }
        self.charge_staged();
        count
    }
}

async_read_into!(DeadlineTransport<T>, T: Transport);

impl<T: Transport> DeadlineTransport<T> {
    fn read_into(&mut self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if let Some(error) = self.check_phase(cx) {
            return Poll::Ready(Err(error));
        }
        if let Some(tracked) = &self.tracked
            && tracked.responding()
        {
            // trillium-http reads again only once the response is out.
            tracked.set_responding(false);
        }
        let in_head = self
            .tracked
            .as_ref()
            .is_some_and(|tracked| tracked.phase() == Phase::Head);
        let result = if in_head && !buf.is_empty() {
            self.read_head(cx, buf)
        } else {
            let result = Pin::new(&mut self.inner).poll_read(cx, buf);
            if let (Some(tracked), Poll::Ready(Ok(read))) = (&self.tracked, &result)
                && *read > 0
                && tracked.phase() == Phase::Idle
            {
                // The first byte of a request starts its head, and with it the head
                // deadline. This first read is returned as it is: most heads arrive whole.
                tracked.set_phase(Phase::Head);
                self.head.start(buf.get(..*read).unwrap_or_default());
            }
            result
        };
        with_deadline(result, &mut self.read_deadline, self.timeout, cx, "read")
    }
}

impl<T: Transport> AsyncWrite for DeadlineTransport<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Some(tracked) = &this.tracked {
            // For the registry: a client that stops reading its response holds a slot for
            // nothing (see `Tracked::write_stalled`).
            match &result {
                Poll::Pending => tracked.note_write_blocked(),
                Poll::Ready(Ok(written)) if *written > 0 => tracked.note_write_progress(),
                Poll::Ready(_) => {}
            }
        }
        with_deadline(result, &mut this.write_deadline, this.timeout, cx, "write")
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        with_deadline(result, &mut this.write_deadline, this.timeout, cx, "flush")
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_close(cx);
        with_deadline(result, &mut this.write_deadline, this.timeout, cx, "close")
    }
}

forward_transport!(DeadlineTransport<T>, inner, T: Transport);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use futures_lite::AsyncRead;
    use trillium_http::{HttpContext, KnownHeaderName, Status};

    use super::*;
    use crate::{
        connection::{Listener, registry},
        transport::forward_async_write,
    };

    /// A peer that sends its bytes one per read, then closes, and keeps what it is sent.
    struct Drip {
        data: Vec<u8>,
        at: usize,
        written: Arc<Mutex<Vec<u8>>>,
    }

    async_read_into!(Drip);

    impl Drip {
        fn read_into(
            &mut self,
            _cx: &mut TaskContext<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            match (self.data.get(self.at), buf.first_mut()) {
                (Some(byte), Some(out)) => {
                    *out = *byte;
                    self.at += 1;
                    Poll::Ready(Ok(1))
                }
                _ => Poll::Ready(Ok(0)),
            }
        }
    }

    impl AsyncWrite for Drip {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut TaskContext<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Transport for Drip {}

    /// Records the largest buffer the parser offers a read: its head buffer's free room.
    struct Largest<T> {
        inner: T,
        largest: Arc<AtomicUsize>,
    }

    async_read_into!(Largest<T>, T: AsyncRead + Unpin);

    impl<T: AsyncRead + Unpin> Largest<T> {
        fn read_into(
            &mut self,
            cx: &mut TaskContext<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.largest.fetch_max(buf.len(), Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    forward_async_write!(Largest<T>, inner, T: AsyncWrite + Unpin);

    /// Runs trillium-http's own parser over `head` dripped one byte per read; returns what
    /// was written back, the parser's result and the largest read buffer it offered.
    fn parse_dripped(head: &[u8]) -> (String, Result<(), String>, usize) {
        let connections = registry(10, 10);
        let guard = connections
            .admit(Listener::Gateway, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .0
            .unwrap();
        let tracked = Arc::clone(guard.tracked());
        let written = Arc::new(Mutex::new(Vec::new()));
        let largest = Arc::new(AtomicUsize::new(0));
        let drip = Drip {
            data: head.to_vec(),
            at: 0,
            written: Arc::clone(&written),
        };
        let transport = Largest {
            inner: DeadlineTransport::tracked(drip, Duration::from_secs(30), Arc::clone(&tracked)),
            largest: Arc::clone(&largest),
        };
        let result = async_io::block_on(trillium_http::run_with_initial_bytes(
            Arc::new(HttpContext::new()),
            transport,
            Vec::with_capacity(HEAD_BUFFER_INITIAL),
            |mut conn| {
                let tracked = Arc::clone(&tracked);
                async move {
                    tracked.set_phase(Phase::Busy);
                    conn.set_status(Status::Ok);
                    conn.response_headers_mut()
                        .insert(KnownHeaderName::Connection, "close");
                    tracked.set_phase(Phase::Idle);
                    conn
                }
            },
        ));
        let written = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
        let result = result.map(|_| ()).map_err(|error| error.to_string());
        (written, result, largest.load(Ordering::Relaxed))
    }

    #[test]
    fn a_head_dripped_one_byte_per_read_is_parsed_with_a_buffer_the_size_of_the_head() {
        let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        head.resize(2_998, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let (written, result, largest) = parse_dripped(&head);
        assert_eq!(result, Ok(()));
        assert!(written.starts_with("HTTP/1.1 200"), "{written}");
        // Without the transport's staging, 3,000 reads would each double the buffer.
        assert!(largest <= 2 * head.len(), "largest read buffer {largest}");
    }

    #[test]
    fn an_oversized_head_dripped_one_byte_per_read_stops_at_the_head_limit() {
        let head = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
        let (_, result, largest) = parse_dripped(head.as_bytes());
        assert_eq!(
            result,
            Err(trillium_http::Error::HeadersTooLong.to_string())
        );
        assert!(largest <= 8 * 1024, "largest read buffer {largest}");
    }
}
