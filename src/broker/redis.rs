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
use super::history::{Entry, scopes_of};
use super::{
    Broker, BrokerError, BrokerStatus, Cursor, EventQueue, Found, HistoryLimits, Publication, Scope,
};
use crate::auth::TenantId;
use crate::channel::Channel;
use crate::event::unix_ms;
use crate::metrics::Metrics;

/// The counter that numbers every event published through the gateway.
const SEQUENCE_KEY: &str = "wsgateway:history:seq";

/// Publishes a batch atomically and keeps it in history (Redis Streams).
static PUBLISH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/publish.lua")));

/// Reads what a resuming client missed.
static HISTORY: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/history.lua")));

/// Where a caller-supplied `event_id` maps to its sequence number.
fn caller_id_key(tenant: TenantId, id: &str) -> String {
    format!("wsgateway:history:{tenant}:eid:{id}")
}

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
    history: HistoryLimits,
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
        history: HistoryLimits,
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
            history,
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
        // One script call: the batch is numbered, kept and published
        // atomically, so every node sees the same ids.
        let mut keys: Vec<String> = vec![SEQUENCE_KEY.to_owned()];
        let mut key_index = |key: String| -> usize {
            match keys.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key);
                    keys.len()
                }
            }
        };
        let mut items = Vec::with_capacity(batch.len());
        let mut payloads = Vec::with_capacity(batch.len());
        for p in &batch {
            let streams: Vec<usize> = scopes_of(&p.channels, &p.fields)
                .into_iter()
                .map(|scope| key_index(scope.redis_key()))
                .collect();
            let (caller, index) = match &p.fields.event_id {
                Some(id) => (
                    id.as_str(),
                    key_index(caller_id_key(p.fields.tenant_id, id)),
                ),
                None => ("", 0),
            };
            let channels: Vec<String> = p.channels.iter().map(Channel::to_string).collect();
            items.push(serde_json::json!({"e": caller, "c": channels, "s": streams, "i": index}));
            payloads.push(p.payload());
        }
        let spec = serde_json::json!({
            "size": self.history.size,
            "ttl_ms": self.history.ttl.as_millis() as u64,
            "items": items,
        });
        let mut invocation = PUBLISH.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation.arg(spec.to_string());
        for payload in &payloads {
            invocation.arg(payload);
        }
        Box::pin(async move {
            let mut conn = self.publisher.clone();
            self.call(invocation.invoke_async::<Vec<String>>(&mut conn))
                .await
        })
    }

    fn resume(
        &self,
        tenant: TenantId,
        scopes: Vec<Scope>,
        cursor: Cursor,
    ) -> BoxFuture<'_, Result<Found, BrokerError>> {
        let mut invocation = HISTORY.prepare_invoke();
        let (id, seq) = match &cursor {
            Cursor::Seq(n) => (n.to_string(), n.to_string()),
            Cursor::Caller(id) => (id.clone(), String::new()),
        };
        invocation.key(caller_id_key(tenant, &id));
        for scope in &scopes {
            invocation.key(scope.redis_key());
        }
        invocation.arg(seq).arg(self.history.size);
        let ttl_ms = self.history.ttl.as_millis() as i64;
        Box::pin(async move {
            let mut conn = self.publisher.clone();
            let raw = self
                .call(invocation.invoke_async::<redis::Value>(&mut conn))
                .await?;
            Ok(read_history(raw, ttl_ms).unwrap_or_else(|| {
                tracing::warn!("unexpected history answer from Redis; not recovered");
                Found::default()
            }))
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

/// Reads the history script's answer (see `lua/history.lua`); `None` when it
/// is not in the expected shape.
fn read_history(raw: redis::Value, ttl_ms: i64) -> Option<Found> {
    use redis::Value;
    let Value::Array(mut top) = raw else {
        return None;
    };
    let streams = top.pop()?;
    let seq = match top.pop()? {
        Value::Nil => return Some(Found::default()),
        v => text(&v)?.parse::<u64>().ok()?,
    };
    let Value::Array(streams) = streams else {
        return None;
    };
    let mut cursor_kept_ms = None;
    let mut merged = std::collections::BTreeMap::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return None;
        };
        let entries = parts.pop()?;
        let first = stream_seq(&text(&parts.pop()?)?)?;
        let trimmed: i64 = text(&parts.pop()?)?.parse().ok()?;
        // The size bound removed entries, and what is left starts after the
        // cursor: some of what the client missed may be gone.
        if trimmed > 0 && first > seq {
            return Some(Found::default());
        }
        let Value::Array(entries) = entries else {
            return None;
        };
        for entry in entries {
            let Value::Array(mut entry) = entry else {
                return None;
            };
            let Value::Array(fields) = entry.pop()? else {
                return None;
            };
            let n = stream_seq(&text(&entry.pop()?)?)?;
            let mut frame = None;
            let mut channels = Vec::new();
            let mut kept_ms = 0;
            for pair in fields.chunks(2) {
                let [name, value] = pair else { return None };
                match text(name)?.as_str() {
                    "f" => frame = Some(text(value)?),
                    "c" => {
                        channels = text(value)?
                            .split(',')
                            .filter_map(|c| c.parse::<Channel>().ok())
                            .collect()
                    }
                    "t" => kept_ms = text(value)?.parse().ok()?,
                    _ => {}
                }
            }
            if n == seq {
                cursor_kept_ms = Some(kept_ms);
            } else if n > seq {
                merged.entry(n).or_insert(Entry {
                    seq: n,
                    frame: frame?.into(),
                    channels,
                    kept_ms,
                });
            }
        }
    }
    let fresh = cursor_kept_ms.is_some_and(|kept| unix_ms() - kept <= ttl_ms);
    if !fresh {
        return Some(Found::default());
    }
    Some(Found {
        recovered: true,
        entries: merged.into_values().collect(),
    })
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The sequence number of a stream id "n-0".
fn stream_seq(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}
