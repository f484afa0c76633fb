//! The bounded event queue between the brokers and the dispatcher.
//!
//! Seed behaviour: a fixed capacity (5000) and drop-oldest. A burst larger
//! than the queue loses its oldest events, never blocks a broker, and every
//! loss is counted.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::history::Scope;
use crate::channel::Channel;
use tungstenite::Utf8Bytes;

use crate::event::{Event, Fields, Refusal};
use crate::metrics::{Drop, Metrics};

/// How a numbered event reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Its publication's message.
    Live,
    /// Read from history into a subscription gap.
    History,
    /// The one redelivery of an unacknowledged event.
    Redelivery,
}

pub struct EventQueue {
    /// A `parking_lot` mutex: pushes and pops are a few pointer moves and
    /// nothing is awaited while it is held.
    events: Mutex<VecDeque<Event>>,
    capacity: usize,
    ready: Notify,
    metrics: Arc<Metrics>,
}

impl EventQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> EventQueue {
        EventQueue {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            ready: Notify::new(),
            metrics,
        }
    }

    /// Appends an event; when the queue is full its oldest event is dropped.
    pub fn push(&self, event: Event) {
        let dropped_oldest = {
            let mut events = self.events.lock();
            let full = events.len() >= self.capacity;
            if full {
                events.pop_front();
            }
            events.push_back(event);
            full
        };
        if dropped_oldest {
            self.metrics.dropped(Drop::QueueFull);
        }
        self.ready.notify_one();
    }

    /// Validates a message as it arrived from a broker (channel name and
    /// raw payload) and queues it; an invalid one is counted by its
    /// refusal (the publish API's code for it), logged with its reason,
    /// and dropped.
    pub fn ingest(&self, channel: &str, payload: Bytes) {
        let parsed = channel
            .parse::<Channel>()
            .map_err(|e| (Refusal::UnknownChannel, e.to_string()))
            .and_then(|c| Event::parse(c, payload).map_err(|e| (e.refusal(), e.to_string())));
        match parsed {
            Ok(event) => self.push(event),
            Err((refusal, reason)) => {
                self.metrics.dropped(refusal.into());
                tracing::warn!(channel = %channel.chars().take(200).collect::<String>(), code = refusal.code(), %reason, "invalid event dropped");
            }
        }
    }

    /// Queues one numbered event (read once) on each of its channels, as
    /// it arrived (`Arrival::History`: filled into a subscription gap). A live
    /// message names its `scope` (its scope channel's): the event must be
    /// of that tenant and its channels of that scope, or it is dropped as
    /// invalid. Returns whether it was queued.
    pub fn ingest_numbered(
        &self,
        channels: &[Channel],
        frame: Utf8Bytes,
        arrival: Arrival,
        scope: Option<Scope>,
    ) -> bool {
        let fields = match Fields::parse(frame.as_str()) {
            Ok(fields) => fields,
            Err(reason) => {
                self.metrics.dropped(reason.refusal().into());
                tracing::warn!(code = reason.refusal().code(), %reason, "invalid numbered event dropped");
                return false;
            }
        };
        if let Some(scope) = scope
            && channels.iter().any(|c| Scope::of(*c, &fields) != scope)
        {
            self.metrics.dropped(Drop::Invalid);
            tracing::warn!(
                scope = %scope.suffix(),
                "numbered event dropped: not of the tenant and scope of its channel"
            );
            return false;
        }
        let mut queued = false;
        for channel in channels {
            match Event::assemble(*channel, fields.clone(), frame.clone()) {
                Ok(mut event) => {
                    event.from_history = arrival == Arrival::History;
                    if arrival == Arrival::Redelivery {
                        event = event.redelivered();
                    }
                    self.push(event);
                    queued = true;
                }
                Err(reason) => {
                    self.metrics.dropped(reason.refusal().into());
                    tracing::warn!(%channel, code = reason.refusal().code(), %reason, "invalid event dropped");
                }
            }
        }
        queued
    }

    /// Waits for events, then moves up to `max` of them into `out`.
    pub async fn pop_batch(&self, out: &mut Vec<Event>, max: usize) {
        loop {
            {
                let mut events = self.events.lock();
                if !events.is_empty() {
                    let n = events.len().min(max);
                    out.extend(events.drain(..n));
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Event {
        let text = format!(r#"{{"type":"X","tenant_id":1,"branch_id":5,"n":{n}}}"#);
        Event::parse(Channel::BranchAdmin(5), Bytes::from(text)).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_and_counts_each() {
        let metrics = Arc::new(Metrics::new());
        let q = EventQueue::new(3, metrics.clone());
        for n in 0..5 {
            q.push(event(n));
        }
        assert_eq!(metrics.dropped_count(Drop::QueueFull), 2);
        let mut out = Vec::new();
        q.pop_batch(&mut out, 10).await;
        let texts: Vec<&str> = out.iter().map(|e| e.frame.as_str()).collect();
        assert!(
            texts[0].contains("\"n\":2") && texts[2].contains("\"n\":4"),
            "{texts:?}"
        );
    }

    #[tokio::test]
    async fn invalid_messages_are_counted_not_queued() {
        let metrics = Arc::new(Metrics::new());
        let q = EventQueue::new(10, metrics.clone());
        q.ingest("channel:nope", Bytes::from_static(b"{}"));
        q.ingest("channel:branch:5:admin", Bytes::from_static(b"{oops"));
        q.ingest(
            "channel:branch:5:admin",
            Bytes::from_static(br#"{"type":"X","tenant_id":1,"branch_id":5}"#),
        );
        q.ingest(
            "channel:branch:5:admin",
            Bytes::from_static(br#"{"type":"pong","tenant_id":1,"branch_id":5}"#),
        );
        assert_eq!(metrics.dropped_count(Drop::UnknownChannel), 1);
        assert_eq!(metrics.dropped_count(Drop::Invalid), 1);
        assert_eq!(metrics.dropped_count(Drop::ReservedType), 1);
        assert_eq!(q.len(), 1);
    }
}
