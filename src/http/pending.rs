//! The pending-connection budget (`WSGATEWAY_MAX_PENDING_CONNECTIONS`):
//! a semaphore of places, and the register of the connections that hold
//! one while still reading their first request head.
//!
//! A place is taken at accept and freed once the connection is known (see
//! `server.rs`). While the budget is spent, a new connection takes the
//! place of the oldest connection still reading its head, which is closed
//! unanswered: a flood of half-sent heads is shed oldest first instead of
//! locking real clients out for a whole head timeout. A connection whose
//! head is complete (its request is being answered, or its WebSocket
//! admitted) is never evicted; when every place is held by such
//! connections the new one is refused.
//!
//! Both operations are O(log n) under a short synchronous lock (an ordered
//! map keyed by accept order), never held across an `.await`.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    reading: Mutex<HeadReaders>,
}

/// The connections that hold a place and are still reading their first
/// request head, by accept order. At most one entry per place.
#[derive(Default)]
struct HeadReaders {
    next: u64,
    entries: BTreeMap<u64, HeadReader>,
}

struct HeadReader {
    slot: PendingSlot,
    evict: CancellationToken,
}

/// What a newly accepted connection gets.
pub enum Admission {
    /// A free place.
    Free(Pending),
    /// The place of the oldest connection still reading its head, which
    /// was told to close (its [`Pending::evicted`] is cancelled).
    Evicted(Pending),
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
    /// The request head is complete: from now on the connection holds its
    /// place until it is known, and is never evicted. False when it was
    /// evicted first (then its request is not to be served). Idempotent.
    pub fn complete(&self) -> bool {
        self.budget.reading.lock().entries.remove(&self.seq);
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
    pub fn new(max_pending: usize) -> Arc<PendingBudget> {
        Arc::new(PendingBudget {
            permits: Arc::new(Semaphore::new(max_pending)),
            reading: Mutex::default(),
        })
    }

    /// A place for a connection just accepted: a free one, or else the
    /// oldest head reader's.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let (permit, evicted) = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match self.evict_oldest() {
                Some(permit) => (permit, true),
                None => return Admission::Full,
            },
        };
        let slot = PendingSlot(Arc::new(Mutex::new(Some(permit))));
        let evict = CancellationToken::new();
        let seq = {
            let mut reading = self.reading.lock();
            let seq = reading.next;
            reading.next += 1;
            reading.entries.insert(
                seq,
                HeadReader {
                    slot: slot.clone(),
                    evict: evict.clone(),
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

    /// Takes the place of the oldest head reader and tells it to close,
    /// all under the register's lock, so that a head completing at the
    /// same moment is either evicted or kept, never both.
    fn evict_oldest(&self) -> Option<OwnedSemaphorePermit> {
        let mut reading = self.reading.lock();
        loop {
            let (_, oldest) = reading.entries.pop_first()?;
            // An entry holds its place until it leaves the register (head
            // complete, or ended); this `None` is only a safeguard. (The
            // slot's lock is only ever taken after the register's.)
            if let Some(permit) = oldest.slot.take() {
                oldest.evict.cancel();
                return Some(permit);
            }
        }
    }

    #[cfg(test)]
    fn head_readers(&self) -> usize {
        self.reading.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> (Pending, bool) {
        match a {
            Admission::Free(p) => (p, false),
            Admission::Evicted(p) => (p, true),
            Admission::Full => panic!("refused"),
        }
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_head_reader_and_never_a_complete_head() {
        let budget = PendingBudget::new(3);
        let a = admitted(budget.admit());
        let b = admitted(budget.admit());
        let c = admitted(budget.admit());
        assert!(!a.1 && !b.1 && !c.1, "free places first");
        // b's head is complete: it is being admitted.
        assert!(b.0.head.complete());

        let d = admitted(budget.admit());
        assert!(d.1, "the budget is full: someone was evicted");
        assert!(a.0.evicted.is_cancelled(), "the oldest head reader goes");
        assert!(!b.0.evicted.is_cancelled() && !c.0.evicted.is_cancelled());
        assert!(a.0.slot.take().is_none(), "its place went to d");
        assert!(!a.0.head.complete(), "an evicted head is not served");

        let e = admitted(budget.admit());
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
        let budget = PendingBudget::new(2);
        let (a, _) = admitted(budget.admit());
        let (b, _) = admitted(budget.admit());
        assert_eq!(budget.head_readers(), 2);
        // a ends while reading its head (timed out, or the client left).
        drop(a);
        assert_eq!(budget.head_readers(), 1);
        let (c, evicted) = admitted(budget.admit());
        assert!(!evicted, "a's place was freed, not taken from b");
        assert!(!b.evicted.is_cancelled());
        // Full again: c's arrival next evicts b, the oldest left.
        let (_d, evicted) = admitted(budget.admit());
        assert!(evicted);
        assert!(b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(budget.head_readers(), 2, "c and d");
    }
}
