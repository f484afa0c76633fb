//! The Redis broker: pub/sub on the seed's channels, so that the backend
//! can publish from any language and every gateway node delivers.
//!
//! Two connections, as Redis wants them: a pub/sub connection owned by the
//! subscriber task (pattern subscriptions to the five channel families), and
//! a multiplexed, self-reconnecting connection for publishing and health
//! checks. Losing Redis never takes the gateway down: the subscriber
//! reconnects with decorrelated jitter and re-subscribes, every call goes
//! through the circuit breaker, and the status says "disconnected" while no
//! event can arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use super::{Broker, BrokerError, BrokerStatus, EventIds, EventQueue, Publication};
use crate::channel::Channel;
use crate::metrics::Metrics;

/// Timing of the Redis connections.
#[derive(Debug, Clone, Copy)]
pub struct RedisTiming {
    /// One connect or one command.
    pub timeout: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub health_check: Duration,
}

pub struct RedisBroker {
    client: redis::Client,
    publisher: ConnectionManager,
    queue: Arc<EventQueue>,
    breaker: CircuitBreaker,
    /// True while the subscriber holds live pattern subscriptions.
    subscribed: AtomicBool,
    timing: RedisTiming,
    ids: EventIds,
}

/// Why the Redis broker could not be built (a malformed URL).
#[derive(Debug, thiserror::Error)]
#[error("invalid setting REDIS_URL (--redis-url): {0}")]
pub struct BadRedisUrl(String);

impl RedisBroker {
    /// Builds the broker without connecting: the gateway starts, and serves,
    /// whether Redis is up or not.
    pub fn new(
        url: &str,
        timing: RedisTiming,
        breaker: BreakerConfig,
        queue: Arc<EventQueue>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, BadRedisUrl> {
        // The error text of a URL may contain the URL (and its password).
        let client = redis::Client::open(url)
            .map_err(|e| BadRedisUrl(format!("not a Redis URL ({:?})", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timing.timeout))
            .set_response_timeout(Some(timing.timeout))
            .set_number_of_retries(1)
            .set_max_delay(timing.retry_max);
        let publisher = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| BadRedisUrl(format!("{:?}", e.kind())))?;
        Ok(RedisBroker {
            client,
            publisher,
            queue,
            breaker: CircuitBreaker::new("redis", breaker, metrics),
            subscribed: AtomicBool::new(false),
            timing,
            ids: EventIds::for_cluster(),
        })
    }

    /// Runs one call through the breaker, with the command timeout.
    async fn call<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        if !self.breaker.allow() {
            return Err(BrokerError::Unavailable("circuit breaker open".into()));
        }
        match tokio::time::timeout(self.timing.timeout, op).await {
            Ok(Ok(value)) => {
                self.breaker.success();
                Ok(value)
            }
            Ok(Err(e)) => {
                self.breaker.failure();
                Err(BrokerError::Unavailable(format!("redis: {:?}", e.kind())))
            }
            Err(_) => {
                self.breaker.failure();
                Err(BrokerError::Unavailable("redis: timed out".into()))
            }
        }
    }

    /// Subscribes, forwards every message to the event queue until the
    /// connection is lost, and starts again after a jittered delay.
    async fn subscribe_forever(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.timing.retry_base, self.timing.retry_max);
        loop {
            let wait = self.breaker.wait_hint();
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            match self.call(self.open_subscription()).await {
                Ok(pubsub) => {
                    backoff.reset();
                    self.subscribed.store(true, Ordering::Release);
                    tracing::info!("subscribed to Redis");
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = messages.next() => match message {
                                Some(m) => self.queue.ingest(
                                    m.get_channel_name(),
                                    Bytes::copy_from_slice(m.get_payload_bytes()),
                                ),
                                None => break,
                            }
                        }
                    }
                    self.subscribed.store(false, Ordering::Release);
                    self.breaker.failure();
                    tracing::warn!("lost the Redis subscription; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to Redis"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn open_subscription(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        for pattern in Channel::PATTERNS {
            pubsub.psubscribe(pattern).await?;
        }
        Ok(pubsub)
    }

    /// PINGs Redis periodically, so that an outage is seen (and the breaker
    /// moves) even when nothing is published.
    async fn check_health_forever(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.timing.health_check);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let mut conn = self.publisher.clone();
            let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
            if let Err(e) = self.call(ping).await {
                tracing::debug!(error = %e, "Redis health check failed");
            }
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<Vec<String>, BrokerError>> {
        // One MULTI/EXEC: a batch is published whole or not at all.
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ids = batch
            .into_iter()
            .map(|publication| {
                let (id, frame, channels) = self.ids.stamp(publication);
                for channel in channels {
                    pipe.publish(channel.to_string(), frame.as_str()).ignore();
                }
                id
            })
            .collect::<Vec<_>>();
        Box::pin(async move {
            let mut conn = self.publisher.clone();
            self.call(pipe.query_async::<()>(&mut conn)).await?;
            Ok(ids)
        })
    }

    fn status(&self) -> BrokerStatus {
        let (state, failures) = self.breaker.snapshot();
        BrokerStatus {
            kind: "redis",
            connected: self.subscribed.load(Ordering::Acquire) && state != BreakerState::Open,
            breaker: Some((state, failures)),
        }
    }

    fn run(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            tokio::join!(
                self.clone().subscribe_forever(shutdown.clone()),
                self.check_health_forever(shutdown),
            );
        })
    }
}
