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
//! within the timeout of its first byte, and a body within the timeout of its head.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use std::{sync::Arc, time::Instant};

use async_io::Timer;
use futures_lite::{AsyncRead, AsyncWrite};
use trillium::Transport;
use trillium_server_common::Acceptor;

use crate::connection::{Phase, Tracked};

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
    head_reads: u32,
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

/// Most reads one request head may take. trillium-http 1.6.1 doubles its head buffer before
/// every read of a head, so a client dripping a head byte by byte grew it geometrically (a
/// 50-byte drip reached 471 MiB); seven reads from [`HEAD_BUFFER_INITIAL`] bound it at
/// 64 KiB, and still let a head of `head_max_len` (8 KiB) sent at once reach its 431.
const MAX_HEAD_READS: u32 = 7;

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
            head_reads: 0,
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

impl<T: Transport> AsyncRead for DeadlineTransport<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.check_phase(cx) {
            return Poll::Ready(Err(error));
        }
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Some(tracked), Poll::Ready(Ok(read))) = (&this.tracked, &result)
            && *read > 0
        {
            match tracked.phase() {
                // The first byte of a request starts its head, and with it the head deadline.
                Phase::Idle => {
                    tracked.set_phase(Phase::Head);
                    this.head_reads = 1;
                }
                Phase::Head => {
                    this.head_reads += 1;
                    if this.head_reads > MAX_HEAD_READS {
                        log::debug!("closing connection: request head in too many pieces");
                        this.expired = Some(Phase::Head);
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("request head arrived in more than {MAX_HEAD_READS} reads"),
                        )));
                    }
                }
                Phase::Busy | Phase::Body | Phase::Upgraded => {}
            }
        }
        with_deadline(result, &mut this.read_deadline, this.timeout, cx, "read")
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

impl<T: Transport> Transport for DeadlineTransport<T> {
    fn set_linger(&mut self, linger: Option<Duration>) -> io::Result<()> {
        self.inner.set_linger(linger)
    }

    fn set_nodelay(&mut self, nodelay: bool) -> io::Result<()> {
        self.inner.set_nodelay(nodelay)
    }

    fn set_ip_ttl(&mut self, ttl: u32) -> io::Result<()> {
        self.inner.set_ip_ttl(ttl)
    }

    fn peer_addr(&self) -> io::Result<Option<std::net::SocketAddr>> {
        self.inner.peer_addr()
    }
}
