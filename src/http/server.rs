//! The accept loop: HTTP/1.1 with upgrades, served by hyper directly so that
//! clients that are slow to say who they are cannot exhaust the gateway.
//!
//! Three bounds: request headers must arrive within the handshake timeout
//! (slowloris), they may not exceed the header size limit (431), and at most
//! `max_pending` connections may be between accept and "known" at once —
//! known meaning a complete request was answered, or, for a WebSocket, the
//! connection was admitted or refused. When the budget is spent, a new
//! connection takes the place of the oldest one waiting on its client for
//! the rest of its request head, accepted at least a tenth of the head
//! timeout ago (at most 1 s), which is dropped unanswered (see
//! `pending.rs`); while none is, but some are not evictable yet (not read
//! yet, or just accepted: a reconnect storm), the accept loop waits for a
//! place, leaving the rest in the listen queue; only when every pending
//! connection is past its head is the new one closed at once. Evictions
//! and refusals are counted.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use super::pending::PendingSlot;
use super::pending::{Admission, HeadReading, Pending, PendingBudget};
use crate::metrics::{Metrics, Rejection};

/// Listens on `addr` with a listen queue of `backlog` connections (tokio's
/// `TcpListener::bind` has 1 024, which a reconnect storm overflows: the
/// kernel then drops the SYNs past it, and those clients wait for their
/// retransmission, a second or more).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's bind does on Unix: a restarted node gets its port back at
    // once, whatever connections of the old one linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The longest a head reader is safe from eviction after its accept.
const EVICTABLE_AFTER_AT_MOST: Duration = Duration::from_secs(1);

/// Bounds on connections that have not yet said who they are.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_pending: usize,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `router` on `listener` until `shutdown`; connection tasks are
/// spawned on `tasks` so that shutdown can wait for them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    // A client that has not sent its head in a tenth of the time it is
    // allowed (at most a second: a round trip and a moment) is the first
    // to go when places run out; before that, a new connection waits.
    let evictable_after = (limits.handshake_timeout / 10).min(EVICTABLE_AFTER_AT_MOST);
    let budget = PendingBudget::new(limits.max_pending, evictable_after);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let router = router.layer(axum::middleware::from_fn(release_when_answered));
    while let Some((tcp, peer)) = accept(&listener, &shutdown).await {
        let Some(Pending {
            slot,
            head,
            evicted,
        }) = take_place(&budget, &metrics, &shutdown).await
        else {
            // Closed at once, unanswered.
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let head = Arc::new(head);
        let tcp = HeadWatch {
            tcp,
            head: Some(head.clone()),
        };
        let router = router.clone();
        // hyper calls this as soon as a request head is parsed: from then on
        // the connection is no longer evictable. `head` lives as long as the
        // connection, and leaves the register when dropped. A connection
        // evicted just before is not served: the error makes hyper drop it.
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let kept = head.complete();
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(slot.clone());
            let answer = router.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                if !kept {
                    return Err(std::io::Error::other("evicted while its head was read"));
                }
                Ok(answer.await.unwrap_or_else(|never| match never {}))
            }
        });
        let connection = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                biased;
                // A newer connection took its place while it was still
                // reading its head: dropped, unanswered.
                _ = evicted.cancelled() => tracing::debug!(%peer, "evicted while sending its request head"),
                result = connection.as_mut() => log_end(result, peer),
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    log_end(connection.await, peer);
                }
            }
        });
    }
}

/// The next connection, or `None` once `shutdown` is cancelled.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    // Typically EMFILE: out of file descriptors. Back off
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A new connection's place among the pending ones, counted: a free one,
/// or the place of the oldest waiting on its client for its head, once
/// there is one; `None` when every pending connection is past its head
/// (the new one is then closed), or on shutdown.
async fn take_place(
    budget: &Arc<PendingBudget>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<Pending> {
    loop {
        match budget.admit() {
            Admission::Free(pending) => return Some(pending),
            Admission::Evicted(pending) => {
                metrics.handshakes_evicted.inc();
                return Some(pending);
            }
            Admission::Busy(evictable_at) => {
                let evictable = async {
                    match evictable_at {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = budget.changed() => {}
                    () = evictable => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
            Admission::Full => {
                metrics.rejected(Rejection::HandshakeLimit);
                return None;
            }
        }
    }
}

/// A connection's socket, served by hyper: the first read that finds no
/// more bytes before its request head is complete marks it as waiting on
/// its client, evictable (see `pending.rs`).
pub struct HeadWatch {
    tcp: TcpStream,
    head: Option<Arc<HeadReading>>,
}

impl HeadWatch {
    pub fn into_inner(self) -> TcpStream {
        self.tcp
    }
}

impl AsyncRead for HeadWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if read.is_pending()
            && let Some(head) = self.head.take()
        {
            // Nothing once the head is complete (keep-alive reads).
            head.waiting_on_client();
        }
        read
    }
}

impl AsyncWrite for HeadWatch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

fn log_end(result: hyper::Result<()>, peer: SocketAddr) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// Frees the pending slot once a request is answered, unless it became a
/// WebSocket: then the connection task frees it after admission.
async fn release_when_answered(req: Request, next: Next) -> Response {
    let slot = req.extensions().get::<PendingSlot>().cloned();
    let response = next.run(req).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS
        && let Some(slot) = slot
    {
        slot.release();
    }
    response
}
