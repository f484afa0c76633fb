//! Brokers: where events come from.
//!
//! A broker carries published events to every gateway node and feeds each
//! node's [`EventQueue`]; it also keeps the history that resuming clients
//! read. The embedded broker (one node, no dependencies) is the default; the
//! Redis broker connects several nodes. The [`Broker`] trait is the seam for
//! the next ones (Redis Cluster sharded pub/sub, NATS).

pub mod acks;
pub mod backoff;
pub mod breaker;
mod embedded;
pub mod history;
mod publication;
mod queue;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use self::redis::connector::Connector as RedisConnector;
pub use self::redis::link::{Conn as RedisConn, LinkError, RedisLink, UnsupportedRedis};
pub use self::redis::names::{LibraryBounds, Names as RedisNames};
pub use self::redis::signing::ChannelKey as RedisChannelKey;
pub use self::redis::{RedisBounds, RedisBroker, RedisTiming};
pub use breaker::{BreakerConfig, BreakerState};
pub use embedded::EmbeddedBroker;
pub use history::{Cursor, Found, HistoryLimits, Scope};
pub use publication::{Invalid, Rules, read_item};
pub use queue::{Arrival, EventQueue};

use crate::auth::TenantId;
use crate::channel::Channel;
use crate::event::{Fields, unix_ms};
use crate::reply::ResyncReason;

/// One validated event to publish on one or more channels.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channels: Vec<Channel>,
    /// The event object as the caller sent it.
    pub event: Map<String, Value>,
    /// Its routing fields, already checked against every channel.
    pub fields: Fields,
}

impl Publication {
    /// The event serialized once, as the caller sent it; the broker puts
    /// the `event_id` in front when the caller gave none.
    fn payload(&self) -> String {
        Value::Object(self.event.clone()).to_string()
    }
}

/// What publishing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id: the caller's `event_id`, or its number.
    pub id: String,
    /// The tenant had used this caller `event_id` within the history's age:
    /// nothing was published, and `id` names the first publication.
    pub duplicate: bool,
}

/// Why a broker could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing was published (the breaker is open, no connection).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request reached the broker but no answer came in time: it may
    /// have been published. A caller that set `event_id` can retry safely.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

/// What `/ws/health/detailed` reports of a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    pub kind: &'static str,
    /// Whether events published now would reach this node's connections.
    pub connected: bool,
    /// Whether this node can publish (and read history) now.
    pub publishing: bool,
    /// Why it cannot deliver or publish, while it cannot.
    pub reason: Option<String>,
    /// The circuit breaker's state and consecutive failures, if it has one.
    pub breaker: Option<(BreakerState, u32)>,
    /// The master in use (`host:port`), when the broker follows one
    /// (Redis Sentinel).
    pub master: Option<String>,
}

/// What a broker needs of this node's connections: whose events to
/// subscribe to, and whose history to read after a gap (implemented by the
/// hub).
pub trait Listeners: Send + Sync {
    /// The history scopes of the open connections, sorted, each once.
    fn scopes(&self) -> Vec<Scope>;
    /// Signalled whenever [`Listeners::scopes`] may have changed.
    fn changes(&self) -> &ScopeChanges;
    /// Tells the connections in `scopes` (sorted; all, when `None`) that
    /// events they should have had are lost; returns how many were told.
    fn events_lost(&self, scopes: Option<&[Scope]>, reason: ResyncReason) -> usize;
}

/// The signal a hub gives when a scope gains its first connection or loses
/// its last: a subscriber that follows the audience wakes, waits a little
/// for more changes, and subscribes or unsubscribes them together.
#[derive(Debug, Default)]
pub struct ScopeChanges {
    notify: tokio::sync::Notify,
    /// When the oldest change not yet taken happened (Unix µs, this
    /// node's clock; 0: none): a new scope's connections may have been
    /// waiting since then for events its subscription did not carry yet.
    since_us: AtomicI64,
}

impl ScopeChanges {
    /// Notes a change now.
    pub fn changed(&self) {
        let now = unix_ms().saturating_mul(1000).max(1);
        let _ = self
            .since_us
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    /// Waits for a change (one noted before the call counts).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// When the oldest change not taken yet happened, and forgets it.
    pub fn take_since_us(&self) -> Option<i64> {
        Some(self.since_us.swap(0, Ordering::AcqRel)).filter(|&t| t != 0)
    }

    /// Gives back what [`ScopeChanges::take_since_us`] took, when the
    /// changes could not be applied after all.
    pub fn give_back(&self, since_us: Option<i64>) {
        if let Some(since) = since_us {
            let _ = self
                .since_us
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                    Some(if now == 0 { since } else { now.min(since) })
                });
        }
    }
}

pub trait Broker: Send + Sync {
    /// Publishes each event on its channels, so that every node receives it,
    /// and keeps it in history, unless its caller id was used already;
    /// returns what each publication did, in order.
    fn publish(
        &self,
        batch: Vec<Publication>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>>;

    /// What was kept in `scopes` after `cursor`, for a resuming client.
    fn resume(
        &self,
        tenant: TenantId,
        scopes: Vec<Scope>,
        cursor: Cursor,
    ) -> BoxFuture<'_, Result<Found, BrokerError>>;

    fn status(&self) -> BrokerStatus;

    /// Acknowledges events of `tenant` that a connection received and
    /// acked; what each ack did, in order.
    fn ack(
        &self,
        tenant: TenantId,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<acks::AckOutcome>, BrokerError>>;

    /// Adds this node's new recipients of events that asked for an ack to
    /// their audience.
    fn seen(&self, seen: Vec<acks::Seen>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Whether [`Broker::sweep_acks`] needs this node's tenants: only a
    /// cluster's, whose function cannot find every tenant with deadlines
    /// by itself.
    fn sweeps_per_tenant(&self) -> bool {
        false
    }

    /// Takes the steps of the acknowledgement deadlines that are past:
    /// the redelivery, then the escalation, each exactly once whichever
    /// node asks. `tenants` are this node's where
    /// [`Broker::sweeps_per_tenant`], else empty.
    fn sweep_acks(
        &self,
        tenants: Vec<TenantId>,
    ) -> BoxFuture<'_, Result<Vec<acks::AckStep>, BrokerError>>;

    /// The broker's background work (subscriptions, health checks), until
    /// `shutdown` is cancelled.
    fn run(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        drop(shutdown);
        Box::pin(async {})
    }
}
