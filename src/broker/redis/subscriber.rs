//! The subscription: live events from Redis, with no gap left unfilled.
//!
//! One pub/sub connection with pattern subscriptions to the seed's channels
//! (plain `PUBLISH`es, delivered live, without numbers), and subscriptions
//! to the gateway's scope channels (`wsgateway:events:{tenant}:{scope}`,
//! where the function library publishes every event it numbers, as
//! `n\n<channels>\n<frame>`) that follow this node's audience: a scope's
//! channel is subscribed to while the hub holds a connection of that scope.
//! The hub signals each change ([`crate::broker::ScopeChanges`]); the
//! subscriber waits [`BATCH`] for more, then subscribes and unsubscribes
//! them together, and reads the history of each new scope from just before
//! its first connection came, so that what was published while the
//! subscription was being made is not missed.
//!
//! The subscriber knows the number of every numbered event it delivered.
//! The connection is PINGed every health-check interval with the command
//! timeout as deadline, so a silently dead path is found within seconds;
//! then the subscriber reconnects on its own jittered schedule (never
//! waiting for the circuit breaker), to wherever the connector says (in
//! sentinel mode: the master the sentinels name now). It also moves when
//! the connector has found another master meanwhile. After every gap it reads, for the
//! scopes of this node's connections, what history kept after the last
//! number it had, and queues that (in order, once) before reading any live
//! message again: live messages wait in the connection meanwhile, and those
//! the fill already delivered are skipped by number. What history cannot
//! give back (trimmed, expired, or plain `PUBLISH`es never seen) is counted,
//! and the affected connections get a `resync` frame.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use super::connector::{EndpointError, Failure, RoleError};
use super::link::LinkError;
use super::{RedisBroker, read_entries, text};
use crate::auth::TenantId;
use crate::broker::Scope;
use crate::broker::backoff::Backoff;
use crate::broker::history::Merged;
use crate::channel::Channel;
use crate::event::{Fields, unix_ms};
use crate::metrics::Drop;
use crate::reply::ResyncReason;

/// Scopes read per gap-fill call.
const SCOPES_PER_READ: usize = 256;

/// How long the subscriber waits, after a change of its audience, for more:
/// a storm of connections costs a few commands, not one each.
const BATCH: Duration = Duration::from_millis(20);

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1000;

/// A new scope's history is read from a little before its first
/// connection came, by Redis's clock as last measured: by the measure's
/// error (half its round trip), this slack, and what the clocks may have
/// drifted apart since (500 ppm, up to [`MAX_DRIFT_US`]). A connection of a
/// new scope may so receive an event published that little before it
/// connected (more only while its tenant's numbers run ahead of the clock:
/// a second after Redis reloaded its data).
const NEW_SCOPE_SLACK_US: i64 = 2_000;
const MAX_DRIFT_US: i64 = 50_000;

/// How far ahead of Redis's clock a number may be and still be the
/// function's: numbers follow the clock (in microseconds), and run ahead of
/// it only by a burst of more than one event per microsecond, or by the
/// jump after a reload (one second). A number beyond this is not trusted.
const TRUST_AHEAD_US: u64 = 600_000_000;

/// A tenant's last number is taken as where its gap starts only when it is
/// at most this far ahead of the clock when the subscription was last seen
/// alive; else (a number that could not be trusted to mark the end of what
/// arrived) the gap starts this far before that moment instead.
const LEAD_US: u64 = 5_000_000;

/// The last number delivered of a tenant, and the channels it was delivered
/// on so far: the function publishes an event once per scope, each message
/// with that scope's channels only.
#[derive(Debug, Default, Clone)]
struct Last {
    n: u64,
    on: Vec<Channel>,
}

/// How far this node's delivery of numbered events has got. Nothing a
/// message says can make the node skip a later one: the only numbers that
/// skip live messages are the counters a gap fill read from Redis itself.
#[derive(Debug)]
struct Position {
    /// Per tenant, the last event delivered (live or filled). Bounded: past
    /// `MAX_TENANTS` it starts again (a gap then starts from the clock).
    delivered: HashMap<TenantId, Last>,
    /// The scopes the last fills read, each with its tenant's counter
    /// then: a live message of the scope numbered up to it was filled
    /// already.
    filled: HashMap<Scope, u64>,
    /// Redis's clock minus this node's, in microseconds, as the last fill
    /// measured it.
    offset_us: i64,
    /// How far that measure may be off (half the call's round trip), and
    /// when it was made.
    offset_error_us: i64,
    measured: Instant,
    /// When the subscription last showed it was alive (a message or a PONG).
    alive: Instant,
    /// When the last plain (unnumbered) `PUBLISH` arrived.
    plain_seen: Option<Instant>,
    /// The `run_id` of the Redis process the last fill read from.
    run_id: Option<String>,
}

const MAX_TENANTS: usize = 100_000;

impl Default for Position {
    fn default() -> Position {
        Position {
            delivered: HashMap::new(),
            filled: HashMap::new(),
            offset_us: 0,
            offset_error_us: MAX_DRIFT_US,
            measured: Instant::now(),
            alive: Instant::now(),
            plain_seen: None,
            run_id: None,
        }
    }
}

/// What to do with a numbered message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Deliver it on these channels.
    Deliver(Vec<Channel>),
    /// The last fill delivered it already.
    Filled,
    /// Its number is beyond what Redis can have given.
    Untrusted,
}

impl Position {
    /// Redis's clock now, as this node estimates it, in microseconds.
    fn redis_now_us(&self) -> u64 {
        (unix_us() + self.offset_us).max(0) as u64
    }

    /// How long before a new scope's first connection its history is read
    /// from (see [`NEW_SCOPE_SLACK_US`]).
    fn new_scope_margin_us(&self) -> i64 {
        let drift = (self.measured.elapsed().as_micros() as i64 / 2_000).min(MAX_DRIFT_US);
        self.offset_error_us + NEW_SCOPE_SLACK_US + drift
    }

    /// Redis's clock when the subscription was last seen alive.
    fn redis_alive_us(&self) -> u64 {
        let ago = self.alive.elapsed().as_micros() as u64;
        self.redis_now_us().saturating_sub(ago)
    }

    /// Judges message `n` of `scope` on `channels`; changes nothing.
    fn judge(&mut self, scope: Scope, n: u64, channels: &[Channel]) -> Verdict {
        if n > self.redis_now_us().saturating_add(TRUST_AHEAD_US) {
            return Verdict::Untrusted;
        }
        if let Some(&counter) = self.filled.get(&scope) {
            if n <= counter {
                return Verdict::Filled;
            }
            // A tenant's numbers grow in the order Redis runs its calls:
            // every later message of the scope is past the fill.
            self.filled.remove(&scope);
        }
        Verdict::Deliver(self.undelivered(scope.tenant(), n, channels))
    }

    /// The channels of event `n` of `tenant` it was not delivered on yet
    /// (all, unless `n` is the last delivered).
    fn undelivered(&self, tenant: TenantId, n: u64, channels: &[Channel]) -> Vec<Channel> {
        match self.delivered.get(&tenant) {
            Some(last) if last.n == n => channels
                .iter()
                .copied()
                .filter(|c| !last.on.contains(c))
                .collect(),
            _ => channels.to_vec(),
        }
    }

    /// Records event `n` of `tenant` delivered on `channels`.
    fn delivered(&mut self, tenant: TenantId, n: u64, channels: &[Channel]) {
        if self.delivered.len() >= MAX_TENANTS && !self.delivered.contains_key(&tenant) {
            self.delivered.clear();
        }
        let last = self.delivered.entry(tenant).or_default();
        if n > last.n {
            *last = Last { n, on: Vec::new() };
        }
        if n == last.n {
            for c in channels {
                if !last.on.contains(c) {
                    last.on.push(*c);
                }
            }
        }
    }

    /// Where `tenant`'s gap starts: events numbered after it may be missing.
    fn gap_start(&self, tenant: TenantId) -> u64 {
        let alive = self.redis_alive_us();
        match self.delivered.get(&tenant) {
            // The last event is read again: only some of its scopes'
            // messages may have arrived (the rest are filled, the channels
            // already delivered skipped).
            Some(last) if last.n <= alive.saturating_add(LEAD_US) => last.n.saturating_sub(1),
            // Nothing of this tenant arrived since the last fill, or its last
            // number is not one to start from.
            _ => alive.saturating_sub(LEAD_US),
        }
    }
}

fn unix_us() -> i64 {
    unix_ms().saturating_mul(1000)
}

/// A stretch of time without a subscription.
#[derive(Debug, Clone, Copy)]
struct Gap {
    since: Instant,
}

/// Why no subscription could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SubscribeError {
    #[error("cannot subscribe: {0}")]
    NoEndpoint(#[from] EndpointError),
    #[error("cannot subscribe: {0}")]
    Failed(#[from] Failure),
    /// Sentinel mode: the server the sentinels named is not the master.
    #[error("cannot subscribe: {0}")]
    NotMaster(String),
    #[error("cannot subscribe: timed out")]
    TimedOut,
}

impl SubscribeError {
    /// A TLS failure is a setting to fix: logged as an error.
    fn is_tls(&self) -> bool {
        match self {
            SubscribeError::NoEndpoint(e) => e.is_tls(),
            SubscribeError::Failed(f) => f.is_tls(),
            SubscribeError::NotMaster(_) | SubscribeError::TimedOut => false,
        }
    }
}

/// Why a live subscription was given up.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("the master moved from {from} to {to}")]
    MasterMoved { from: String, to: String },
    #[error("PING failed: {0}")]
    Ping(Failure),
    #[error("no answer to PING within {0:?}")]
    NoPong(Duration),
    #[error("{command} failed: {failure}")]
    Command {
        command: &'static str,
        failure: Failure,
    },
    #[error("no answer to {0} within {1:?}")]
    NoAnswer(&'static str, Duration),
    #[error("cannot read the history of new scopes: {0}")]
    History(String),
    #[error("a cluster node's connection was lost")]
    NodeDropped,
    #[error("connection closed")]
    Closed,
}

/// Why a gap could not be read.
#[derive(Debug, thiserror::Error)]
enum GapError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("unexpected gap answer")]
    Unexpected,
}

/// A live subscription: the connection, its server, and the scopes whose
/// channels it is subscribed to.
struct Live {
    sub: Sub,
    /// The server (or, in a cluster, the seed nodes), for logs.
    addr: String,
    subscribed: HashSet<Scope>,
}

/// The subscription's connection.
enum Sub {
    /// One server: a pub/sub connection (RESP2).
    One {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    /// A cluster: the redis crate's cluster connection in RESP3, one
    /// connection per node, messages and notices arriving as pushes.
    Cluster {
        conn: ClusterConnection,
        pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    },
}

/// What the subscription's connection brought.
enum Incoming {
    Msg(redis::Msg),
    Push(redis::PushInfo),
    Closed,
}

impl Live {
    /// Subscribes to the channels of `scopes` (not subscribed yet), a
    /// command per [`CHANNELS_PER_COMMAND`] (in a cluster, per tenant:
    /// `SSUBSCRIBE` takes the channels of one slot), each confirmed.
    async fn subscribe(&mut self, broker: &RedisBroker, scopes: &[Scope]) -> Result<(), Lost> {
        for chunk in per_command(&self.sub, scopes) {
            let channels: Vec<String> = chunk
                .iter()
                .map(|s| broker.names.scope_channel(*s))
                .collect();
            self.command(broker, "SUBSCRIBE", channels).await?;
            self.subscribed.extend(chunk);
        }
        Ok(())
    }

    /// Unsubscribes from the channels of `scopes`.
    async fn unsubscribe(&mut self, broker: &RedisBroker, scopes: &[Scope]) -> Result<(), Lost> {
        for chunk in per_command(&self.sub, scopes) {
            for scope in &chunk {
                self.subscribed.remove(scope);
            }
            let channels: Vec<String> = chunk
                .iter()
                .map(|s| broker.names.scope_channel(*s))
                .collect();
            self.command(broker, "UNSUBSCRIBE", channels).await?;
        }
        Ok(())
    }

    async fn command(
        &mut self,
        broker: &RedisBroker,
        command: &'static str,
        channels: Vec<String>,
    ) -> Result<(), Lost> {
        let timeout = broker.timing.timeout;
        let subscribe = command == "SUBSCRIBE";
        let sent = match &mut self.sub {
            Sub::One { sink, .. } if subscribe => {
                tokio::time::timeout(timeout, sink.subscribe(channels)).await
            }
            Sub::One { sink, .. } => {
                tokio::time::timeout(timeout, sink.unsubscribe(channels)).await
            }
            Sub::Cluster { conn, .. } if subscribe => {
                tokio::time::timeout(timeout, conn.ssubscribe(channels)).await
            }
            Sub::Cluster { conn, .. } => {
                tokio::time::timeout(timeout, conn.sunsubscribe(channels)).await
            }
        };
        match sent {
            Ok(Ok(())) => {
                broker
                    .metrics
                    .redis_subscription_commands
                    .with_label_values(&[if subscribe {
                        "subscribe"
                    } else {
                        "unsubscribe"
                    }])
                    .inc();
                Ok(())
            }
            Ok(Err(e)) => Err(Lost::Command {
                command,
                failure: broker.link.connector().describe(&e),
            }),
            Err(_) => Err(Lost::NoAnswer(command, timeout)),
        }
    }

    /// PINGs the connection (in a cluster, every primary's).
    async fn ping(&mut self) -> redis::RedisResult<()> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
        match &mut self.sub {
            Sub::One { sink, .. } => sink.ping::<redis::Value>().await.map(drop),
            Sub::Cluster { conn, .. } => conn
                .route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await
                .map(drop),
        }
    }

    async fn next(&mut self) -> Incoming {
        match &mut self.sub {
            Sub::One { stream, .. } => stream.next().await.map_or(Incoming::Closed, Incoming::Msg),
            Sub::Cluster { pushes, .. } => {
                pushes.recv().await.map_or(Incoming::Closed, Incoming::Push)
            }
        }
    }

    /// The subscribed scopes, sorted.
    fn scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = self.subscribed.iter().copied().collect();
        scopes.sort_unstable();
        scopes
    }
}

/// `scopes` cut into one command's each: at most [`CHANNELS_PER_COMMAND`];
/// in a cluster, of one tenant (one hash slot).
fn per_command(sub: &Sub, scopes: &[Scope]) -> Vec<Vec<Scope>> {
    match sub {
        Sub::One { .. } => scopes
            .chunks(CHANNELS_PER_COMMAND)
            .map(<[Scope]>::to_vec)
            .collect(),
        Sub::Cluster { .. } => {
            let mut by_tenant: std::collections::BTreeMap<TenantId, Vec<Scope>> =
                std::collections::BTreeMap::new();
            for scope in scopes {
                by_tenant.entry(scope.tenant()).or_default().push(*scope);
            }
            by_tenant
                .into_values()
                .flat_map(|v| {
                    v.chunks(CHANNELS_PER_COMMAND)
                        .map(<[Scope]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    }
}

/// Subscribes, fills gaps, and delivers, until `shutdown`.
pub(super) async fn run(broker: Arc<RedisBroker>, shutdown: CancellationToken) {
    let timing = broker.timing;
    let mut backoff = Backoff::new(timing.retry_base, timing.retry_max);
    let mut position = Position::default();
    let mut gap: Option<Gap> = None;
    // The last failure logged: a failure is logged when it changes, not at
    // every retry.
    let mut failing: Option<SubscribeError> = None;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            opened = tokio::time::timeout(timing.timeout * 2, open(&broker)) => opened,
        };
        let failure = match opened {
            Ok(Ok((mut live, since))) => {
                backoff.reset();
                failing = None;
                broker.set_subscribed(false, Some("catching up after a gap".into()));
                let scopes = live.scopes();
                broker
                    .metrics
                    .redis_subscribed_scopes
                    .set(scopes.len() as i64);
                let filled = match gap.take() {
                    Some(gap) => {
                        fill(&broker, &mut position, &scopes, gap).await;
                        Ok(())
                    }
                    None => fill_new(&broker, &mut position, &scopes, since).await,
                };
                let why = match filled {
                    Ok(()) => {
                        broker.set_subscribed(true, None);
                        tracing::info!(server = %live.addr, scopes = scopes.len(), "subscribed to Redis");
                        match listen(&broker, &mut live, &mut position, &shutdown).await {
                            Some(why) => why,
                            None => return,
                        }
                    }
                    Err(why) => why,
                };
                broker.metrics.redis_subscribed_scopes.set(0);
                broker
                    .metrics
                    .redis_reconnects
                    .with_label_values(&["subscription"])
                    .inc();
                tracing::warn!(reason = %why, "lost the Redis subscription; reconnecting");
                broker.set_subscribed(false, Some(format!("subscription lost: {why}")));
                // The command connections most likely share the fate of the
                // path: make the next calls connect afresh.
                broker.link.reset();
                broker.reads.reset();
                gap = Some(Gap {
                    since: Instant::now(),
                });
                None
            }
            Ok(Err(why)) => Some(why),
            Err(_) => Some(SubscribeError::TimedOut),
        };
        if let Some(why) = failure {
            if failing.as_ref() != Some(&why) {
                if why.is_tls() {
                    tracing::error!(reason = %why, "Redis subscription failed; retrying");
                } else {
                    tracing::warn!(reason = %why, "Redis subscription failed; retrying");
                }
            }
            broker.set_subscribed(false, Some(why.to_string()));
            failing = Some(why);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Subscribes on the server to use now (in sentinel mode, confirmed as the
/// master first): to the seed's patterns, and to the channels of the scopes
/// of this node's connections. Returns the subscription, and since when
/// (this node's clock, µs) its scopes may have waited for it.
async fn open(broker: &RedisBroker) -> Result<(Live, Option<i64>), SubscribeError> {
    let connector = broker.link.connector();
    let mut live = match connector.cluster_client(None) {
        Some(_) => open_cluster(broker).await?,
        None => open_one(broker).await?,
    };
    // Taken before the scopes are read: a scope that comes after is a
    // change still to take.
    let changes = broker.listeners.changes();
    let since = changes.take_since_us();
    if let Err(why) = live.subscribe(broker, &broker.listeners.scopes()).await {
        changes.give_back(since);
        return Err(SubscribeError::Failed(Failure::Other(why.to_string())));
    }
    Ok((live, since))
}

/// A cluster's subscription: the seed's patterns (a plain `PUBLISH` reaches
/// every node of a cluster, so one node's subscription hears them all).
async fn open_cluster(broker: &RedisBroker) -> Result<Live, SubscribeError> {
    let connector = broker.link.connector();
    let describe = |e: redis::RedisError| SubscribeError::Failed(connector.describe(&e));
    let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
    let client = connector
        .cluster_client(Some(tx))
        .expect("cluster mode")
        .map_err(SubscribeError::Failed)?;
    let mut conn = client.get_async_connection().await.map_err(describe)?;
    for pattern in broker.names.patterns() {
        conn.psubscribe(pattern).await.map_err(describe)?;
    }
    Ok(Live {
        sub: Sub::Cluster { conn, pushes },
        addr: connector.seeds().unwrap_or_default().to_owned(),
        subscribed: HashSet::new(),
    })
}

/// One server's subscription (in sentinel mode, on the server confirmed as
/// the master): the seed's patterns.
async fn open_one(broker: &RedisBroker) -> Result<Live, SubscribeError> {
    let connector = broker.link.connector();
    let endpoint = connector.endpoint().await?;
    let describe = |e: redis::RedisError| SubscribeError::Failed(connector.describe(&e));
    if connector.is_sentinel() {
        let mut conn = endpoint
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(describe)?;
        connector
            .check_master(&mut conn, &endpoint.addr)
            .await
            .map_err(|e| match e {
                RoleError::NotMaster(why) => SubscribeError::NotMaster(why),
                RoleError::Failed(e) => describe(e),
            })?;
    }
    let mut pubsub = endpoint.client.get_async_pubsub().await.map_err(describe)?;
    for pattern in broker.names.patterns() {
        pubsub.psubscribe(pattern).await.map_err(describe)?;
    }
    let (sink, stream) = pubsub.split();
    Ok(Live {
        sub: Sub::One { sink, stream },
        addr: endpoint.addr,
        subscribed: HashSet::new(),
    })
}

/// Delivers messages, and follows the audience, until the connection is
/// lost (returns why) or `shutdown` (returns `None`).
async fn listen(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    shutdown: &CancellationToken,
) -> Option<Lost> {
    let connector = broker.link.connector();
    let timing = broker.timing;
    let changes = broker.listeners.changes();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + timing.health_check,
        timing.health_check,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the changes seen so far are applied.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = changes.wait(), if due.is_none() => {
                due = Some(tokio::time::Instant::now() + BATCH);
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                due = None;
                if let Err(why) = follow(broker, live, position).await {
                    return Some(why);
                }
            }
            _ = ping.tick() => {
                if !connector.is_current(&live.addr) {
                    let to = connector.master().unwrap_or_default();
                    return Some(Lost::MasterMoved { from: live.addr.clone(), to });
                }
                match tokio::time::timeout(timing.timeout, live.ping()).await {
                    Ok(Ok(())) => position.alive = Instant::now(),
                    Ok(Err(e)) => return Some(Lost::Ping(connector.describe(&e))),
                    Err(_) => return Some(Lost::NoPong(timing.timeout)),
                }
            }
            incoming = live.next() => match incoming {
                Incoming::Msg(m) => receive(broker, m.get_channel_name(), m.get_payload_bytes(), position),
                Incoming::Push(push) => {
                    if let Err(why) = pushed(broker, live, position, push).await {
                        return Some(why);
                    }
                }
                Incoming::Closed => return Some(Lost::Closed),
            },
        }
    }
}

/// A push of the cluster's connection: a message (live), a node's
/// connection lost (the subscription is made afresh, and the gap filled),
/// or a shard channel unsubscribed by the server (its slot moved to
/// another node: subscribed again there, and its history read from the
/// last event delivered, so nothing is lost and nothing comes twice).
async fn pushed(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    push: redis::PushInfo,
) -> Result<(), Lost> {
    use redis::PushKind;
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Some(b.clone()),
        Some(redis::Value::SimpleString(s)) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let (channel, payload) = match push.kind {
        PushKind::Message | PushKind::SMessage => (text(push.data.first()), text(push.data.get(1))),
        PushKind::PMessage => (text(push.data.get(1)), text(push.data.get(2))),
        PushKind::Disconnection => return Err(Lost::NodeDropped),
        PushKind::SUnsubscribe => {
            let moved = text(push.data.first())
                .and_then(|c| String::from_utf8(c).ok())
                .and_then(|c| read_scope(c.strip_prefix(broker.names.scope_channels())?))
                .filter(|scope| live.subscribed.contains(scope));
            if let Some(scope) = moved {
                return moved_scope(broker, live, position, scope).await;
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    if let (Some(channel), Some(payload)) = (channel, payload)
        && let Ok(channel) = std::str::from_utf8(&channel)
    {
        receive(broker, channel, &payload, position);
    }
    Ok(())
}

/// A scope whose shard channel the server unsubscribed (a slot migrated):
/// subscribed again (on the slot's new owner), then its history read from
/// the tenant's last event delivered.
async fn moved_scope(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    scope: Scope,
) -> Result<(), Lost> {
    let since = Instant::now();
    live.subscribed.remove(&scope);
    live.subscribe(broker, &[scope]).await?;
    let start = position.gap_start(scope.tenant());
    let (read, _) = read_and_measure(broker, position, &[scope], &[start]).await;
    let mut filled = read.map_err(|why| Lost::History(why.to_string()))?;
    let count = deliver_filled(broker, position, std::mem::take(&mut filled.entries));
    note_filled(position, &[scope], &filled);
    broker.metrics.gap_filled_events.inc_by(count);
    if !filled.reloaded.is_empty() || !filled.trimmed.is_empty() {
        lost(
            broker,
            Some(&[scope]),
            ResyncReason::HistoryUnavailable,
            Gap { since },
        );
    } else {
        broker
            .metrics
            .subscription_gaps
            .with_label_values(&["filled"])
            .inc();
    }
    tracing::info!(scope = %broker.names.scope_channel(scope), filled = count, "shard channel moved to another node; subscribed there");
    Ok(())
}

/// Makes the subscription follow the audience: unsubscribes the scopes
/// that lost their last connection, subscribes the new ones and fills
/// their window from history.
async fn follow(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
) -> Result<(), Lost> {
    let since = broker.listeners.changes().take_since_us();
    let wanted: HashSet<Scope> = broker.listeners.scopes().into_iter().collect();
    let mut gone: Vec<Scope> = live.subscribed.difference(&wanted).copied().collect();
    let mut added: Vec<Scope> = wanted.difference(&live.subscribed).copied().collect();
    gone.sort_unstable();
    added.sort_unstable();
    if !gone.is_empty() {
        live.unsubscribe(broker, &gone).await?;
        for scope in &gone {
            position.filled.remove(scope);
        }
    }
    if !added.is_empty() {
        live.subscribe(broker, &added).await?;
        fill_new(broker, position, &added, since).await?;
    }
    broker
        .metrics
        .redis_subscribed_scopes
        .set(live.subscribed.len() as i64);
    tracing::debug!(
        subscribed = added.len(),
        unsubscribed = gone.len(),
        scopes = live.subscribed.len(),
        "subscription follows the audience"
    );
    Ok(())
}

fn receive(broker: &RedisBroker, channel: &str, payload: &[u8], position: &mut Position) {
    position.alive = Instant::now();
    let scope_tail = channel.strip_prefix(broker.names.scope_channels());
    // On a seed channel, a plain event is a JSON object; the function's
    // messages (a backend's `wsgateway_publish`) start with their number.
    if scope_tail.is_none() && !payload.first().is_some_and(u8::is_ascii_digit) {
        position.plain_seen = Some(Instant::now());
        // The patterns are this deployment's: the prefix is there.
        let seed = broker.names.seed_channel(channel).unwrap_or(channel);
        broker
            .queue
            .ingest(seed, bytes::Bytes::copy_from_slice(payload));
        return;
    }
    let shown = || channel.chars().take(200).collect::<String>();
    let Some(message) = read_numbered(payload) else {
        broker.metrics.dropped(Drop::Invalid);
        tracing::warn!(channel = %shown(), "malformed numbered event dropped");
        return;
    };
    if !broker.signing.verify(
        channel,
        message.number,
        message.channel_list,
        message.frame,
        message.signature,
    ) {
        broker.metrics.dropped(Drop::Unsigned);
        tracing::warn!(channel = %shown(), "numbered event dropped: not signed by the wsgateway function library");
        return;
    }
    let scope = match scope_tail {
        Some(tail) => read_scope(tail),
        // On the seed channel of its scope's first channel.
        None => Fields::parse(message.frame).ok().and_then(|fields| {
            let first = *message.channels.first()?;
            (broker.names.seed_channel(channel) == Some(first.to_string().as_str()))
                .then(|| Scope::of(first, &fields))
        }),
    };
    let Some(scope) = scope else {
        broker.metrics.dropped(Drop::Invalid);
        tracing::warn!(channel = %shown(), "numbered event dropped: not of the scope of its channel");
        return;
    };
    let (n, channels) = (message.n, message.channels);
    match position.judge(scope, n, &channels) {
        Verdict::Deliver(fresh) => {
            let frame = Utf8Bytes::from(message.frame.to_owned());
            if !fresh.is_empty()
                && broker
                    .queue
                    .ingest_numbered(&fresh, frame, false, Some(scope))
            {
                position.delivered(scope.tenant(), n, &fresh);
            }
        }
        Verdict::Filled => {}
        Verdict::Untrusted => {
            broker.metrics.dropped(Drop::UntrustedNumber);
            tracing::warn!(%channel, number = n, "numbered event dropped: its number is beyond any Redis has given");
        }
    }
}

/// Reads a scope channel's tail, `{<tenant>}:<scope>`.
fn read_scope(tail: &str) -> Option<Scope> {
    let (tenant, suffix) = tail.strip_prefix('{')?.split_once("}:")?;
    let tenant = tenant
        .parse::<TenantId>()
        .ok()
        .filter(|t| t.to_string() == tenant)?;
    Scope::from_suffix(tenant, suffix)
}

/// A numbered message, `n\n<channels>\n<signature>\n<frame>`.
struct Numbered<'a> {
    number: &'a str,
    n: u64,
    channel_list: &'a str,
    channels: Vec<Channel>,
    signature: &'a str,
    frame: &'a str,
}

fn read_numbered(payload: &[u8]) -> Option<Numbered<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(4, '\n');
    let (number, channel_list, signature, frame) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let channels = channel_list
        .split(',')
        .map(|c| c.parse::<Channel>().ok())
        .collect::<Option<Vec<_>>>()?;
    let n = number.parse().ok().filter(|_| !number.starts_with('+'))?;
    Some(Numbered {
        number,
        n,
        channel_list,
        channels,
        signature,
        frame,
    })
}

/// What one gap read found.
#[derive(Default)]
struct Filled {
    /// Redis's clock when it read, microseconds.
    redis_us: i64,
    /// The `run_id` of the Redis process it read from.
    run_id: String,
    /// Per tenant read, its counter.
    counters: HashMap<TenantId, u64>,
    /// Kept events after each tenant's gap start, by number, and the
    /// tenant of each.
    entries: HashMap<TenantId, Merged>,
    /// Scopes whose history was trimmed past their gap's start.
    trimmed: Vec<Scope>,
    /// Scopes whose tenant's data was reloaded (a restart, a failover)
    /// after their gap's start: what was written last before it may be
    /// gone.
    reloaded: Vec<Scope>,
    /// Scopes whose tenant's data has no note (new, or flushed).
    gone: Vec<Scope>,
}

/// Fills a gap: queues what history kept for the subscribed `scopes` since
/// the gap began, in order, and tells the connections what it could not.
async fn fill(broker: &RedisBroker, position: &mut Position, scopes: &[Scope], gap: Gap) {
    let starts: Vec<u64> = scopes
        .iter()
        .map(|s| position.gap_start(s.tenant()))
        .collect();
    let (read, restarted) = read_and_measure(broker, position, scopes, &starts).await;
    for scope in scopes {
        position.filled.remove(scope);
    }
    let mut filled = match read {
        Ok(filled) => filled,
        Err(why) => {
            tracing::warn!(reason = %why, "cannot read history to fill a subscription gap");
            lost(broker, None, ResyncReason::HistoryUnavailable, gap);
            return;
        }
    };
    // A tenant whose data has no note any more, though this node delivered
    // its events: flushed.
    let gone = std::mem::take(&mut filled.gone);
    filled.reloaded.extend(
        gone.into_iter()
            .filter(|scope| position.delivered.contains_key(&scope.tenant())),
    );
    let count = deliver_filled(broker, position, std::mem::take(&mut filled.entries));
    note_filled(position, scopes, &filled);
    broker.metrics.gap_filled_events.inc_by(count);
    let outcome = gap_outcome(broker, position, &filled, restarted, gap);
    tracing::info!(
        filled = count,
        outcome,
        gap_ms = gap.since.elapsed().as_millis() as u64,
        "subscription gap closed"
    );
}

/// Reads the gap of `scopes` (with none, only Redis's clock) and notes what
/// the read says of Redis: its clock, and whether it is another process
/// than the one read last (a restart, a failover: what the old one had not
/// written to disk, or to the replica, may be gone), returned.
async fn read_and_measure(
    broker: &RedisBroker,
    position: &mut Position,
    scopes: &[Scope],
    starts: &[u64],
) -> (Result<Filled, GapError>, bool) {
    let asked_at = unix_us();
    let read = read_gap(broker, scopes, starts).await;
    let restarted = match &read {
        Ok(filled) => {
            // Halfway through the call: the error is half its time at most.
            let local = (asked_at + unix_us()) / 2;
            position.offset_us = filled.redis_us - local;
            position.offset_error_us = (unix_us() - asked_at) / 2;
            position.measured = Instant::now();
            // In a cluster, each tenant's shard answers with its own
            // run_id: a reload is told per tenant (its epoch) instead.
            let before = position.run_id.replace(filled.run_id.clone());
            !broker.link.connector().is_cluster() && before.is_some_and(|run| run != filled.run_id)
        }
        Err(_) => false,
    };
    (read, restarted)
}

/// Notes what a fill read of `scopes`: their live messages numbered up to
/// their tenant's counter then are skipped.
fn note_filled(position: &mut Position, scopes: &[Scope], filled: &Filled) {
    for scope in scopes {
        if let Some(&counter) = filled.counters.get(&scope.tenant()) {
            position.filled.insert(*scope, counter);
        }
    }
}

/// Fills the window of new scopes (just subscribed, their connections
/// there since `since`, this node's clock in µs): queues what history kept
/// of each from just before then, in order. Without `since` (nothing
/// changed), only measures Redis's clock. A trim within the window is told
/// to the scopes' connections. A read that fails gives the subscription
/// up: the subscriber then subscribes afresh and fills the gap, live
/// messages waiting meanwhile, so nothing arrives out of order.
async fn fill_new(
    broker: &RedisBroker,
    position: &mut Position,
    scopes: &[Scope],
    since: Option<i64>,
) -> Result<(), Lost> {
    let Some(since) = since.filter(|_| !scopes.is_empty()) else {
        let _ = read_and_measure(broker, position, &[], &[]).await;
        return Ok(());
    };
    let start = (since + position.offset_us - position.new_scope_margin_us()).max(0) as u64;
    let starts = vec![start; scopes.len()];
    let (read, _) = read_and_measure(broker, position, scopes, &starts).await;
    let mut filled = read.map_err(|why| Lost::History(why.to_string()))?;
    let count = deliver_filled(broker, position, std::mem::take(&mut filled.entries));
    note_filled(position, scopes, &filled);
    // (A reload before the window, which `filled.reloaded` may report, is
    // nothing these new connections had.)
    if !filled.trimmed.is_empty() {
        broker
            .metrics
            .dropped_n(Drop::Gap, filled.trimmed.len() as u64);
        let told = broker
            .listeners
            .events_lost(Some(&filled.trimmed), ResyncReason::HistoryTrimmed);
        tracing::warn!(
            scopes = filled.trimmed.len(),
            connections = told,
            "history of new scopes trimmed in their first moments; clients told to resync"
        );
    }
    tracing::debug!(
        scopes = scopes.len(),
        filled = count,
        "new scopes subscribed"
    );
    Ok(())
}

/// Queues the events history kept, in order, each on the channels it was
/// not delivered on yet; returns how many were queued.
fn deliver_filled(
    broker: &RedisBroker,
    position: &mut Position,
    entries: HashMap<TenantId, Merged>,
) -> u64 {
    let mut count = 0;
    for (tenant, merged) in entries {
        for entry in merged.into_entries() {
            let fresh = position.undelivered(tenant, entry.seq, &entry.channels);
            if !fresh.is_empty()
                && broker
                    .queue
                    .ingest_numbered(&fresh, entry.frame, true, None)
            {
                count += 1;
                position.delivered(tenant, entry.seq, &fresh);
            }
        }
    }
    count
}

/// Whether the fill closed the gap, or what it lost (the first reason that
/// applies, the connections concerned told to resync).
fn gap_outcome(
    broker: &RedisBroker,
    position: &Position,
    filled: &Filled,
    restarted: bool,
    gap: Gap,
) -> &'static str {
    let ttl = broker.history.ttl;
    let plain_recently = position
        .plain_seen
        .is_some_and(|at| at.elapsed() <= ttl + gap.since.elapsed());
    if gap.since.elapsed() > ttl {
        lost(broker, None, ResyncReason::HistoryExpired, gap)
    } else if restarted {
        tracing::warn!(
            "Redis is another process than before the gap (a restart or a failover): what it wrote last may be lost"
        );
        lost(broker, None, ResyncReason::HistoryUnavailable, gap)
    } else if plain_recently {
        lost(broker, None, ResyncReason::UnnumberedEvents, gap)
    } else if !filled.reloaded.is_empty() {
        tracing::warn!(
            scopes = filled.reloaded.len(),
            "Redis's data was reloaded during the gap (a restart or a failover): what it wrote last may be lost"
        );
        lost(
            broker,
            Some(&filled.reloaded),
            ResyncReason::HistoryUnavailable,
            gap,
        )
    } else if !filled.trimmed.is_empty() {
        broker
            .metrics
            .dropped_n(Drop::Gap, filled.trimmed.len() as u64);
        lost(
            broker,
            Some(&filled.trimmed),
            ResyncReason::HistoryTrimmed,
            gap,
        )
    } else {
        broker
            .metrics
            .subscription_gaps
            .with_label_values(&["filled"])
            .inc();
        "filled"
    }
}

/// Counts a gap that history could not fill and tells the connections of
/// `scopes` (all, when `None`) to reload their state.
fn lost(
    broker: &RedisBroker,
    scopes: Option<&[Scope]>,
    reason: ResyncReason,
    gap: Gap,
) -> &'static str {
    broker
        .metrics
        .subscription_gaps
        .with_label_values(&["lost"])
        .inc();
    let told = broker.listeners.events_lost(scopes, reason);
    tracing::warn!(
        reason = reason.as_str(),
        connections = told,
        gap_ms = gap.since.elapsed().as_millis() as u64,
        "events may have been lost in a subscription gap; clients told to resync"
    );
    reason.as_str()
}

/// Reads `wsgateway_gap`'s answers for `scopes`, each from its start (in
/// chunks); with no scopes, only Redis's clock.
async fn read_gap(
    broker: &RedisBroker,
    scopes: &[Scope],
    starts: &[u64],
) -> Result<Filled, GapError> {
    let mut filled = Filled::default();
    let mut chunks = read_chunks(broker.link.connector().is_cluster(), scopes, starts);
    if chunks.is_empty() {
        chunks.push((Vec::new(), Vec::new()));
    }
    let function = broker.names.function("wsgateway_gap");
    let calls: Vec<futures_util::future::BoxFuture<'_, _>> =
        chunks
            .iter()
            .map(|(chunk, starts)| {
                let mut fcall = redis::cmd("FCALL");
                fcall.arg(&function).arg(chunk.len());
                for scope in chunk {
                    fcall.arg(broker.names.stream(*scope));
                }
                fcall.arg(broker.history.size.saturating_add(1));
                for (scope, start) in chunk.iter().zip(starts) {
                    fcall.arg(scope.tenant()).arg(*start);
                }
                Box::pin(broker.link.call(move |mut c| async move {
                    fcall.query_async::<redis::Value>(&mut c).await
                })) as futures_util::future::BoxFuture<'_, _>
            })
            .collect();
    // A few at once: in a cluster, the tenants' shards read in parallel.
    let answers: Vec<_> = futures_util::stream::iter(calls)
        .buffered(8)
        .collect()
        .await;
    for ((chunk, starts), raw) in chunks.iter().zip(answers) {
        read_gap_answer(raw?, chunk, starts, &mut filled).ok_or(GapError::Unexpected)?;
    }
    Ok(filled)
}

/// The gap reads of `scopes`, each at most [`SCOPES_PER_READ`] long; in a
/// cluster, each of one tenant (its keys on one shard).
fn read_chunks(cluster: bool, scopes: &[Scope], starts: &[u64]) -> Vec<(Vec<Scope>, Vec<u64>)> {
    let mut groups: Vec<Vec<(Scope, u64)>> = Vec::new();
    if cluster {
        let mut by_tenant: std::collections::BTreeMap<TenantId, Vec<(Scope, u64)>> =
            std::collections::BTreeMap::new();
        for (scope, start) in scopes.iter().zip(starts) {
            by_tenant
                .entry(scope.tenant())
                .or_default()
                .push((*scope, *start));
        }
        groups.extend(by_tenant.into_values());
    } else {
        groups.push(scopes.iter().copied().zip(starts.iter().copied()).collect());
    }
    groups
        .iter()
        .flat_map(|g| g.chunks(SCOPES_PER_READ))
        .filter(|c| !c.is_empty())
        .map(|c| c.iter().copied().unzip())
        .collect()
}

/// Reads one answer of `wsgateway_gap` into `filled`.
fn read_gap_answer(
    raw: redis::Value,
    scopes: &[Scope],
    starts: &[u64],
    filled: &mut Filled,
) -> Option<()> {
    use redis::Value;
    let Value::Array(mut top) = raw else {
        return None;
    };
    let Value::Array(streams) = top.pop()? else {
        return None;
    };
    filled.run_id = text(&top.pop()?)?;
    let Value::Array(time) = top.pop()? else {
        return None;
    };
    let [secs, micros] = time.as_slice() else {
        return None;
    };
    let secs: i64 = text(secs)?.parse().ok()?;
    let micros: i64 = text(micros)?.parse().ok()?;
    filled.redis_us = secs * 1_000_000 + micros;
    for ((scope, &start), stream) in scopes.iter().zip(starts).zip(streams) {
        let Value::Array(mut parts) = stream else {
            return None;
        };
        let data = text(&parts.pop()?)?;
        let epoch: u64 = text(&parts.pop()?)?.parse().ok()?;
        let counter: u64 = text(&parts.pop()?)?.parse().ok()?;
        let entries = read_entries(parts.pop()?)?;
        let first: u64 = text(&parts.pop()?)?.parse().ok()?;
        let trimmed: i64 = text(&parts.pop()?)?.parse().ok()?;
        filled.counters.insert(scope.tenant(), counter);
        if epoch > start.saturating_add(1) {
            filled.reloaded.push(*scope);
        } else if data == "new" {
            filled.gone.push(*scope);
        }
        // The size bound removed the entries before `first`; when `first`
        // is itself in the gap, some of them may have been too.
        if trimmed > 0 && first > start.saturating_add(1) {
            filled.trimmed.push(*scope);
        }
        let merged = filled.entries.entry(scope.tenant()).or_default();
        for entry in entries.into_iter().filter(|e| e.seq > start) {
            merged.add(entry);
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbered_messages() {
        let m = read_numbered(
            b"17\nchannel:branch:5:admin,channel:session:7\nab12\n{\"a\":\"x\\ny\"}\n",
        )
        .unwrap();
        assert_eq!((m.number, m.n), ("17", 17));
        assert_eq!(
            m.channels,
            vec![Channel::BranchAdmin(5), Channel::Session(7)]
        );
        assert_eq!(m.signature, "ab12");
        assert_eq!(m.frame, "{\"a\":\"x\\ny\"}\n");
        assert!(read_numbered(b"x\nchannel:branch:5:admin\ns\n{}").is_none());
        assert!(read_numbered(b"+1\nchannel:branch:5:admin\ns\n{}").is_none());
        assert!(read_numbered(b"1\nchannel:nope\ns\n{}").is_none());
        assert!(read_numbered(b"1\nchannel:branch:5:admin\n{}").is_none());
    }

    #[test]
    fn reads_scope_channels() {
        assert_eq!(read_scope("{7}:branch:5"), Some(Scope::Branch(7, 5)));
        assert_eq!(read_scope("{7}:staff"), Some(Scope::TenantStaff(7)));
        assert_eq!(read_scope("{7}:session:9"), Some(Scope::Session(7, 9)));
        for bad in [
            "7:branch:5",
            "{x}:staff",
            "{7}:nope",
            "{+7}:staff",
            "{7}staff",
        ] {
            assert_eq!(read_scope(bad), None, "{bad}");
        }
    }

    fn now_us() -> u64 {
        unix_us() as u64
    }

    #[test]
    fn a_number_beyond_redis_clock_changes_nothing() {
        let mut p = Position::default();
        let scope = Scope::Branch(1, 5);
        let c = [Channel::BranchAdmin(5)];
        for stray in [u64::MAX, now_us() + TRUST_AHEAD_US + 1_000_000] {
            assert_eq!(p.judge(scope, stray, &c), Verdict::Untrusted);
        }
        assert!(p.delivered.is_empty());
        assert_eq!(p.judge(scope, now_us(), &c), Verdict::Deliver(c.to_vec()));
    }

    #[test]
    fn a_plausible_stray_never_silences_later_events() {
        let mut p = Position::default();
        let scope = Scope::Branch(1, 5);
        let c = [Channel::BranchAdmin(5)];
        let stray = now_us() + 60_000_000;
        assert_eq!(p.judge(scope, stray, &c), Verdict::Deliver(c.to_vec()));
        p.delivered(1, stray, &c);
        let next = now_us();
        assert_eq!(p.judge(scope, next, &c), Verdict::Deliver(c.to_vec()));
        // And a gap after it starts from the clock, not from the stray.
        assert!(p.gap_start(1) < next);
    }

    #[test]
    fn only_the_scopes_a_fill_read_skip_what_it_filled() {
        let mut p = Position::default();
        let read = Scope::Branch(1, 5);
        let joined_during_fill = Scope::Branch(1, 6);
        let n = now_us();
        p.filled.insert(read, n);
        let c5 = [Channel::BranchAdmin(5)];
        let c6 = [Channel::BranchAdmin(6)];
        assert_eq!(p.judge(read, n - 10, &c5), Verdict::Filled);
        assert_eq!(
            p.judge(joined_during_fill, n - 5, &c6),
            Verdict::Deliver(c6.to_vec()),
            "a scope registered during the fill gets its live events"
        );
        assert_eq!(p.judge(read, n + 1, &c5), Verdict::Deliver(c5.to_vec()));
        assert!(
            !p.filled.contains_key(&read),
            "past the fill, nothing more is skipped"
        );
    }

    #[test]
    fn each_scopes_share_of_an_event_is_delivered_once() {
        let mut p = Position::default();
        let (a, b) = (Channel::Session(1), Channel::BranchAdmin(5));
        let n = now_us();
        p.delivered(1, n, &[a]);
        assert_eq!(
            p.judge(Scope::Branch(1, 5), n, &[a, b]),
            Verdict::Deliver(vec![b])
        );
        assert_eq!(p.gap_start(1), n - 1, "the last event is read again");
        assert_eq!(p.gap_start(2) / 1_000_000, (now_us() - LEAD_US) / 1_000_000);
    }
}
