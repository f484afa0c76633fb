//! The hub's handle on one connection: its outbound queue, the socket the
//! queue is written to, and its close signal. Everything here is
//! non-blocking, so the dispatcher can push to ten thousand handles without
//! awaiting once.
//!
//! Whoever queues a frame writes it, when it can: once the connection's
//! task has handed its socket over ([`ConnHandle::attach`]), a push (or the
//! dispatcher's [`ConnHandle::flush`] after a batch of events) writes
//! straight to the socket, under the queue's lock, so bytes never
//! interleave and frames leave in queue order. The connection's task is
//! woken only when that cannot finish: the socket is full (it waits for
//! room and drains), a resume's catch-up filters frames, or a write failed.
//! That spares the wake, the poll and the WebSocket layer per frame that
//! dominated the gateway's cost per delivery (BENCHMARKS.md).

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

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
/// queue slots stay 8 bytes and every recipient of an event shares one
/// copy of its bytes.
#[derive(Debug, Clone)]
pub struct Outbound(Arc<Frame>);

#[derive(Debug)]
pub struct Frame {
    /// The message; empty for a control frame.
    pub text: Utf8Bytes,
    /// The frame as it goes on the wire, header included: server frames
    /// are unmasked, so it is built once per event, not per recipient.
    wire: Bytes,
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
            wire: text_frame(text.as_bytes()),
            text,
            published_ms,
            is_event: true,
        }))
    }

    /// A reply to the client (pong, errors, `connected`, `resync`...).
    pub fn reply(text: Utf8Bytes) -> Outbound {
        Outbound(Arc::new(Frame {
            wire: text_frame(text.as_bytes()),
            text,
            published_ms: 0,
            is_event: false,
        }))
    }

    /// Bytes the WebSocket layer framed itself (the answer to a ping or a
    /// close, the gateway's close frame).
    pub fn control(wire: Bytes) -> Outbound {
        Outbound(Arc::new(Frame {
            text: Utf8Bytes::default(),
            wire,
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

    /// The whole frame, header included.
    pub fn wire(&self) -> &[u8] {
        &self.0.wire
    }
}

/// A final, unmasked text frame (RFC 6455 §5.2) carrying `payload`,
/// its header formatted by tungstenite.
fn text_frame(payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut frame = Vec::with_capacity(header.len(len) + payload.len());
    header
        .format(len, &mut frame)
        .expect("a Vec takes any header");
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// What happened to one pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued, and written already or on its way.
    Queued,
    /// Queued by [`ConnHandle::enqueue`]: the caller writes it with
    /// [`ConnHandle::flush`] once its batch is queued.
    ToFlush,
    /// The queue was full: the connection is now closing with 1008.
    Overflowed,
    /// The connection is already gone.
    Gone,
}

impl Push {
    /// Whether the frame is in the queue.
    pub fn queued(self) -> bool {
        matches!(self, Push::Queued | Push::ToFlush)
    }
}

/// What the connection's task should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Close, for this reason (asked by the hub, a limit or shutdown).
    Close(Close),
    /// A write to the socket failed: the client is gone.
    Broken,
    /// Frames wait for the task to write them ([`ConnHandle::poll_drain`]).
    Frames,
}

/// A write to the socket failed: the connection is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

/// A connection's outbound queue, socket, close signal and liveness, in
/// one allocation.
///
/// Not a `tokio::sync::mpsc` channel: that is two more allocations per
/// connection (a cache-padded channel of about 500 bytes and a first block
/// of 32 slots, allocated up front) and a semaphore, a notify and a waker
/// per push. Here a push is a short uncontended lock and a write; an idle
/// connection's queue holds no memory. Queue and close share one waker,
/// because one task (the connection's) waits on both.
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
    /// The events asking for an ack that were queued to this connection
    /// and that it has not acked, each until when it may still count
    /// (monotonic ms): its acks count only for these.
    receipts: Mutex<HashMap<Box<str>, u64>>,
}

/// The most unacked receipts a connection keeps: a client that never acks
/// forgets its oldest ones.
const MAX_RECEIPTS: usize = 1024;

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// The connection's task has ended: nobody will read what is pushed.
    detached: bool,
    /// The client's socket, once the connection's task hands it over.
    outlet: Option<Arc<TcpStream>>,
    /// Bytes of the front frame already written.
    written: usize,
    /// The socket took less than it was given: the task writes the rest
    /// when it has room.
    stalled: bool,
    /// The task filters what it writes (a resume's catch-up), so only the
    /// task writes.
    filtered: bool,
    /// A write failed; nothing more is written.
    broken: bool,
    /// Events in the write that failed (`broadcasts_failed{write_failed}`).
    lost: usize,
    /// The newest `ts` among the events a drain wrote before it had to
    /// wait for room.
    drained_ms: i64,
}

/// Queues that grew past this many slots in a burst are freed once drained,
/// so that a connection does not keep its busiest moment's memory.
const KEPT_SLOTS: usize = 64;

/// Frames handed to one `writev`: a burst's backlog goes out in a few
/// system calls, not one per frame.
const MAX_IOV: usize = 64;

/// What writing a push's frames came to.
struct Written {
    /// The task must be woken: the socket had no room, or the write failed.
    wake: bool,
    /// The newest `ts` among the events written (0: none).
    published_ms: i64,
}

/// What one attempt to write the queue came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    /// Everything queued is written.
    All,
    /// The socket took what it could; the rest waits for room.
    Blocked,
    Failed,
}

impl Queue {
    /// Whether a push writes itself (else the task does).
    fn direct(&self) -> bool {
        self.outlet.is_some() && !self.stalled && !self.filtered && !self.broken
    }

    /// Writes as much of the queue as the socket takes without waiting,
    /// dropping the events `skip` names (only ever whole frames), and
    /// raises `published_ms` to the newest `ts` written.
    fn write(&mut self, skip: &mut dyn FnMut(&Outbound) -> bool, published_ms: &mut i64) -> Wrote {
        let Queue {
            frames,
            outlet,
            written,
            lost,
            ..
        } = self;
        let Some(outlet) = outlet.as_deref() else {
            return Wrote::Blocked;
        };
        loop {
            while *written == 0 && frames.front().is_some_and(|f| f.is_event() && skip(f)) {
                frames.pop_front();
            }
            if frames.is_empty() {
                return Wrote::All;
            }
            let front = &frames[0].wire()[*written..];
            let (count, total, result) = if frames.len() == 1 {
                // One frame (the steady case): a plain write, which costs
                // the kernel less than a one-element `writev`, and no array
                // of slices to fill.
                (1, front.len(), outlet.try_write(front))
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                slices[0] = IoSlice::new(front);
                let (mut count, mut total) = (1, front.len());
                for frame in frames.iter().take(MAX_IOV).skip(1) {
                    if frame.is_event() && skip(frame) {
                        break;
                    }
                    slices[count] = IoSlice::new(frame.wire());
                    total += frame.wire().len();
                    count += 1;
                }
                (count, total, outlet.try_write_vectored(&slices[..count]))
            };
            match result {
                Ok(0) => {}
                Ok(mut n) => {
                    let all = n == total;
                    while n > 0 {
                        let left = frames[0].wire().len() - *written;
                        if n < left {
                            *written += n;
                            break;
                        }
                        n -= left;
                        *written = 0;
                        let frame = frames.pop_front().expect("a written frame");
                        *published_ms = (*published_ms).max(frame.published_ms());
                    }
                    if all {
                        continue;
                    }
                    return Wrote::Blocked;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Wrote::Blocked,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {}
            }
            // Failed: what this write carried is lost.
            *lost += frames.drain(..count).filter(|f| f.is_event()).count();
            *written = 0;
            return Wrote::Failed;
        }
    }

    /// Writes what a push left queued, when pushes write themselves.
    fn write_directly(&mut self) -> Written {
        let mut published_ms = 0;
        if !self.direct() || self.frames.is_empty() {
            return Written {
                wake: false,
                published_ms,
            };
        }
        let wake = match self.write(&mut |_| false, &mut published_ms) {
            Wrote::All => {
                self.shrink();
                false
            }
            Wrote::Blocked => {
                self.stalled = true;
                true
            }
            Wrote::Failed => {
                self.broken = true;
                true
            }
        };
        Written { wake, published_ms }
    }

    fn shrink(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > KEPT_SLOTS {
            self.frames = VecDeque::new();
        }
    }
}

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
            receipts: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that an event asking for an ack was queued to this connection;
    /// false when it was already (a redelivery, or a second channel).
    pub fn note_receipt(&self, event_id: &str, until_ms: u64) -> bool {
        let mut receipts = self.receipts.lock();
        if receipts.contains_key(event_id) {
            return false;
        }
        // Every 64 receipts the expired go (a connection that never acks,
        // an admin's that only watches, holds only its live ones); when full
        // of live ones, the one due first.
        if receipts.len() % 64 == 63 {
            let now = monotonic_ms();
            receipts.retain(|_, until| *until > now);
        }
        if receipts.len() >= MAX_RECEIPTS
            && let Some(first) = receipts
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(id, _)| id.clone())
        {
            receipts.remove(&first);
        }
        receipts.insert(event_id.into(), until_ms);
        true
    }

    /// Splits a client's acked ids into those this connection received
    /// (forgotten now: each counts once) and the others.
    pub fn take_receipts(&self, ids: Vec<String>) -> (Vec<String>, Vec<String>) {
        let now = monotonic_ms();
        let mut receipts = self.receipts.lock();
        let (mut received, mut others) = (Vec::new(), Vec::new());
        for id in ids {
            match receipts.remove(id.as_str()) {
                Some(until) if until > now => received.push(id),
                _ => others.push(id),
            }
        }
        if receipts.is_empty() && receipts.capacity() > 0 {
            *receipts = HashMap::new();
        }
        (received, others)
    }

    /// Queues a frame and writes it when the socket takes it now; else the
    /// connection's task writes it. A full queue marks a slow consumer: the
    /// connection is asked to close with 1008 rather than slow anyone.
    pub fn push(&self, frame: Outbound) -> Push {
        let mut queue = self.queue.lock();
        let (pushed, mut wake) = self.queue_up(&mut queue, frame);
        if pushed == Push::ToFlush {
            wake = queue.write_directly().wake;
        }
        drop(queue);
        self.after_push(pushed, wake);
        if pushed.queued() {
            Push::Queued
        } else {
            pushed
        }
    }

    /// Queues a frame without writing it: [`Push::ToFlush`] asks the caller
    /// to [`flush`](Self::flush) this handle once it has queued its batch
    /// (so that a burst of events leaves in one write, and the caller's
    /// locks are not held across system calls).
    pub fn enqueue(&self, frame: Outbound) -> Push {
        let mut queue = self.queue.lock();
        let (pushed, wake) = self.queue_up(&mut queue, frame);
        drop(queue);
        self.after_push(pushed, wake);
        pushed
    }

    /// Queues a frame; whether the task is to be woken for it (once the
    /// lock is dropped: [`after_push`](Self::after_push)).
    fn queue_up(&self, queue: &mut Queue, frame: Outbound) -> (Push, bool) {
        if queue.detached {
            return (Push::Gone, false);
        }
        if queue.frames.len() >= self.capacity {
            return (Push::Overflowed, false);
        }
        let was_empty = queue.frames.is_empty();
        queue.frames.push_back(frame);
        match (was_empty, queue.direct()) {
            // A flush, or the task, is already due and writes this too.
            (false, _) => (Push::Queued, false),
            (true, true) => (Push::ToFlush, false),
            (true, false) => (Push::Queued, true),
        }
    }

    /// What a push asks of the connection's task, outside the lock: to
    /// close (its queue overflowed), or to wake.
    fn after_push(&self, pushed: Push, wake: bool) {
        if pushed == Push::Overflowed {
            self.close(Close::SlowConsumer);
        } else if wake {
            self.waker.wake();
        }
    }

    /// Writes what [`enqueue`](Self::enqueue) queued. Returns the newest
    /// `ts` among the events written (0: none), for the latency histogram.
    pub fn flush(&self) -> i64 {
        let written = self.queue.lock().write_directly();
        if written.wake {
            self.waker.wake();
        }
        written.published_ms
    }

    /// Queues bytes the WebSocket layer framed (a pong, a close), after
    /// what is queued; even once detached (the close frame follows the
    /// end), and past the capacity (they are the connection's own).
    pub fn push_control(&self, wire: Bytes) {
        let mut queue = self.queue.lock();
        queue.frames.push_back(Outbound::control(wire));
        let wake = !queue.direct() || queue.write_directly().wake;
        drop(queue);
        if wake {
            self.waker.wake();
        }
    }

    /// Hands the connection's socket over: from now on pushes write to it.
    /// `filtered`: the task filters what it writes for a while (a resume's
    /// catch-up), and writes everything itself until
    /// [`unfilter`](Self::unfilter). What is queued already (`connected`,
    /// events that came meanwhile) is written now, or left to the task.
    pub fn attach(&self, outlet: Arc<TcpStream>, filtered: bool) {
        let mut queue = self.queue.lock();
        queue.outlet = Some(outlet);
        queue.filtered = filtered;
        // A close asked for already comes before them (the task's first
        // signal). A failed or partial write shows in that signal too.
        if self.requested_close().is_none() {
            queue.write_directly();
        }
    }

    /// The catch-up is over: pushes write themselves again, starting with
    /// what was queued meanwhile (else nothing would write it: later
    /// pushes find the queue non-empty and leave it to a flush already due).
    pub fn unfilter(&self) {
        let mut queue = self.queue.lock();
        if !queue.filtered {
            return;
        }
        queue.filtered = false;
        let wake = queue.write_directly().wake;
        drop(queue);
        if wake {
            self.waker.wake();
        }
    }

    /// Writes what is queued, waiting for room in the socket as needed;
    /// for the connection's task, the one that waits. `skip` names events
    /// not to write. Ready with the newest `ts` among the events written.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        skip: &mut dyn FnMut(&Outbound) -> bool,
    ) -> Poll<Result<i64, Broken>> {
        let mut queue = self.queue.lock();
        let mut published_ms = std::mem::take(&mut queue.drained_ms);
        loop {
            if queue.broken {
                return Poll::Ready(Err(Broken));
            }
            match queue.write(skip, &mut published_ms) {
                Wrote::All => {
                    queue.stalled = false;
                    queue.shrink();
                    return Poll::Ready(Ok(published_ms));
                }
                Wrote::Failed => queue.broken = true,
                Wrote::Blocked => {
                    queue.stalled = true;
                    let Some(outlet) = queue.outlet.clone() else {
                        return Poll::Ready(Ok(0));
                    };
                    // Registered under the lock: no other writer runs
                    // while the queue is stalled.
                    match outlet.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => queue.broken = true,
                        Poll::Pending => {
                            queue.drained_ms = published_ms;
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }

    /// Resolves once what is queued is written (see [`poll_drain`](Self::poll_drain)).
    pub async fn drain(&self) -> Result<i64, Broken> {
        std::future::poll_fn(|cx| self.poll_drain(cx, &mut |_| false)).await
    }

    /// Frames queued and not yet (wholly) written.
    #[cfg(test)]
    pub fn backlog(&self) -> usize {
        self.queue.lock().frames.len()
    }

    /// Events lost in a failed write, since last asked.
    pub fn take_lost(&self) -> usize {
        std::mem::take(&mut self.queue.lock().lost)
    }

    /// Takes the oldest queued frame, if any.
    pub fn pop(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock();
        let frame = queue.frames.pop_front();
        queue.shrink();
        frame
    }

    /// Marks the connection's task as gone: later pushes are refused and
    /// what is queued is dropped (but the rest of a frame half written,
    /// which the close frame must follow). Returns how many of the dropped
    /// frames were events (never written: `broadcasts_failed{connection_closed}`).
    pub fn detach(&self) -> usize {
        let frames = {
            let mut queue = self.queue.lock();
            queue.detached = true;
            let keep = usize::from(queue.written > 0).min(queue.frames.len());
            queue.frames.split_off(keep)
        };
        frames.iter().filter(|f| f.is_event()).count()
    }

    /// After the close: drops what is left queued (a frame half written, a
    /// close frame the client never took) and lets go of the socket (it
    /// closes once the task drops its own). Returns how many were events.
    pub fn abandon(&self) -> usize {
        let frames = {
            let mut queue = self.queue.lock();
            queue.outlet = None;
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
    /// request first, then a failed write, then frames left to it.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        if let Some(code) = self.requested_close() {
            return Poll::Ready(Signal::Close(code));
        }
        let queue = self.queue.lock();
        if queue.broken {
            return Poll::Ready(Signal::Broken);
        }
        if !queue.frames.is_empty() && !queue.direct() {
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
    fn an_ack_counts_once_and_only_for_a_live_receipt() {
        let h = ConnHandle::new(1, 1, Endpoint::Kitchen, 3);
        let later = monotonic_ms() + 60_000;
        assert!(h.note_receipt("a", later));
        assert!(
            !h.note_receipt("a", later),
            "a second channel, a redelivery"
        );
        assert!(h.note_receipt("expired", monotonic_ms()));
        let ids = ["a", "b", "a", "expired"].map(String::from).to_vec();
        let (received, others) = h.take_receipts(ids);
        assert_eq!(received, ["a"]);
        assert_eq!(others, ["b", "a", "expired"]);
        // A client that never acks keeps at most MAX_RECEIPTS, the latest.
        for i in 0..3 * MAX_RECEIPTS as u64 {
            h.note_receipt(&i.to_string(), later + i);
        }
        assert!(h.receipts.lock().len() <= MAX_RECEIPTS);
        let last = (3 * MAX_RECEIPTS - 1).to_string();
        let (received, _) = h.take_receipts(vec![last.clone(), "0".into()]);
        assert_eq!(received, [last]);
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
    fn prebuilt_frames_are_what_tungstenite_would_write() {
        use tungstenite::protocol::frame::Frame;
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'a'; len];
            let mut expected = Vec::new();
            Frame::message(payload.clone(), OpCode::Data(Data::Text), true)
                .format(&mut expected)
                .unwrap();
            assert_eq!(&text_frame(&payload)[..], &expected[..], "{len} bytes");
        }
    }

    /// A connected pair of loopback sockets: the gateway's end, writable,
    /// and the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let server = accepted.unwrap().0;
        // As on a served connection, whose HTTP answer went out already.
        server.writable().await.unwrap();
        (Arc::new(server), client.unwrap())
    }

    #[tokio::test]
    async fn an_attached_handle_writes_on_push_and_wakes_its_task_only_when_the_socket_is_full() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        let h = Arc::new(ConnHandle::new(1, 1, Endpoint::Waiter, 100_000));
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        h.push(frame("hi"));
        h.attach(server, false);
        assert_eq!(h.poll_signal(&mut cx), Poll::Pending);
        assert_eq!(h.enqueue(frame("e1")), Push::ToFlush);
        assert_eq!(
            h.enqueue(frame("e2")),
            Push::Queued,
            "one flush writes both"
        );
        assert_eq!(h.flush(), 0);
        assert_eq!((h.backlog(), wakes.0.load(Ordering::SeqCst)), (0, 0));
        let mut got = [0; 12];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x02hi\x81\x02e1\x81\x02e2");

        // Far more than the socket buffers hold: the task is woken once,
        // to wait for room, and pushes leave the rest to it.
        let big = Utf8Bytes::from("x".repeat(60 * 1024));
        let mut pushed = 0;
        while h.backlog() == 0 {
            h.push(Outbound::event(big.clone(), 1));
            pushed += 1;
        }
        h.push(Outbound::event(big.clone(), 1));
        pushed += 1;
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(h.poll_signal(&mut cx), Poll::Ready(Signal::Frames));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0; 1 << 20];
            let mut total = 0;
            while total < pushed * (60 * 1024 + 4) {
                total += client.read(&mut buf).await.unwrap();
            }
            (client, total)
        });
        let drained = std::future::poll_fn(|cx| h.poll_drain(cx, &mut |_| false)).await;
        assert_eq!(drained, Ok(1), "the newest `ts` written");
        let (mut client, total) = reader.await.unwrap();
        assert_eq!(total, pushed * (60 * 1024 + 4));
        // Room again: pushes write themselves.
        assert_eq!(h.poll_signal(&mut cx), Poll::Pending);
        h.push(frame("ok"));
        client.read_exact(&mut got[..4]).await.unwrap();
        assert_eq!(&got[..4], b"\x81\x02ok");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn frames_queued_while_filtered_are_written_when_the_filter_ends() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 100);
        h.attach(server, true);
        // Filtered: the task writes, so a push only queues (and wakes it).
        assert_eq!(h.enqueue(frame("a")), Push::Queued);
        assert_eq!(h.enqueue(frame("b")), Push::Queued);
        h.unfilter();
        assert_eq!(h.backlog(), 0, "written when the filter ended");
        assert_eq!(h.enqueue(frame("c")), Push::ToFlush, "pushes write again");
        h.flush();
        let mut got = [0; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x01a\x81\x01b\x81\x01c");
    }

    #[tokio::test]
    async fn a_write_to_a_vanished_client_breaks_the_handle_and_counts_what_it_carried() {
        let (server, client) = socket_pair().await;
        let h = ConnHandle::new(1, 1, Endpoint::Waiter, 100_000);
        h.attach(server, false);
        // A close with unread data makes the kernel answer with a reset.
        drop(client);
        let mut cx = Context::from_waker(Waker::noop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while h.poll_signal(&mut cx) != Poll::Ready(Signal::Broken) {
            assert!(std::time::Instant::now() < deadline, "never broke");
            h.push(Outbound::event(Utf8Bytes::from_static("e"), 0));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(h.take_lost(), 1, "the event in the failed write");
        assert_eq!(h.push(frame("late")), Push::Queued);
        assert_eq!(h.backlog(), 1, "queued, never written");
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
