//! The client's TCP socket as the WebSocket layer (tungstenite) sees it.
//!
//! The gateway owns the socket itself, not hyper's boxed upgraded stream,
//! so that its hub handle can write frames to it from the fan-out
//! (`hub/handle.rs`). tungstenite still reads and parses what the client
//! sends, and frames its own answers (pong, close); once the connection is
//! live ([`Wire::attach`]) those answers go through the handle's queue like
//! every other frame, so that bytes from the two writers never interleave.
//! Before that (admission, a refusal's close frame, a resume's replay) only
//! the connection's task writes, straight to the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::hub::ConnHandle;

pub struct Wire {
    stream: Arc<TcpStream>,
    /// What hyper read past the upgrade request: the first bytes of the
    /// WebSocket stream.
    unread: Bytes,
    /// Set once the connection is live: writes go through its queue.
    handle: Option<Arc<ConnHandle>>,
}

impl Wire {
    pub fn new(stream: TcpStream, unread: Bytes) -> Wire {
        Wire {
            stream: Arc::new(stream),
            unread,
            handle: None,
        }
    }

    /// Hands the socket to the connection's hub handle: from now on every
    /// frame, tungstenite's too, is written through its queue.
    pub fn attach(&mut self, handle: Arc<ConnHandle>, filtered: bool) {
        handle.attach(self.stream.clone(), filtered);
        self.handle = Some(handle);
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.stream.poll_read_ready(cx))?;
            match this.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(handle) = &this.handle {
            // Written after what is queued, by whoever writes next.
            handle.push_control(Bytes::copy_from_slice(buf));
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            ready!(this.stream.poll_write_ready(cx))?;
            match this.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }

    /// Nothing is buffered here; once attached, [`ConnHandle::drain`] waits
    /// for what is queued to be written.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The socket closes when the last owner drops it.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
