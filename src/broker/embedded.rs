//! The embedded in-process broker: one node, no dependencies.
//!
//! Publishing keeps each event in the in-memory history (which gives it its
//! sequence number and `event_id`), serializes it once, and puts it, once per
//! channel, straight into this node's event queue.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tungstenite::Utf8Bytes;

use super::acks::{AckOutcome, AckStep, Due, Escalation, MemoryAcks, Seen};
use super::history::{MemoryHistory, frame_with_id};
use super::{
    Broker, BrokerError, BrokerStatus, Cursor, EventQueue, Found, HistoryLimits, Publication,
    Published, Scope,
};
use crate::auth::TenantId;
use crate::channel::Channel;
use crate::event::{Event, Fields, redelivery_frame, unix_ms};

pub struct EmbeddedBroker {
    queue: Arc<EventQueue>,
    history: MemoryHistory,
    acks: MemoryAcks,
    /// Held across "number, then queue" so that events reach the queue in
    /// sequence order. Nothing is awaited while it is held.
    publishing: Mutex<()>,
}

impl EmbeddedBroker {
    pub fn new(queue: Arc<EventQueue>, limits: HistoryLimits) -> EmbeddedBroker {
        EmbeddedBroker {
            queue,
            history: MemoryHistory::new(limits),
            acks: MemoryAcks::default(),
            publishing: Mutex::new(()),
        }
    }

    fn publish_now(&self, batch: Vec<Publication>) -> Vec<Published> {
        let _order = self.publishing.lock();
        batch
            .into_iter()
            .map(|publication| {
                let payload = publication.payload();
                let caller_id = publication.fields.event_id.is_some();
                let channels: Arc<[Channel]> = publication.channels.into();
                let kept = self.history.append(&channels, &publication.fields, |id| {
                    if caller_id {
                        payload
                    } else {
                        frame_with_id(id, &payload)
                    }
                });
                let (id, frame) = match kept {
                    Ok(kept) => kept,
                    Err(id) => {
                        return Published {
                            id,
                            duplicate: true,
                        };
                    }
                };
                let mut fields = publication.fields;
                fields.event_id = Some(id.clone());
                if let Some(within_s) = fields.ack_within_s {
                    self.acks.register(
                        &id,
                        within_s,
                        frame.clone(),
                        channels.clone(),
                        fields.clone(),
                        unix_ms(),
                    );
                }
                self.queue_all(&channels, &fields, &frame, false);
                Published {
                    id,
                    duplicate: false,
                }
            })
            .collect()
    }

    /// Queues the event once per channel.
    fn queue_all(&self, channels: &[Channel], fields: &Fields, frame: &Utf8Bytes, again: bool) {
        for &channel in channels {
            match Event::assemble(channel, fields.clone(), frame.clone()) {
                Ok(e) if again => self.queue.push(e.redelivered()),
                Ok(e) => self.queue.push(e),
                // Publications are validated before they get here.
                Err(why) => tracing::error!(%why, "unvalidated publication"),
            }
        }
    }

    /// Keeps and queues an escalation, numbered like any event; its
    /// `event_id` is the reported event's.
    fn escalate(&self, escalation: &Escalation) {
        let payload = escalation.payload(unix_ms());
        let Ok(mut fields) = Fields::parse(&payload) else {
            tracing::error!("an escalation did not read back");
            return;
        };
        let channels: Arc<[Channel]> = vec![escalation.admin_channel()].into();
        let reported = fields.event_id.take();
        let kept = self.history.append(&channels, &fields, |_| payload);
        if let Ok((_, frame)) = kept {
            fields.event_id = reported;
            self.queue_all(&channels, &fields, &frame, false);
        }
    }
}

impl Broker for EmbeddedBroker {
    fn publish(
        &self,
        batch: Vec<Publication>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>> {
        let ids = self.publish_now(batch);
        Box::pin(async move { Ok(ids) })
    }

    fn resume(
        &self,
        tenant: TenantId,
        scopes: Vec<Scope>,
        cursor: Cursor,
    ) -> BoxFuture<'_, Result<Found, BrokerError>> {
        let found = self.history.after(tenant, &scopes, &cursor);
        Box::pin(async move { Ok(found) })
    }

    fn ack(
        &self,
        tenant: TenantId,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<AckOutcome>, BrokerError>> {
        let outcomes = self.acks.ack(tenant, &ids);
        Box::pin(async move { Ok(outcomes) })
    }

    fn seen(&self, seen: Vec<Seen>) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.acks.seen(&seen);
        Box::pin(async { Ok(()) })
    }

    fn sweep_acks(
        &self,
        _tenants: Vec<TenantId>,
    ) -> BoxFuture<'_, Result<Vec<AckStep>, BrokerError>> {
        let due = self.acks.due(unix_ms());
        let steps = if due.is_empty() {
            Vec::new()
        } else {
            let _order = self.publishing.lock();
            due.into_iter()
                .map(|step| match step {
                    Due::Redeliver {
                        frame,
                        channels,
                        fields,
                    } => {
                        let again = Utf8Bytes::from(redelivery_frame(frame.as_str()));
                        self.queue_all(&channels, &fields, &again, true);
                        AckStep::Redelivered {
                            tenant: fields.tenant_id,
                            event_id: fields.event_id.unwrap_or_default(),
                        }
                    }
                    Due::Escalate(escalation) => {
                        self.escalate(&escalation);
                        AckStep::Escalated(escalation)
                    }
                })
                .collect()
        };
        Box::pin(async move { Ok(steps) })
    }

    /// Prunes expired history every minute.
    fn run(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => self.history.prune(),
                }
            }
        })
    }

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "embedded",
            connected: true,
            publishing: true,
            reason: None,
            breaker: None,
            master: None,
        }
    }
}
