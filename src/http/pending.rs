//! The pending-connection budget (`WSGATEWAY_MAX_PENDING_CONNECTIONS`):
//! a semaphore of places, and the register of the connections that hold
//! one while still reading their first request head.
//!
//! A place is taken at accept and freed once the connection is known (see
//! `server.rs`). While the budget is spent, a new connection takes the
//! place of the oldest connection waiting for the rest of its head from
//! its client, which is closed unanswered: a flood of half-sent heads is
//! shed oldest first instead of locking real clients out for a whole head
//! timeout. A connection only becomes evictable once it has been read and
//! its head found incomplete ([`HeadReading::waiting_on_client`]), and
//! once its client has had a moment since accept (`evictable_after`: a
//! tenth of the head timeout, at most 1 s) to send it: one accepted a moment ago is not a slow
//! client but one the gateway has not looked at yet (a reconnect storm
//! accepts thousands faster than their tasks run), or whose head is one
//! round trip behind its connect. While every place is held and no head
//! reader is evictable yet, the new connection waits
//! ([`Admission::Busy`]) rather than evicting one of them. A connection whose head is complete (its request is being
//! answered, or its WebSocket admitted) is never evicted; when every place
//! is held by such connections the new one is refused.
//!
//! Every operation is O(log n) under a short synchronous lock (ordered maps
//! keyed by accept order), never held across an `.await`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A connection's place in the pending budget; released once the
/// connection is known. Cloned into the request.
#[derive(Clone, Default)]
pub struct PendingSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl PendingSlot {
    pub fn release(&self) {
        self.take();
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().take()
    }
}

/// The budget of one listener.
pub struct PendingBudget {
    permits: Arc<Semaphore>,
    /// How long after its accept a head reader is safe from eviction.
    evictable_after: Duration,
    reading: Mutex<HeadReaders>,
    /// Told when a head reader starts waiting on its client (evictable).
    became_evictable: Notify,
}

/// The connections that hold a place and are still reading their first
/// request head, by accept order. At most one entry per place, in one of
/// the two maps.
#[derive(Default)]
struct HeadReaders {
    next: u64,
    /// Accepted, not yet found short of a head: not evictable.
    unread: BTreeMap<u64, HeadReader>,
    /// Read, and waiting for the rest of the head from the client.
    waiting: BTreeMap<u64, HeadReader>,
}

impl HeadReaders {
    fn remove(&mut self, seq: u64) {
        if self.unread.remove(&seq).is_none() {
            self.waiting.remove(&seq);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.unread.len() + self.waiting.len()
    }
}

struct HeadReader {
    slot: PendingSlot,
    evict: CancellationToken,
    accepted: Instant,
}

/// What a newly accepted connection gets.
pub enum Admission {
    /// A free place.
    Free(Pending),
    /// The place of the oldest connection waiting on its client for the
    /// rest of its head, which was told to close (its
    /// [`Pending::evicted`] is cancelled).
    Evicted(Pending),
    /// No place yet: some pending connections are head readers not
    /// evictable yet (not read yet, or accepted less than
    /// `evictable_after` ago). Ask again after [`PendingBudget::changed`]
    /// or at the instant given, when the oldest of those waiting on their
    /// client becomes evictable.
    Busy(Option<Instant>),
    /// No place: every pending connection is past its head.
    Full,
}

/// A place in the budget, for one connection.
pub struct Pending {
    /// Freed once the connection is known.
    pub slot: PendingSlot,
    /// Marks the head complete; dropping it (the connection ended) does too.
    pub head: HeadReading,
    /// Cancelled when a newer connection takes the place: the connection
    /// is then to be dropped, unanswered.
    pub evicted: CancellationToken,
}

/// A connection's entry among the head readers, until its head is complete
/// or it ends (drop).
pub struct HeadReading {
    budget: Arc<PendingBudget>,
    seq: u64,
    evicted: CancellationToken,
}

impl HeadReading {
    /// The connection was read and its head is not complete: it waits for
    /// its client, and may now be evicted. Idempotent; nothing once the
    /// head is complete.
    pub fn waiting_on_client(&self) {
        let moved = {
            let mut reading = self.budget.reading.lock();
            match reading.unread.remove(&self.seq) {
                Some(entry) => {
                    reading.waiting.insert(self.seq, entry);
                    true
                }
                None => false,
            }
        };
        if moved {
            self.budget.became_evictable.notify_one();
        }
    }

    /// The request head is complete: from now on the connection holds its
    /// place until it is known, and is never evicted. False when it was
    /// evicted first (then its request is not to be served). Idempotent.
    pub fn complete(&self) -> bool {
        self.budget.reading.lock().remove(self.seq);
        // An eviction cancels under that lock, after taking the entry out:
        // once the entry is out, this answer is final.
        !self.evicted.is_cancelled()
    }
}

impl Drop for HeadReading {
    fn drop(&mut self) {
        self.complete();
    }
}

impl PendingBudget {
    /// `evictable_after`: how long after its accept a head reader is safe
    /// from eviction.
    pub fn new(max_pending: usize, evictable_after: Duration) -> Arc<PendingBudget> {
        Arc::new(PendingBudget {
            permits: Arc::new(Semaphore::new(max_pending)),
            evictable_after,
            reading: Mutex::default(),
            became_evictable: Notify::new(),
        })
    }

    /// A place for a connection just accepted: a free one, or else the
    /// place of the oldest head reader waiting on its client; `Busy` when
    /// there is neither but some head readers have not been read yet.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let now = Instant::now();
        let (permit, evicted) = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match self.evict_oldest(now) {
                Ok(permit) => (permit, true),
                Err(Busy { readers: true, at }) => return Admission::Busy(at),
                Err(Busy { readers: false, .. }) => return Admission::Full,
            },
        };
        let slot = PendingSlot(Arc::new(Mutex::new(Some(permit))));
        let evict = CancellationToken::new();
        let seq = {
            let mut reading = self.reading.lock();
            let seq = reading.next;
            reading.next += 1;
            reading.unread.insert(
                seq,
                HeadReader {
                    slot: slot.clone(),
                    evict: evict.clone(),
                    accepted: now,
                },
            );
            seq
        };
        let pending = Pending {
            slot,
            head: HeadReading {
                budget: self.clone(),
                seq,
                evicted: evict.clone(),
            },
            evicted: evict,
        };
        if evicted {
            Admission::Evicted(pending)
        } else {
            Admission::Free(pending)
        }
    }

    /// Returns once a place may have been freed or a head reader become
    /// evictable: then [`admit`](Self::admit) is worth asking again.
    pub async fn changed(&self) {
        tokio::select! {
            // Given back at once: `admit` takes it.
            _ = self.permits.acquire() => {}
            () = self.became_evictable.notified() => {}
        }
    }

    /// Takes the place of the oldest head reader waiting on its client,
    /// if it was accepted `evictable_after` ago, and tells it to close, all
    /// under the register's lock, so that a head completing at the same
    /// moment is either evicted or kept, never both.
    fn evict_oldest(&self, now: Instant) -> Result<OwnedSemaphorePermit, Busy> {
        let mut reading = self.reading.lock();
        loop {
            // In accept order: the first is the oldest.
            let Some(entry) = reading.waiting.first_entry() else {
                return Err(Busy {
                    readers: !reading.unread.is_empty(),
                    at: None,
                });
            };
            let evictable_at = entry.get().accepted + self.evictable_after;
            if evictable_at > now {
                return Err(Busy {
                    readers: true,
                    at: Some(evictable_at),
                });
            }
            let oldest = entry.remove();
            // An entry holds its place until it leaves the register (head
            // complete, or ended); this `None` is only a safeguard. (The
            // slot's lock is only ever taken after the register's.)
            if let Some(permit) = oldest.slot.take() {
                oldest.evict.cancel();
                return Ok(permit);
            }
        }
    }

    #[cfg(test)]
    fn head_readers(&self) -> usize {
        self.reading.lock().len()
    }
}

/// Nobody to evict now.
struct Busy {
    /// Whether some head readers hold places (not evictable yet).
    readers: bool,
    /// When the oldest waiting on its client becomes evictable.
    at: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> (Pending, bool) {
        match a {
            Admission::Free(p) => (p, false),
            Admission::Evicted(p) => (p, true),
            Admission::Busy(_) => panic!("busy"),
            Admission::Full => panic!("refused"),
        }
    }

    /// Admitted, read, and waiting for the rest of its head: evictable.
    fn slow(a: Admission) -> (Pending, bool) {
        let admitted = admitted(a);
        admitted.0.head.waiting_on_client();
        admitted
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_head_reader_and_never_a_complete_head() {
        let budget = PendingBudget::new(3, Duration::ZERO);
        let a = slow(budget.admit());
        let b = admitted(budget.admit());
        let c = slow(budget.admit());
        assert!(!a.1 && !b.1 && !c.1, "free places first");
        // b's head is complete: it is being admitted.
        assert!(b.0.head.complete());

        let d = slow(budget.admit());
        assert!(d.1, "the budget is full: someone was evicted");
        assert!(a.0.evicted.is_cancelled(), "the oldest head reader goes");
        assert!(!b.0.evicted.is_cancelled() && !c.0.evicted.is_cancelled());
        assert!(a.0.slot.take().is_none(), "its place went to d");
        assert!(!a.0.head.complete(), "an evicted head is not served");

        let e = slow(budget.admit());
        assert!(e.1);
        assert!(
            c.0.evicted.is_cancelled(),
            "then the next oldest, skipping b"
        );
        assert!(!b.0.evicted.is_cancelled() && !d.0.evicted.is_cancelled());

        // d and e complete their heads: nobody is left to evict.
        assert!(d.0.head.complete() && e.0.head.complete());
        assert_eq!(budget.head_readers(), 0);
        assert!(matches!(budget.admit(), Admission::Full));
        assert!(!b.0.evicted.is_cancelled() && !d.0.evicted.is_cancelled());

        // Once b is known its place is free again.
        b.0.slot.release();
        let f = admitted(budget.admit());
        assert!(!f.1, "a free place, nobody evicted");
        assert!(!e.0.evicted.is_cancelled());
    }

    #[test]
    fn a_connection_that_ends_leaves_the_register_and_frees_its_place() {
        let budget = PendingBudget::new(2, Duration::ZERO);
        let (a, _) = slow(budget.admit());
        let (b, _) = slow(budget.admit());
        assert_eq!(budget.head_readers(), 2);
        // a ends while reading its head (timed out, or the client left).
        drop(a);
        assert_eq!(budget.head_readers(), 1);
        let (c, evicted) = slow(budget.admit());
        assert!(!evicted, "a's place was freed, not taken from b");
        assert!(!b.evicted.is_cancelled());
        // Full again: c's arrival next evicts b, the oldest left.
        let (_d, evicted) = admitted(budget.admit());
        assert!(evicted);
        assert!(b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(budget.head_readers(), 2, "c and d");
    }

    /// A reconnect storm: connections accepted faster than their tasks
    /// run. One not read yet may have its whole head in its socket; it is
    /// not evicted, the newcomer waits instead.
    #[tokio::test]
    async fn a_head_not_read_yet_is_never_evicted_the_newcomer_waits() {
        let budget = PendingBudget::new(2, Duration::ZERO);
        let (a, _) = admitted(budget.admit());
        let (b, _) = admitted(budget.admit());
        assert!(matches!(budget.admit(), Admission::Busy(None)));
        assert!(!a.evicted.is_cancelled() && !b.evicted.is_cancelled());

        // b is read and found short of its head: the waiting newcomer is
        // told, and takes b's place.
        let changed = budget.changed();
        b.head.waiting_on_client();
        tokio::time::timeout(std::time::Duration::from_secs(1), changed)
            .await
            .expect("told");
        let (c, evicted) = admitted(budget.admit());
        assert!(evicted && b.evicted.is_cancelled() && !a.evicted.is_cancelled());

        // a's head was whole: it completes, and is known; its place frees
        // for the next newcomer, who is told too.
        assert!(a.head.complete());
        assert!(matches!(budget.admit(), Admission::Busy(None)), "c unread");
        let changed = budget.changed();
        a.slot.release();
        tokio::time::timeout(std::time::Duration::from_secs(1), changed)
            .await
            .expect("told");
        let (_d, evicted) = admitted(budget.admit());
        assert!(!evicted && !c.evicted.is_cancelled());
        // Marking a completed or evicted head is nothing.
        a.head.waiting_on_client();
        b.head.waiting_on_client();
        assert_eq!(budget.head_readers(), 2, "c and d");
    }

    /// A head reader waiting on its client is safe for `evictable_after`
    /// from its accept: its head may be a round trip behind its connect.
    #[test]
    fn a_head_reader_is_evictable_only_after_its_grace() {
        let grace = Duration::from_millis(50);
        let budget = PendingBudget::new(1, grace);
        let (a, _) = slow(budget.admit());
        let Admission::Busy(Some(at)) = budget.admit() else {
            panic!("a is not evictable yet");
        };
        assert!(at > Instant::now() && at <= Instant::now() + grace);
        assert!(!a.evicted.is_cancelled());
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let (_b, evicted) = admitted(budget.admit());
        assert!(evicted && a.evicted.is_cancelled());
    }
}
