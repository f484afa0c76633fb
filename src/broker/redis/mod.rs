//! The Redis broker: several gateway nodes share one Redis.
//!
//! Three connections, as Redis wants them:
//! - the subscription ([`subscriber`]): pattern subscriptions to the seed's
//!   channels (plain `PUBLISH`es from any backend, delivered live), and
//!   subscriptions to the scope channels of this node's connections, which
//!   follow them (events numbered and kept in history by the `wsgateway`
//!   function library). It PINGs on its own schedule, so a
//!   silently dead path is found within the command timeout, and after any
//!   gap it fills what history kept before reading live messages again.
//! - a command connection ([`link::RedisLink`]) for publishing, the
//!   subscriber's gap reads and health PINGs, replaced as soon as a call
//!   finds it dead;
//! - a second one for resumes' history reads: Redis answers one
//!   connection's commands in order, so on a shared connection a publish
//!   would wait behind every resume sent before it, each a reply of up to
//!   `WSGATEWAY_RESUME_MAX_EVENTS` entries (in a reconnect storm, up to
//!   `WSGATEWAY_RESUME_CONCURRENCY` of them); apart, it waits at most for
//!   the script Redis is running. It is not PINGed: a read that times out
//!   replaces it, like any call.
//!
//! All go where the [`connector::Connector`] says: the one server, or the
//! master the sentinels name, found again at every reconnect (all move to
//! a new master as soon as one finds it), or a cluster's primaries through
//! the cluster client, each call to its tenant's shard.
//!
//! The circuit breaker guards calls (publish, resume), never the
//! subscription: the subscriber reconnects on its own jittered schedule, so
//! live delivery follows Redis's return within seconds, and a health probe
//! outside the breaker half-opens it early once Redis answers.

mod acks;
pub mod connector;
pub mod link;
pub mod names;
pub mod signing;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use self::connector::Connector;
use self::link::{LinkError, RedisLink, UnsupportedRedis};
use self::names::{LibraryBounds, Names};
use self::signing::ChannelKey;
use super::acks::{AckOutcome, AckStep, Seen};
use super::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use super::history::{Entry, Merged, group_by_scope};
use super::{
    Broker, BrokerError, BrokerStatus, Cursor, EventQueue, Found, HistoryLimits, Listeners,
    Publication, Published, Scope,
};
use crate::auth::TenantId;
use crate::channel::Channel;
use crate::event::unix_ms;
use crate::metrics::Metrics;

/// The oldest Redis major version with functions and `max-deleted-entry-id`.
const MIN_MAJOR: u32 = 7;

/// Timing of the Redis connections.
#[derive(Debug, Clone, Copy)]
pub struct RedisTiming {
    /// One connect or one command.
    pub timeout: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often each connection is PINGed.
    pub health_check: Duration,
}

/// The bounds the function library applies (written into its source at
/// load, for backends that call `wsgateway_publish` directly too), the
/// deployment's names and the key that signs the library's messages.
#[derive(Debug, Clone)]
pub struct RedisBounds {
    pub history: HistoryLimits,
    /// `WSGATEWAY_MAX_PUBLISH_CHANNELS`.
    pub max_channels: usize,
    /// `WSGATEWAY_REDIS_PREFIX`'s names.
    pub names: Names,
    /// What signs the function's messages.
    pub signing: ChannelKey,
    /// `WSGATEWAY_STALE_EVENT_S`: the function refuses an older `ts`, as
    /// the publish API does.
    pub stale_event: Duration,
}

/// What health reports of the Redis connections.
#[derive(Debug, Default)]
struct Condition {
    /// True while the subscription is live and caught up.
    subscribed: bool,
    /// Why the subscription is not live.
    subscription: Option<String>,
    /// Why the command connection failed its last PING.
    commands: Option<String>,
    /// Set when the server cannot serve the gateway.
    incompatible: Option<UnsupportedRedis>,
}

pub struct RedisBroker {
    /// The command connection; its connector is the subscriber's too.
    link: RedisLink,
    /// The connection of resumes' history reads (see the module's doc).
    reads: RedisLink,
    queue: Arc<EventQueue>,
    listeners: Arc<dyn Listeners>,
    breaker: CircuitBreaker,
    condition: Mutex<Condition>,
    timing: RedisTiming,
    history: HistoryLimits,
    names: Names,
    signing: ChannelKey,
    metrics: Arc<Metrics>,
}

impl RedisBroker {
    /// Builds the broker without connecting: the gateway starts, and serves,
    /// whether Redis is up or not.
    pub fn new(
        connector: Connector,
        timing: RedisTiming,
        breaker: BreakerConfig,
        bounds: RedisBounds,
        queue: Arc<EventQueue>,
        listeners: Arc<dyn Listeners>,
        metrics: Arc<Metrics>,
    ) -> RedisBroker {
        let history = bounds.history;
        let names = bounds.names.clone();
        let signing = bounds.signing.clone();
        let reads_bounds = bounds.clone();
        let prepare: link::Prepare = Box::new(move |conn| Box::pin(prepare(conn, bounds.clone())));
        let prepare_reads: link::Prepare =
            Box::new(move |conn| Box::pin(self::prepare(conn, reads_bounds.clone())));
        RedisBroker {
            reads: RedisLink::new(connector.clone(), timing.timeout, Some(prepare_reads)),
            link: RedisLink::new(connector, timing.timeout, Some(prepare)),
            queue,
            listeners,
            breaker: CircuitBreaker::new("redis", breaker, metrics.clone()),
            condition: Mutex::new(Condition {
                subscription: Some("not subscribed yet".into()),
                ..Condition::default()
            }),
            timing,
            history,
            names,
            signing,
            metrics,
        }
    }

    /// Checks the server once, at start: an incompatible one (older than
    /// 7.0) is an error; an unreachable one is not (the gateway starts and
    /// keeps trying).
    pub async fn preflight(&self) -> Result<(), UnsupportedRedis> {
        match self.link.check().await {
            Err(LinkError::Incompatible(why)) => Err(why),
            Err(e) => {
                tracing::error!(reason = %e, "Redis cannot be used yet; starting anyway, and retrying");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    /// Runs one call through the breaker, sorting out what its failure
    /// means for the caller: 503 when nothing was sent, 504 when it may
    /// have run.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, BrokerError>
    where
        F: Fn(link::Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_on(&self.link, op).await
    }

    /// [`RedisBroker::call`] on the given connection.
    async fn call_on<T, F, Fut>(&self, link: &RedisLink, op: F) -> Result<T, BrokerError>
    where
        F: Fn(link::Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(permit) = self.breaker.allow() else {
            return Err(BrokerError::Unavailable("circuit breaker open".into()));
        };
        let mut result = link.call(&op).await;
        let retry = match &result {
            // Redis lost its functions (a restart without persistence):
            // nothing ran. Load the library on a fresh connection, once.
            // (Read from the server's own error reply, `ERR Function not
            // found`: no code of its own tells it apart.)
            Err(LinkError::Refused(why)) if why.contains("Function not found") => true,
            // A demoted master (a failover): nothing ran; the link has
            // dropped the connection, and the next finds the new master.
            Err(LinkError::NotMaster(_)) => true,
            _ => false,
        };
        if retry {
            link.reset();
            result = link.call(&op).await;
        }
        match result {
            Ok(value) => {
                permit.success();
                Ok(value)
            }
            Err(e) => {
                self.note_incompatible(&e);
                match &e {
                    // Redis answered: it is there, and refused this call
                    // (in a cluster, a script touching a slot being
                    // migrated, until its keys have moved). The breaker
                    // guards against a Redis that does not answer, and
                    // would shut out every tenant for one tenant's slot.
                    LinkError::Refused(_) => permit.success(),
                    _ => permit.failure(),
                }
                Err(match e {
                    LinkError::Unknown(why) => BrokerError::OutcomeUnknown(why.to_string()),
                    LinkError::TimedOut => BrokerError::OutcomeUnknown("timed out".into()),
                    other => BrokerError::Unavailable(other.to_string()),
                })
            }
        }
    }

    fn note_incompatible(&self, e: &LinkError) {
        if let LinkError::Incompatible(why) = e {
            let mut condition = self.condition.lock();
            if condition.incompatible.is_none() {
                tracing::error!("{why}");
            }
            condition.incompatible = Some(why.clone());
        }
    }

    /// PINGs the command connection periodically, so that a dead one is
    /// replaced and an outage is seen (and the breaker moves) even when
    /// nothing is published. While the breaker is open, the PING is a probe
    /// outside it: an answer half-opens the breaker at once.
    async fn check_health_forever(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.timing.health_check);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let permit = self.breaker.allow();
            let result = self.link.check().await;
            let failed = result.as_ref().err().map(|e| {
                self.note_incompatible(e);
                (format!("command connection: {e}"), e.is_tls())
            });
            match (permit, &result) {
                (Some(permit), Ok(_)) => permit.success(),
                (Some(permit), Err(_)) => permit.failure(),
                (None, Ok(_)) => self.breaker.probe_succeeded(),
                (None, Err(_)) => {}
            }
            let mut condition = self.condition.lock();
            match (&failed, &condition.commands) {
                (Some((reason, tls)), None) => {
                    self.metrics
                        .redis_reconnects
                        .with_label_values(&["commands"])
                        .inc();
                    if *tls {
                        tracing::error!(reason, "Redis command connection failing");
                    } else {
                        tracing::warn!(reason, "Redis command connection failing");
                    }
                }
                (None, Some(_)) => tracing::info!("Redis command connection back"),
                _ => {}
            }
            condition.commands = failed.map(|(reason, _)| reason);
            if result.is_ok() {
                condition.incompatible = None;
            }
        }
    }

    fn set_subscribed(&self, subscribed: bool, reason: Option<String>) {
        let mut condition = self.condition.lock();
        condition.subscribed = subscribed;
        condition.subscription = reason;
    }
}

/// Prepares a new command connection: checks the server's version and
/// loads the function library with this node's names, key and bounds
/// (again: a restarted Redis may have lost it).
async fn prepare(mut conn: link::Conn, bounds: RedisBounds) -> Result<(), LinkError> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let refused =
        |e: redis::RedisError| LinkError::NotSent(link::Unsent::Prepare(link::describe_plain(&e)));
    let mut ask = redis::cmd("INFO");
    ask.arg("server");
    let info: String = match &mut conn {
        // Any one node: the library is loaded on every primary below.
        link::Conn::Cluster(c) => c
            .route_command(ask, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
            .map_err(refused)?,
        link::Conn::One(_) => ask.query_async(&mut conn).await.map_err(refused)?,
    };
    check_version(&info)?;
    let library_bounds = LibraryBounds {
        size: bounds.history.size,
        ttl_ms: bounds.history.ttl.as_millis() as u64,
        max_channels: bounds.max_channels,
        stale_ms: bounds.stale_event.as_millis() as u64,
    };
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(bounds.names.library(&bounds.signing, &library_bounds))
        .query_async::<String>(&mut conn)
        .await
        .map_err(refused)?;
    Ok(())
}

/// Refuses a server older than Redis 7.0 (Valkey reports a Redis-compatible
/// `redis_version`, 7.2.4 for Valkey 7.2 and later).
fn check_version(info: &str) -> Result<(), UnsupportedRedis> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= MIN_MAJOR => Ok(()),
        _ => Err(UnsupportedRedis {
            version: version.to_owned(),
        }),
    }
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        batch: Vec<Publication>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>> {
        if !self.link.connector().is_cluster() {
            // One function call: the batch is numbered, kept and published
            // atomically, so every node sees the same ids.
            return Box::pin(async move {
                let all: Vec<&Publication> = batch.iter().collect();
                self.publish_part(&all, None).await
            });
        }
        // A cluster: one call per tenant, on the tenant's shard (each
        // atomic), all at once; a failure of one may leave others
        // published, which a retry with the same `event_id`s does not
        // publish twice.
        Box::pin(async move {
            // The registry of tenants with ack deadlines is outside the
            // tenants' slots: written here, before the deadlines exist.
            let until: Vec<(TenantId, i64)> = batch
                .iter()
                .filter_map(|p| {
                    let within_ms = i64::from(p.fields.ack_within_s?) * 1000;
                    Some((p.fields.tenant_id, unix_ms() + 2 * within_ms + 60_000))
                })
                .collect();
            if !until.is_empty() {
                self.register_ack_tenants(until).await?;
            }
            // Each tenant's items, in the batch's order, and where they were.
            let mut parts: std::collections::BTreeMap<TenantId, (Vec<usize>, Vec<&Publication>)> =
                std::collections::BTreeMap::new();
            for (i, p) in batch.iter().enumerate() {
                let part = parts.entry(p.fields.tenant_id).or_default();
                part.0.push(i);
                part.1.push(p);
            }
            let answers = futures_util::future::join_all(
                parts
                    .iter()
                    .map(|(t, (_, part))| self.publish_part(part, Some(*t))),
            )
            .await;
            let mut published = vec![None; batch.len()];
            for ((at, _), answer) in parts.values().zip(answers) {
                for (i, p) in at.iter().zip(answer?) {
                    published[*i] = Some(p);
                }
            }
            published
                .into_iter()
                .map(|p| p.ok_or_else(|| BrokerError::OutcomeUnknown("short answer".into())))
                .collect()
        })
    }

    fn resume(
        &self,
        tenant: TenantId,
        scopes: Vec<Scope>,
        cursor: Cursor,
    ) -> BoxFuture<'_, Result<Found, BrokerError>> {
        self.resume_from(tenant, scopes, cursor)
    }

    fn status(&self) -> BrokerStatus {
        self.status_now()
    }

    fn ack(
        &self,
        tenant: TenantId,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<AckOutcome>, BrokerError>> {
        Box::pin(self.ack_ids(tenant, ids))
    }

    fn seen(&self, seen: Vec<Seen>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.note_seen(seen))
    }

    fn sweeps_per_tenant(&self) -> bool {
        self.link.connector().is_cluster()
    }

    fn sweep_acks(
        &self,
        tenants: Vec<TenantId>,
    ) -> BoxFuture<'_, Result<Vec<AckStep>, BrokerError>> {
        Box::pin(self.sweep(tenants))
    }

    fn run(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            tokio::join!(
                subscriber::run(self.clone(), shutdown.clone()),
                self.check_health_forever(shutdown),
            );
        })
    }
}

impl RedisBroker {
    /// Publishes `batch` in one function call; in a cluster, all of one
    /// `tenant`'s, whose counter key routes the call to its shard.
    async fn publish_part(
        &self,
        batch: &[&Publication],
        tenant: Option<TenantId>,
    ) -> Result<Vec<Published>, BrokerError> {
        let mut items = Vec::with_capacity(batch.len());
        let mut payloads = Vec::with_capacity(batch.len());
        for p in batch {
            // Each scope's history entry and envelope carry only the
            // channels of that scope: a publication's channels are written
            // once in all, not once per scope.
            let (scopes, channels): (Vec<String>, Vec<Vec<String>>) =
                group_by_scope(&p.channels, &p.fields)
                    .into_iter()
                    .map(|(scope, channels)| {
                        (
                            scope.suffix(),
                            channels.iter().map(Channel::to_string).collect(),
                        )
                    })
                    .unzip();
            let mut item = serde_json::json!({
                "t": p.fields.tenant_id.to_string(),
                "e": p.fields.event_id.as_deref().unwrap_or(""),
                "s": scopes,
                "c": channels,
            });
            if let Some(within_s) = p.fields.ack_within_s {
                item["a"] = serde_json::json!({
                    "ms": u64::from(within_s) * 1000,
                    "branch": p.fields.branch_id.to_string(),
                    "type": p.fields.event_type,
                });
            }
            items.push(item);
            payloads.push(p.payload());
        }
        let spec = serde_json::json!({
            "size": self.history.size,
            "ttl_ms": self.history.ttl.as_millis() as u64,
            "items": items,
        })
        .to_string();
        let mut fcall = redis::cmd("FCALL");
        fcall.arg(self.names.function("wsgateway_publish_batch"));
        match tenant {
            Some(t) => fcall
                .arg(1)
                .arg(self.names.key(&format!("wsgateway:{{{t}}}:seq"))),
            None => fcall.arg(0),
        };
        fcall.arg(spec);
        for payload in &payloads {
            fcall.arg(payload);
        }
        let (ids, duplicates) = self
            .call(|mut c| {
                let fcall = fcall.clone();
                async move { fcall.query_async::<(Vec<String>, Vec<u8>)>(&mut c).await }
            })
            .await?;
        Ok(ids
            .into_iter()
            .zip(duplicates.into_iter().chain(std::iter::repeat(0)))
            .map(|(id, duplicate)| Published {
                id,
                duplicate: duplicate == 1,
            })
            .collect())
    }

    fn resume_from(
        &self,
        tenant: TenantId,
        scopes: Vec<Scope>,
        cursor: Cursor,
    ) -> BoxFuture<'_, Result<Found, BrokerError>> {
        let (id, seq) = match &cursor {
            Cursor::Seq(n) => (n.to_string(), n.to_string()),
            Cursor::Caller(id) => (id.clone(), String::new()),
        };
        // All keys of one tenant: one hash slot.
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg(self.names.function("wsgateway_resume"))
            .arg(scopes.len() + 1)
            .arg(self.names.caller_id(tenant, &id));
        for scope in &scopes {
            fcall.arg(self.names.stream(*scope));
        }
        fcall
            .arg(tenant)
            .arg(&seq)
            .arg(self.history.max_replay)
            .arg(self.history.ttl.as_millis() as u64);
        Box::pin(async move {
            let raw = self
                .call_on(&self.reads, |mut c| {
                    let fcall = fcall.clone();
                    async move { fcall.query_async::<redis::Value>(&mut c).await }
                })
                .await?;
            Ok(read_history(raw).unwrap_or_else(|| {
                tracing::warn!("unexpected history answer from Redis; not recovered");
                Found::default()
            }))
        })
    }

    fn status_now(&self) -> BrokerStatus {
        let (state, failures) = self.breaker.snapshot();
        let condition = self.condition.lock();
        let reason = condition
            .incompatible
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| condition.subscription.clone())
            .or_else(|| condition.commands.clone())
            .or_else(|| (state == BreakerState::Open).then(|| "circuit breaker open".to_owned()));
        BrokerStatus {
            kind: "redis",
            connected: condition.subscribed && condition.incompatible.is_none(),
            publishing: state != BreakerState::Open
                && condition.commands.is_none()
                && condition.incompatible.is_none(),
            reason,
            breaker: Some((state, failures)),
            master: self.link.connector().master(),
        }
    }
}

/// Reads `wsgateway_resume`'s answer (see `lua/wsgateway.lua`); `None`
/// when it is not in the expected shape. Anything but `ok` is "not
/// recovered": the function vouches for every event after the cursor, or
/// for none.
fn read_history(raw: redis::Value) -> Option<Found> {
    use redis::Value;
    let Value::Array(mut top) = raw else {
        return None;
    };
    let status = text(top.first()?)?;
    if status != "ok" {
        tracing::debug!(reason = %status, "resume not recovered");
        return Some(Found::default());
    }
    let Value::Array(streams) = top.pop()? else {
        return None;
    };
    let mut merged = Merged::default();
    for entries in streams {
        for entry in read_entries(entries)? {
            merged.add(entry);
        }
    }
    Some(Found {
        recovered: true,
        entries: merged.into_entries(),
    })
}

/// Reads raw XRANGE entries (`n-0`, one field `e`: `<kept at, Unix
/// ms>\n<channels>\n<frame>`); `None` when one is not in that shape.
/// Consumes the reply: a resume's hundreds of frames are moved, not copied.
fn read_entries(raw: redis::Value) -> Option<Vec<Entry>> {
    use redis::Value;
    let Value::Array(entries) = raw else {
        return None;
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut entry) = entry else {
            return None;
        };
        let Value::Array(mut fields) = entry.pop()? else {
            return None;
        };
        let n = stream_seq(&text(&entry.pop()?)?)?;
        let Value::BulkString(packed) = fields.pop()? else {
            return None;
        };
        let packed = String::from_utf8(packed).ok()?;
        let (kept_ms, rest) = packed.split_once('\n')?;
        let (channels, frame) = rest.split_once('\n')?;
        let kept_ms = kept_ms.parse().ok()?;
        let channels: Vec<Channel> = channels
            .split(',')
            .filter_map(|c| c.parse::<Channel>().ok())
            .collect();
        let frame_at = packed.len() - frame.len();
        let mut frame = packed;
        frame.drain(..frame_at);
        out.push(Entry {
            seq: n,
            frame: frame.into(),
            channels: channels.into(),
            kept_ms,
        });
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_servers_older_than_7() {
        assert!(
            check_version("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n").is_ok()
        );
        assert!(
            check_version("redis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.0.1\r\n")
                .is_ok()
        );
        let old = check_version("redis_version:6.2.14\r\n").unwrap_err();
        assert_eq!(old.version, "6.2.14");
        let old = old.to_string();
        assert!(old.contains("Redis 6.2.14 is not supported"), "{old}");
        assert!(check_version("nothing").is_err());
    }

    /// The library refuses the types the gateway reserves: its list is
    /// `crate::event::RESERVED_TYPES`, written out again in Lua.
    #[test]
    fn the_librarys_reserved_types_are_the_gateways() {
        let start = "local RESERVED_TYPES = {";
        let at = names::LIBRARY
            .find(start)
            .expect("the library lists RESERVED_TYPES")
            + start.len();
        let list = &names::LIBRARY[at..at + names::LIBRARY[at..].find('}').unwrap()];
        let lua: Vec<&str> = list
            .split(',')
            .map(|t| t.trim().trim_matches('\''))
            .filter(|t| !t.is_empty())
            .collect();
        assert_eq!(lua, crate::event::RESERVED_TYPES);
        assert_eq!(names::LIBRARY.matches(start).count(), 1);
    }
}
