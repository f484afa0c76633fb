//! The hub's handle on one connection: its outbound queue and its close
//! signal. Everything here is non-blocking, so the dispatcher can push to
//! ten thousand handles without awaiting once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::auth::{Endpoint, TenantId};
use crate::close::Close;

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
    /// An event (counted in `wsgateway_broadcasts_*`), not a reply.
    pub is_event: bool,
}

impl Outbound {
    /// An event frame, shared by every recipient.
    pub fn event(text: Utf8Bytes, published_ms: i64) -> Outbound {
        Outbound(Arc::new(Frame {
            text,
            published_ms,
            is_event: true,
        }))
    }

    /// A reply to the client (pong, errors, `connected`, `resync`...).
    pub fn reply(text: Utf8Bytes) -> Outbound {
        Outbound(Arc::new(Frame {
            text,
            published_ms: 0,
            is_event: false,
        }))
    }

    pub fn is_event(&self) -> bool {
        self.0.is_event
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

/// What the connection's task should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Close, for this reason (asked by the hub, a limit or shutdown).
    Close(Close),
    /// Frames are queued: write them.
    Frames,
}

/// A connection's outbound queue, close signal and liveness, in one
/// allocation.
///
/// Not a `tokio::sync::mpsc` channel: that is two more allocations per
/// connection (a cache-padded channel of about 500 bytes and a first block
/// of 32 slots, allocated up front) and a semaphore, a notify and a waker
/// per push. Here a push is a short uncontended lock and, only when the
/// queue was empty, one wake; an idle connection's queue holds no memory.
/// Queue and close share one waker, because one task (the connection's)
/// waits on both.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    pub tenant_id: TenantId,
    pub endpoint: Endpoint,
    queue: Mutex<Queue>,
    capacity: usize,
    /// The close asked for ([`Close::to_index`]; 0: none).
    close: AtomicU8,
    waker: AtomicWaker,
    last_seen_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// The connection's task has ended: nobody will read what is pushed.
    detached: bool,
}

/// Queues that grew past this many slots in a burst are freed once drained,
/// so that a connection does not keep its busiest moment's memory.
const KEPT_SLOTS: usize = 64;

impl ConnHandle {
    /// A handle whose queue holds at most `capacity` frames.
    pub fn new(id: ConnId, tenant_id: TenantId, endpoint: Endpoint, capacity: usize) -> ConnHandle {
        ConnHandle {
            id,
            tenant_id,
            endpoint,
            queue: Mutex::new(Queue::default()),
            capacity: capacity.max(1),
            close: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            last_seen_ms: AtomicU64::new(monotonic_ms()),
        }
    }

    /// Queues a frame without waiting. A full queue marks a slow consumer:
    /// the connection is asked to close with 1008 rather than slow anyone.
    pub fn push(&self, frame: Outbound) -> Push {
        let mut queue = self.queue.lock();
        if queue.detached {
            return Push::Gone;
        }
        if queue.frames.len() >= self.capacity {
            drop(queue);
            self.close(Close::SlowConsumer);
            return Push::Overflowed;
        }
        let was_empty = queue.frames.is_empty();
        queue.frames.push_back(frame);
        drop(queue);
        // A non-empty queue already has a wake on its way, or a task
        // draining it that will see this frame too.
        if was_empty {
            self.waker.wake();
        }
        Push::Queued
    }

    /// Takes the oldest queued frame, if any.
    pub fn pop(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock();
        let frame = queue.frames.pop_front();
        if queue.frames.is_empty() && queue.frames.capacity() > KEPT_SLOTS {
            queue.frames = VecDeque::new();
        }
        frame
    }

    /// Marks the connection's task as gone: later pushes are refused and
    /// what is queued is dropped. Returns how many of the dropped frames
    /// were events (never written: `broadcasts_failed{connection_closed}`).
    pub fn detach(&self) -> usize {
        let frames = {
            let mut queue = self.queue.lock();
            queue.detached = true;
            std::mem::take(&mut queue.frames)
        };
        frames.iter().filter(|f| f.is_event()).count()
    }

    /// Asks the connection's task to close, for `why`. Only the first
    /// request counts; later ones are ignored.
    pub fn close(&self, why: Close) {
        if self
            .close
            .compare_exchange(0, why.to_index(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// The close asked for, if any.
    pub fn requested_close(&self) -> Option<Close> {
        Close::from_index(self.close.load(Ordering::Acquire))
    }

    /// For the connection's task only (one waker): ready with a close
    /// request first, then with queued frames.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        if let Some(code) = self.requested_close() {
            return Poll::Ready(Signal::Close(code));
        }
        let queue = self.queue.lock();
        if !queue.frames.is_empty() {
            return Poll::Ready(Signal::Frames);
        }
        // Registered under the lock: a push after it wakes this waker.
        self.waker.register(cx.waker());
        drop(queue);
        // A close requested before the registration did not wake it.
        match self.requested_close() {
            Some(code) => Poll::Ready(Signal::Close(code)),
            None => Poll::Pending,
        }
    }

    /// Resolves with the next [`Signal`].
    pub fn signal(&self) -> impl Future<Output = Signal> + '_ {
        std::future::poll_fn(|cx| self.poll_signal(cx))
    }

    /// Resolves with the close asked for, once there is one.
    pub fn close_requested(&self) -> impl Future<Output = Close> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(code) = self.requested_close() {
                return Poll::Ready(code);
            }
            self.waker.register(cx.waker());
            match self.requested_close() {
                Some(code) => Poll::Ready(code),
                None => Poll::Pending,
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Arc<Count>, Waker) {
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        (wakes.clone(), Waker::from(wakes))
    }

    fn frame(text: &'static str) -> Outbound {
        Outbound::reply(Utf8Bytes::from_static(text))
    }

    #[test]
    fn a_push_wakes_a_waiting_task_once_and_frames_come_out_in_order() {
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 3);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(h.poll_signal(&mut cx), Poll::Pending);
        assert_eq!(h.push(frame("a")), Push::Queued);
        assert_eq!(h.push(frame("b")), Push::Queued);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "only the first push wakes"
        );
        assert_eq!(h.poll_signal(&mut cx), Poll::Ready(Signal::Frames));
        assert_eq!(h.pop().unwrap().text().as_str(), "a");
        assert_eq!(h.pop().unwrap().text().as_str(), "b");
        assert!(h.pop().is_none());
    }

    #[test]
    fn a_full_queue_closes_with_1008_and_close_comes_before_frames() {
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 2);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(h.push(frame("a")), Push::Queued);
        assert_eq!(h.push(frame("b")), Push::Queued);
        assert_eq!(h.push(frame("c")), Push::Overflowed);
        h.close(Close::Heartbeat);
        assert_eq!(
            h.poll_signal(&mut cx),
            Poll::Ready(Signal::Close(Close::SlowConsumer)),
            "the first close request wins"
        );
    }

    #[test]
    fn a_close_wakes_a_waiting_task_and_a_detached_handle_refuses_frames() {
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 2);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(h.poll_signal(&mut cx), Poll::Pending);
        h.close(Close::Unauthorized);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(h.detach(), 0);
        assert_eq!(h.push(frame("a")), Push::Gone);
        assert!(h.pop().is_none());
    }

    #[test]
    fn detach_counts_the_events_it_drops_not_the_replies() {
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 10);
        h.push(frame("connected"));
        h.push(Outbound::event(Utf8Bytes::from_static("e1"), 0));
        h.push(Outbound::event(Utf8Bytes::from_static("e2"), 0));
        assert_eq!(h.pop().unwrap().text().as_str(), "connected");
        assert_eq!(h.detach(), 2);
    }

    #[test]
    fn a_queue_that_grew_in_a_burst_is_freed_when_drained() {
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 1000);
        for _ in 0..500 {
            h.push(frame("x"));
        }
        while h.pop().is_some() {}
        assert_eq!(h.queue.lock().frames.capacity(), 0);
    }
}
