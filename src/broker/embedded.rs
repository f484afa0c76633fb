//! The embedded in-process broker: one node, no dependencies.
//!
//! Publishing serializes each event once (adding its `event_id`) and puts
//! it, once per channel, straight into this node's event queue.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Broker, BrokerError, BrokerStatus, EventIds, EventQueue, Publication};
use crate::event::Event;

pub struct EmbeddedBroker {
    queue: Arc<EventQueue>,
    ids: EventIds,
}

impl EmbeddedBroker {
    pub fn new(queue: Arc<EventQueue>) -> EmbeddedBroker {
        EmbeddedBroker {
            queue,
            ids: EventIds::single_node(),
        }
    }

    fn publish_now(&self, batch: Vec<Publication>) -> Vec<String> {
        batch
            .into_iter()
            .map(|publication| {
                let mut fields = publication.fields.clone();
                let (id, frame, channels) = self.ids.stamp(publication);
                fields.event_id = Some(id.clone());
                for channel in channels {
                    match Event::assemble(channel, fields.clone(), frame.clone()) {
                        Ok(e) => self.queue.push(e),
                        // Publications are validated before they get here.
                        Err(why) => tracing::error!(%why, "unvalidated publication"),
                    }
                }
                id
            })
            .collect()
    }
}

impl Broker for EmbeddedBroker {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<Vec<String>, BrokerError>> {
        let ids = self.publish_now(batch);
        Box::pin(async move { Ok(ids) })
    }

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "embedded",
            connected: true,
            breaker: None,
        }
    }
}
