//! The accept loop: HTTP/1.1 with upgrades, served by hyper directly so that
//! clients that are slow to say who they are cannot exhaust the gateway.
//!
//! Three bounds: request headers must arrive within the handshake timeout
//! (slowloris), they may not exceed the header size limit (431), and at most
//! `max_pending` connections may be between accept and "known" at once —
//! known meaning a complete request was answered, or, for a WebSocket, the
//! connection was admitted or refused. Beyond that, new TCP connections are
//! closed at once and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::{Metrics, Rejection};

/// Bounds on connections that have not yet said who they are.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_pending: usize,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
}

/// A connection's place in the pending budget; released once the
/// connection is known (see the module doc). Cloned into the request.
#[derive(Clone, Default)]
pub struct PendingSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl PendingSlot {
    pub fn release(&self) {
        self.0.lock().take();
    }
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
    let pending = Arc::new(Semaphore::new(limits.max_pending));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let router = router.layer(axum::middleware::from_fn(release_when_answered));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE: out of file descriptors. Back off
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            metrics.rejected(Rejection::HandshakeLimit);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let slot = PendingSlot(Arc::new(Mutex::new(Some(permit))));
        let router = router.clone();
        let service = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(slot.clone());
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let connection = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service))
            .with_upgrades();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_end(result, peer),
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    log_end(connection.await, peer);
                }
            }
        });
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
