//! Read and write deadlines on every connection: the defence against slow clients.
//!
//! trillium bounds the size of request heads and bodies but not how long a client may take
//! to send them, so a slowloris client could hold a connection (and a file descriptor)
//! forever. [`DeadlineAcceptor`] wraps each accepted transport so that a read or write that
//! makes no progress for `[daemon] request_timeout_secs` fails with `TimedOut` and the
//! connection closes. Idle keep-alive connections close the same way. WebSockets stay open
//! because the gateway pings them more often than the deadline.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use async_io::Timer;
use futures_lite::{AsyncRead, AsyncWrite};
use trillium::Transport;
use trillium_server_common::Acceptor;

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
        Ok(DeadlineTransport {
            inner: input,
            timeout: self.timeout,
            read_deadline: None,
            write_deadline: None,
        })
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
    read_deadline: Option<Timer>,
    write_deadline: Option<Timer>,
}

/// Polls `result`; while it is pending, arms `deadline` and fails once it fires.
fn with_deadline<R>(
    result: Poll<io::Result<R>>,
    deadline: &mut Option<Timer>,
    timeout: Duration,
    cx: &mut TaskContext<'_>,
    what: &str,
) -> Poll<io::Result<R>> {
    match result {
        Poll::Ready(result) => {
            *deadline = None;
            Poll::Ready(result)
        }
        Poll::Pending => {
            let timer = deadline.get_or_insert_with(|| Timer::after(timeout));
            match Pin::new(timer).poll(cx) {
                Poll::Ready(_) => {
                    *deadline = None;
                    log::debug!("closing connection: {what} stalled for {timeout:?}");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{what} stalled for {timeout:?}"),
                    )))
                }
                Poll::Pending => Poll::Pending,
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
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
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
