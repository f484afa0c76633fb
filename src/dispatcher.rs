//! The dispatcher: one task that takes events off the queue and fans each
//! out through the hub.
//!
//! It owns the de-duplication window outright (no lock), rejects stale
//! events, and never awaits per recipient: a fan-out is a loop of
//! non-blocking queue pushes inside [`Hub::deliver`], then, once the batch
//! of events is queued and the hub's index unlocked, one non-blocking write
//! per recipient ([`ConnHandle::flush`]: a burst leaves in one `writev`
//! per connection, and no connection's task is woken while its socket has
//! room).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::acks::Acks;
use crate::broker::EventQueue;
use crate::channel::Channel;
use crate::event::{DedupKey, Event, unix_ms};
use crate::hub::{ConnHandle, Hub};
use crate::metrics::{Drop, Metrics, Undelivered};
use crate::sectors::sync::{SectorCommand, SectorSync};
use crate::unknown_types::Tracker;

/// Events taken off the queue per lock.
const BATCH: usize = 64;

/// Fan-outs of at least this many connections are written by more than one
/// worker (BENCHMARKS.md, steady: 100 per event).
const SPLIT_FANOUT_AT: usize = 64;

/// The most events remembered for de-duplication; beyond it the oldest are
/// forgotten early, which bounds memory under any publish rate.
const MAX_REMEMBERED: usize = 200_000;

pub struct Dispatcher {
    hub: Arc<Hub>,
    queue: Arc<EventQueue>,
    metrics: Arc<Metrics>,
    stale_after_ms: i64,
    recent: Recent,
    sectors: Option<SectorSync>,
    /// Told who received an event asking for an ack.
    acks: Option<Acks>,
    /// Unknown event types by name: owned here, so counting one takes no lock.
    unknown: Tracker,
    /// Handles with frames queued by this batch, to write once it is.
    to_flush: Vec<Arc<ConnHandle>>,
    /// How many workers may share a large fan-out's writes.
    writers: usize,
    /// The most events routed before their frames are written.
    coalesce: usize,
}

impl Dispatcher {
    pub fn new(
        hub: Arc<Hub>,
        queue: Arc<EventQueue>,
        metrics: Arc<Metrics>,
        stale_after: Duration,
        dedup_window: Duration,
    ) -> Dispatcher {
        Dispatcher {
            hub,
            queue,
            metrics,
            stale_after_ms: stale_after.as_millis() as i64,
            recent: Recent::new(dedup_window),
            sectors: None,
            acks: None,
            unknown: Tracker::default(),
            to_flush: Vec::new(),
            writers: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            coalesce: BATCH,
        }
    }

    /// Routes up to `events` of a backlog before writing (at least one
    /// batch). A connection that gets every one of them holds them all in
    /// its queue meanwhile: keep it well under the send queue's size.
    pub fn coalescing(mut self, events: usize) -> Dispatcher {
        self.coalesce = events.max(BATCH);
        self
    }

    /// Sends `SECTOR_ASSIGNMENT_CHANGED` events to the sector sync task.
    pub fn with_sector_sync(mut self, sync: SectorSync) -> Dispatcher {
        self.sectors = Some(sync);
        self
    }

    /// Tells `acks` who received each event asking for an ack.
    pub fn with_acks(mut self, acks: Acks) -> Dispatcher {
        self.acks = Some(acks);
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.queue.pop_batch(&mut batch, BATCH) => {}
            }
            let now_ms = unix_ms();
            let mut routed = 0;
            loop {
                routed += batch.len();
                for event in batch.drain(..) {
                    self.route(event, now_ms);
                }
                // A backlog (a burst): route more before writing, so that
                // each socket gets the burst in a few writes rather than
                // one per event.
                if routed >= self.coalesce || self.queue.is_empty() {
                    break;
                }
                self.queue.pop_batch(&mut batch, BATCH).await;
            }
            if self.flush() {
                // The last share waits in this worker's LIFO slot: let it
                // run before routing more, or a flood that never empties
                // the queue (so never makes this task wait) would hold it
                // back until its connections' queues overflowed.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Routes one event as of `now_ms` (Unix ms) and writes it: what
    /// [`Dispatcher::run`] does with each batch it takes off the queue.
    /// Public so that tests drive the real window and fan-out without a
    /// queue in between.
    pub fn dispatch(&mut self, event: Event, now_ms: i64) {
        self.route(event, now_ms);
        self.flush();
    }

    /// Writes what this batch queued to the connections whose sockets take
    /// it now; the others' tasks were woken to wait for room.
    ///
    /// A large fan-out is split into one share per worker, as the
    /// connections' own tasks once spread it: one writer for 10 000 sockets
    /// left the last of them a whole fan-out behind. Each share is a task,
    /// the dispatcher's own included: tokio puts a task spawned on a worker
    /// in that worker's LIFO slot, which no other worker may steal and for
    /// which none is woken, so one spawned share beside an inline one
    /// waited for it and the split was serial (BENCHMARKS.md, 2026-12-04).
    /// The next spawn moves it to the run queue and wakes an idle worker to
    /// take it. Order is kept whoever writes: a flush writes a connection's
    /// queue front to back, under its lock, and a connection is listed
    /// again only once its queue emptied. True when it spawned the shares.
    fn flush(&mut self) -> bool {
        let shares = (self.to_flush.len() / SPLIT_FANOUT_AT + 1).min(self.writers);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if shares > 1 => {
                let share = self.to_flush.len().div_ceil(shares);
                while !self.to_flush.is_empty() {
                    let at = self.to_flush.len().saturating_sub(share);
                    let handles = self.to_flush.split_off(at);
                    let metrics = self.metrics.clone();
                    runtime.spawn(async move { write_out(&metrics, handles) });
                }
                true
            }
            _ => {
                write_out(&self.metrics, std::mem::take(&mut self.to_flush));
                false
            }
        }
    }

    /// De-duplicates one event and queues it to its audience.
    fn route(&mut self, event: Event, now_ms: i64) {
        let age_ms = event.age_ms(now_ms);
        // A redelivery is the gateway's own, on purpose: never stale.
        let fresh = event.from_history || event.redelivery;
        if !fresh && age_ms.is_some_and(|age| age > self.stale_after_ms) {
            self.metrics.dropped(Drop::Stale);
            tracing::debug!(channel = %event.channel, event_type = %event.fields.event_type, "stale event dropped");
            return;
        }
        let Some(prior) = self
            .recent
            .arrival(&event.key, event.channel, Instant::now())
        else {
            // The same event on the same channel: everyone already has it.
            self.metrics.events_deduplicated.inc();
            return;
        };
        if !prior.is_empty() {
            self.metrics.events_deduplicated.inc();
        } else if !event.redelivery
            && event.fields.event_type == crate::event::SECTOR_ASSIGNMENT_CHANGED
            && let (Some(sync), Some(branch)) = (&self.sectors, event.channel.branch())
        {
            sync.send(SectorCommand::Changed {
                tenant: event.fields.tenant_id,
                branch,
                waiter: event.fields.entity_waiter_id,
            });
        }
        let fanout = self.hub.deliver(&event, &prior, &mut self.to_flush);
        if fanout.receipts > 0
            && let (Some(acks), Some(id)) = (&self.acks, &event.fields.event_id)
        {
            acks.seen(event.fields.tenant_id, id, fanout.receipts);
        }
        let m = &self.metrics;
        m.processed();
        if !event.fields.is_known_type() {
            self.unknown
                .record(&m.unknown_types, &event.fields.event_type);
        }
        m.broadcasts_total.inc_by(fanout.queued as u64);
        m.undelivered(Undelivered::SlowConsumer, fanout.overflowed as u64);
        m.undelivered(Undelivered::ConnectionClosed, fanout.gone as u64);
        m.fanout_size.observe(fanout.queued as f64);
        m.dispatch_seconds
            .observe(event.received_at.elapsed().as_secs_f64());
        if let Some(age) = age_ms {
            m.publish_to_queue_seconds
                .observe(age.max(0) as f64 / 1000.0);
        }
    }
}

/// Writes what was queued to each handle; observes the latency of what went
/// out.
fn write_out(metrics: &Metrics, handles: Vec<Arc<ConnHandle>>) {
    let latency = &metrics.publish_to_client_seconds;
    for handle in handles {
        let published_ms = handle.flush();
        if published_ms > 0 {
            latency.observe((unix_ms() - published_ms).max(0) as f64 / 1000.0);
        }
    }
}

/// The events seen within the de-duplication window, and on which channels.
struct Recent {
    window: Duration,
    channels: HashMap<DedupKey, (Instant, Vec<Channel>)>,
    order: VecDeque<(Instant, DedupKey)>,
}

impl Recent {
    fn new(window: Duration) -> Recent {
        Recent {
            window,
            channels: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records an arrival. Returns the channels the event already arrived on
    /// within the window (empty for a new event), or `None` when it already
    /// arrived on this very channel.
    fn arrival(&mut self, key: &DedupKey, channel: Channel, now: Instant) -> Option<Vec<Channel>> {
        self.expire(now);
        match self.channels.get_mut(key) {
            Some((_, seen)) if seen.contains(&channel) => None,
            Some((_, seen)) => {
                let prior = seen.clone();
                seen.push(channel);
                Some(prior)
            }
            None => {
                self.channels.insert(key.clone(), (now, vec![channel]));
                self.order.push_back((now, key.clone()));
                Some(Vec::new())
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            let too_many = self.order.len() > MAX_REMEMBERED;
            if !too_many && now.duration_since(*at) < self.window {
                break;
            }
            let (at, key) = self.order.pop_front().expect("front exists");
            if self
                .channels
                .get(&key)
                .is_some_and(|(first, _)| *first == at)
            {
                self.channels.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Limits, Member, Registration, SectorScope};
    use crate::metrics::Drop;

    #[test]
    fn stale_events_are_dropped_and_counted_fresh_ones_delivered() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(
            Limits {
                max_total: 10,
                max_per_user: 10,
                max_per_session: 10,
            },
            metrics.clone(),
        ));
        let queue = Arc::new(EventQueue::new(10, metrics.clone()));
        let member = Member::Staff {
            user_id: 1,
            branch_ids: vec![5],
            sectors: SectorScope::All,
        };
        let reg = hub
            .register(Registration {
                tenant_id: 1,
                endpoint: crate::auth::Endpoint::Admin,
                member,
                expires_at: 0,
                jti: None,
                queue_capacity: 10,
                greeting: None,
            })
            .unwrap();
        let mut d = Dispatcher::new(
            hub,
            queue,
            metrics.clone(),
            Duration::from_secs(30),
            Duration::from_secs(5),
        );
        let now = 1_764_680_000_000;
        let ev = |ts: i64| {
            let text = format!(r#"{{"type":"X","tenant_id":1,"branch_id":5,"ts":{ts}}}"#);
            Event::parse(Channel::BranchAdmin(5), bytes::Bytes::from(text)).unwrap()
        };
        d.dispatch(ev(now - 30_001), now);
        assert_eq!(metrics.dropped_count(Drop::Stale), 1);
        assert!(reg.handle.pop().is_none());
        d.dispatch(ev(now - 29_000), now);
        assert!(reg.handle.pop().is_some());
        assert_eq!(metrics.events_processed.get(), 1);
    }

    #[test]
    fn equal_event_ids_of_two_tenants_are_two_events() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(
            Limits {
                max_total: 10,
                max_per_user: 10,
                max_per_session: 10,
            },
            metrics.clone(),
        ));
        let admin = |tenant| {
            hub.register(Registration {
                tenant_id: tenant,
                endpoint: crate::auth::Endpoint::Admin,
                member: Member::Staff {
                    user_id: 1,
                    branch_ids: vec![5],
                    sectors: SectorScope::All,
                },
                expires_at: 0,
                jti: None,
                queue_capacity: 10,
                greeting: None,
            })
            .unwrap()
        };
        let (one, two) = (admin(1), admin(2));
        let queue = Arc::new(EventQueue::new(10, metrics.clone()));
        let mut d = Dispatcher::new(
            hub.clone(),
            queue,
            metrics.clone(),
            Duration::from_secs(30),
            Duration::from_secs(5),
        );
        let ev = |tenant: i64| {
            let text = format!(
                r#"{{"event_id":"order-1","type":"X","tenant_id":{tenant},"branch_id":5}}"#
            );
            Event::parse(Channel::BranchAdmin(5), bytes::Bytes::from(text)).unwrap()
        };
        let now = unix_ms();
        d.dispatch(ev(1), now);
        d.dispatch(ev(2), now);
        assert!(one.handle.pop().is_some() && one.handle.pop().is_none());
        assert!(two.handle.pop().is_some(), "tenant 2's own order-1");
        assert_eq!(metrics.events_deduplicated.get(), 0);
        d.dispatch(ev(2), now);
        assert!(two.handle.pop().is_none(), "a repeat within tenant 2");
        assert_eq!(metrics.events_deduplicated.get(), 1);
    }

    #[test]
    fn repeats_within_the_window_report_prior_channels() {
        let mut r = Recent::new(Duration::from_secs(5));
        let k = DedupKey::Id {
            tenant: 1,
            id: "e1".into(),
        };
        let t0 = Instant::now();
        let a = Channel::BranchWaiters(5);
        let b = Channel::BranchAdmin(5);
        assert_eq!(r.arrival(&k, a, t0), Some(vec![]));
        assert_eq!(r.arrival(&k, a, t0 + Duration::from_secs(1)), None);
        assert_eq!(r.arrival(&k, b, t0 + Duration::from_secs(2)), Some(vec![a]));
        assert_eq!(r.arrival(&k, b, t0 + Duration::from_secs(3)), None);
        // After the window it is a new event again.
        assert_eq!(r.arrival(&k, a, t0 + Duration::from_secs(6)), Some(vec![]));
        assert_eq!(r.channels.len(), 1);
    }
}
