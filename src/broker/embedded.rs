//! The embedded in-process broker: one node, no dependencies.
//!
//! Publishing keeps each event in the in-memory history (which gives it its
//! sequence number and `event_id`), serializes it once, and puts it, once per
//! channel, straight into this node's event queue.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use super::history::{MemoryHistory, frame_with_id};
use super::{
    Broker, BrokerError, BrokerStatus, Cursor, EventQueue, Found, HistoryLimits, Publication,
    Published, Scope,
};
use crate::auth::TenantId;
use crate::channel::Channel;
use crate::event::Event;

pub struct EmbeddedBroker {
    queue: Arc<EventQueue>,
    history: MemoryHistory,
    /// Held across "number, then queue" so that events reach the queue in
    /// sequence order. Nothing is awaited while it is held.
    publishing: Mutex<()>,
}

impl EmbeddedBroker {
    pub fn new(queue: Arc<EventQueue>, limits: HistoryLimits) -> EmbeddedBroker {
        EmbeddedBroker {
            queue,
            history: MemoryHistory::new(limits),
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
                for &channel in channels.iter() {
                    match Event::assemble(channel, fields.clone(), frame.clone()) {
                        Ok(e) => self.queue.push(e),
                        // Publications are validated before they get here.
                        Err(why) => tracing::error!(%why, "unvalidated publication"),
                    }
                }
                Published {
                    id,
                    duplicate: false,
                }
            })
            .collect()
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
