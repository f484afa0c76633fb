//! The embedded in-process broker: one node, no dependencies.
//!
//! Publishing serializes each event once (adding its `event_id`) and puts
//! it, once per channel, straight into this node's event queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;

use super::{Broker, BrokerError, BrokerStatus, EventQueue, Publication};
use crate::event::{Event, unix_ms};

pub struct EmbeddedBroker {
    queue: Arc<EventQueue>,
    seq: AtomicU64,
}

impl EmbeddedBroker {
    pub fn new(queue: Arc<EventQueue>) -> EmbeddedBroker {
        EmbeddedBroker {
            queue,
            seq: AtomicU64::new(0),
        }
    }

    /// A new id, `<unix ms>-<sequence>`: unique in this process and
    /// increasing, in the shape of a Redis Stream id.
    fn next_id(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{seq}", unix_ms())
    }

    fn publish_now(&self, batch: Vec<Publication>) -> Vec<String> {
        batch
            .into_iter()
            .map(
                |Publication {
                     channels,
                     mut event,
                     mut fields,
                 }| {
                    let id = fields.event_id.clone().unwrap_or_else(|| self.next_id());
                    event.insert("event_id".into(), Value::String(id.clone()));
                    fields.event_id = Some(id.clone());
                    let frame = Utf8Bytes::from(Value::Object(event).to_string());
                    for channel in channels {
                        match Event::assemble(channel, fields.clone(), frame.clone()) {
                            Ok(e) => self.queue.push(e),
                            // Publications are validated before they get here.
                            Err(why) => tracing::error!(%why, "unvalidated publication"),
                        }
                    }
                    id
                },
            )
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
        }
    }
}
