//! Brokers: where events come from.
//!
//! A broker carries published events to every gateway node and feeds each
//! node's [`EventQueue`]. The embedded broker (one node, no dependencies) is
//! the default; the Redis broker connects several nodes. The [`Broker`]
//! trait is the seam for the next ones (Redis Cluster sharded pub/sub, NATS).

mod backoff;
pub mod breaker;
mod embedded;
mod queue;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use self::redis::{BadRedisUrl, RedisBroker, RedisTiming};
pub use breaker::{BreakerConfig, BreakerState};
pub use embedded::EmbeddedBroker;
pub use queue::EventQueue;

use crate::channel::Channel;
use crate::event::{Fields, unix_ms};

/// One validated event to publish on one or more channels.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channels: Vec<Channel>,
    /// The event object as the caller sent it.
    pub event: Map<String, Value>,
    /// Its routing fields, already checked against every channel.
    pub fields: Fields,
}

/// Why a publication could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// What `/ws/health/detailed` reports of a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    pub kind: &'static str,
    /// Whether events published now would reach this node.
    pub connected: bool,
    /// The circuit breaker's state and consecutive failures, if it has one.
    pub breaker: Option<(BreakerState, u32)>,
}

pub trait Broker: Send + Sync {
    /// Publishes each event on its channels, so that every node receives it;
    /// returns the event ids, one per publication, in order.
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<Vec<String>, BrokerError>>;

    fn status(&self) -> BrokerStatus;

    /// The broker's background work (subscriptions, health checks), until
    /// `shutdown` is cancelled.
    fn run(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        drop(shutdown);
        Box::pin(async {})
    }
}

/// Gives events their `event_id`: `<unix ms>-<sequence>`, increasing within
/// a node, with a random node tag when several nodes publish.
pub struct EventIds {
    seq: AtomicU64,
    node: Option<u32>,
}

impl EventIds {
    /// Ids for the only node.
    pub fn single_node() -> EventIds {
        EventIds {
            seq: AtomicU64::new(0),
            node: None,
        }
    }

    /// Ids that cannot collide with another node's.
    pub fn for_cluster() -> EventIds {
        EventIds {
            seq: AtomicU64::new(0),
            node: Some(rand::random()),
        }
    }

    fn next(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        match self.node {
            None => format!("{}-{seq}", unix_ms()),
            Some(node) => format!("{}-{seq}-{node:08x}", unix_ms()),
        }
    }

    /// Gives the publication its id (unless the caller gave one) and
    /// serializes it, once.
    pub fn stamp(&self, publication: Publication) -> (String, Utf8Bytes, Vec<Channel>) {
        let Publication {
            channels,
            mut event,
            fields,
        } = publication;
        let id = fields.event_id.unwrap_or_else(|| self.next());
        event.insert("event_id".into(), Value::String(id.clone()));
        let frame = Utf8Bytes::from(Value::Object(event).to_string());
        (id, frame, channels)
    }
}
