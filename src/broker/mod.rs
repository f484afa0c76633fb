//! Brokers: where events come from.
//!
//! A broker carries published events to every gateway node and feeds each
//! node's [`EventQueue`]. The embedded broker (one node, no dependencies) is
//! the default; the trait is the seam for Redis and later NATS.

mod embedded;
mod queue;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

pub use embedded::EmbeddedBroker;
pub use queue::EventQueue;

use crate::channel::Channel;
use crate::event::Fields;

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
    pub connected: bool,
}

pub trait Broker: Send + Sync {
    /// Publishes each event on its channels, so that every node receives it;
    /// returns the event ids, one per publication, in order.
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<Vec<String>, BrokerError>>;

    fn status(&self) -> BrokerStatus;
}
