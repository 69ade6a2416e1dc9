//! Forwarding for the transport wrappers (deadlines, head charging, request-line rewriting,
//! WebSocket message limits): each wrapper writes only the methods it changes.
//!
//! These are macros rather than a trait with blanket impls because `Transport`, `AsyncRead`
//! and `AsyncWrite` are foreign traits: the orphan rule forbids a blanket impl over "any
//! wrapper", and a macro costs nothing at run time (every forward is a plain call, no boxing).

/// Implements `trillium::Transport` for `$wrapper` by forwarding every method to `self.$field`.
///
/// `forward_transport!(Wrapper<T>, inner, T: Transport);` or, without a type parameter,
/// `forward_transport!(Wrapper, inner);`.
macro_rules! forward_transport {
    ($wrapper:ty, $field:tt $(, $param:ident: $($bound:tt)+)?) => {
        impl $(<$param: $($bound)+>)? trillium::Transport for $wrapper {
            fn set_linger(
                &mut self,
                linger: Option<std::time::Duration>,
            ) -> std::io::Result<()> {
                self.$field.set_linger(linger)
            }

            fn set_nodelay(&mut self, nodelay: bool) -> std::io::Result<()> {
                self.$field.set_nodelay(nodelay)
            }

            fn set_ip_ttl(&mut self, ttl: u32) -> std::io::Result<()> {
                self.$field.set_ip_ttl(ttl)
            }

            fn peer_addr(&self) -> std::io::Result<Option<std::net::SocketAddr>> {
                self.$field.peer_addr()
            }
        }
    };
}

/// Implements `AsyncWrite` for `$wrapper` by forwarding every method (vectored writes
/// included) to `self.$field`; same forms as [`forward_transport!`].
macro_rules! forward_async_write {
    ($wrapper:ty, $field:tt $(, $param:ident: $($bound:tt)+)?) => {
        impl $(<$param: $($bound)+>)? futures_lite::AsyncWrite for $wrapper {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_close(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_close(cx)
            }
        }
    };
}

/// Implements `AsyncRead` for `$wrapper`, whose reads go either through its inherent
/// `read_into(&mut self, cx, buf)` (every wrapper is `Unpin`, so what it changes about a read
/// needs no `Pin` plumbing), or, with `forward $field`, straight to `self.$field` (a wrapper
/// that changes nothing it reads). Same forms as [`forward_transport!`] otherwise.
macro_rules! async_read_into {
    (@impl [$($generics:tt)*] $wrapper:ty, |$this:ident, $cx:ident, $buf:ident| $read:expr) => {
        impl<$($generics)*> futures_lite::AsyncRead for $wrapper {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                $cx: &mut std::task::Context<'_>,
                $buf: &mut [u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let $this = self.get_mut();
                $read
            }
        }
    };
    ($wrapper:ty, forward $field:tt $(, $param:ident: $($bound:tt)+)?) => {
        $crate::transport::async_read_into!(
            @impl [$($param: $($bound)+)?] $wrapper,
            |this, cx, buf| std::pin::Pin::new(&mut this.$field).poll_read(cx, buf)
        );
    };
    ($wrapper:ty $(, $param:ident: $($bound:tt)+)?) => {
        $crate::transport::async_read_into!(
            @impl [$($param: $($bound)+)?] $wrapper,
            |this, cx, buf| this.read_into(cx, buf)
        );
    };
}

pub(crate) use async_read_into;
pub(crate) use forward_async_write;
pub(crate) use forward_transport;
