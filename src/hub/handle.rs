//! The hub's handle on one connection: its outbound queue and its close
//! signal. Everything here is non-blocking, so the dispatcher can push to
//! ten thousand handles without awaiting once.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

use crate::auth::{Endpoint, TenantId};

pub type ConnId = u64;

/// Milliseconds since the process started; a cheap monotonic clock for
/// heartbeats.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One frame on its way to a client: a pointer, so that a connection's
/// queue slots stay 8 bytes (tokio allocates a queue's first block of 32
/// slots up front, for every connection, idle or not).
#[derive(Debug, Clone)]
pub struct Outbound(Arc<Frame>);

#[derive(Debug)]
pub struct Frame {
    pub text: Utf8Bytes,
    /// The event's `ts` (Unix ms), for the publish-to-client latency; 0
    /// when it has none or the frame is a reply.
    pub published_ms: i64,
}

impl Outbound {
    /// An event frame, shared by every recipient.
    pub fn event(text: Utf8Bytes, published_ms: i64) -> Outbound {
        Outbound(Arc::new(Frame { text, published_ms }))
    }

    /// A reply to the client (pong, errors, `connected`...).
    pub fn reply(text: Utf8Bytes) -> Outbound {
        Outbound::event(text, 0)
    }

    pub fn text(&self) -> &Utf8Bytes {
        &self.0.text
    }

    pub fn published_ms(&self) -> i64 {
        self.0.published_ms
    }
}

/// What happened to one pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue was full: the connection is now closing with 1008.
    Overflowed,
    /// The connection is already gone.
    Gone,
}

#[derive(Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    pub tenant_id: TenantId,
    pub endpoint: Endpoint,
    outbound: mpsc::Sender<Outbound>,
    /// The close code asked for (0: none yet); the first request wins.
    close_code: AtomicU16,
    close_requested: Notify,
    last_seen_ms: AtomicU64,
}

impl ConnHandle {
    pub fn new(
        id: ConnId,
        tenant_id: TenantId,
        endpoint: Endpoint,
        outbound: mpsc::Sender<Outbound>,
    ) -> ConnHandle {
        ConnHandle {
            id,
            tenant_id,
            endpoint,
            outbound,
            close_code: AtomicU16::new(0),
            close_requested: Notify::new(),
            last_seen_ms: AtomicU64::new(monotonic_ms()),
        }
    }

    /// Queues a frame without waiting. A full queue marks a slow consumer:
    /// the connection is asked to close with 1008 rather than slow anyone.
    pub fn push(&self, frame: Outbound) -> Push {
        match self.outbound.try_send(frame) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(crate::close::SLOW_CONSUMER);
                Push::Overflowed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Gone,
        }
    }

    /// Asks the connection's task to close with `code`. Only the first
    /// request counts; later ones are ignored.
    pub fn close(&self, code: u16) {
        if self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // `notify_one` keeps a permit if the task is not waiting yet.
            self.close_requested.notify_one();
        }
    }

    /// Resolves with the close code once a close has been asked for.
    pub async fn close_requested(&self) -> u16 {
        loop {
            let code = self.close_code.load(Ordering::Acquire);
            if code != 0 {
                return code;
            }
            self.close_requested.notified().await;
        }
    }

    /// Records inbound traffic: any frame is a heartbeat.
    pub fn touch(&self) {
        self.last_seen_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last inbound frame.
    pub fn silent_for_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed))
    }
}
