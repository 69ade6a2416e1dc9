//! Charges each connection for the buffer trillium-http reads its request heads into.
//!
//! trillium-http keeps one head buffer per connection for as long as it is open, and doubles
//! it on every read of a head that fills it: a client that sends 6,000 bytes of header and
//! stops holds an 8 KiB buffer, whatever the bytes themselves. [`ReadBufferTransport`] sits
//! outermost in the transport stack, so the slice it is asked to fill is that buffer's free
//! tail, and the buffer's capacity is the bytes of the head already handed over plus that
//! slice. It reports the capacity to the connection's [`Tracked`] entry; it changes no byte.
//! Bodies and WebSocket frames are read into buffers their handlers charge themselves.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures_lite::{AsyncRead, AsyncWrite};
use trillium::Transport;

use crate::{
    connection::{Phase, Tracked},
    transport::{async_read_into, forward_async_write, forward_transport},
};

/// Reports the capacity of the head buffer it is read into; see the module docs.
#[derive(Debug)]
pub struct ReadBufferTransport<T> {
    inner: T,
    tracked: Arc<Tracked>,
    /// Bytes of the current head handed to the reader so far.
    delivered: u64,
}

impl<T> ReadBufferTransport<T> {
    /// Wraps `inner`, charging the head buffer to `tracked`.
    pub fn new(inner: T, tracked: Arc<Tracked>) -> ReadBufferTransport<T> {
        ReadBufferTransport {
            inner,
            tracked,
            delivered: 0,
        }
    }
}

async_read_into!(ReadBufferTransport<T>, T: AsyncRead + Unpin);

impl<T: AsyncRead + Unpin> ReadBufferTransport<T> {
    fn read_into(&mut self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let phase = self.tracked.phase();
        let offered = buf.len() as u64;
        match phase {
            // A read between requests starts a head: the reader offers its whole buffer.
            Phase::Idle => {
                self.delivered = 0;
                self.tracked.note_read_buffer(offered);
            }
            Phase::Head => self
                .tracked
                .note_read_buffer(self.delivered.saturating_add(offered)),
            // Body and WebSocket reads go to buffers their handlers charge.
            Phase::Busy | Phase::Body | Phase::Upgraded => {}
        }
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(read)) = &result
            && matches!(phase, Phase::Idle | Phase::Head)
        {
            self.delivered = self.delivered.saturating_add(*read as u64);
        }
        result
    }
}

forward_async_write!(ReadBufferTransport<T>, inner, T: AsyncWrite + Unpin);
forward_transport!(ReadBufferTransport<T>, inner, T: Transport);
