//! The subscription: live events from Redis, with no gap left unfilled.
//!
//! One pub/sub connection with pattern subscriptions to the seed's channels
//! (plain `PUBLISH`es, delivered live, without numbers) and to the gateway's
//! scope channels (`wsgateway:events:{tenant}:{scope}`, where the function
//! library publishes every event it numbers, as `n\n<channels>\n<frame>`).
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
    /// What the last fill read: each tenant's counter then, and the scopes
    /// it read. A live message of one of those scopes numbered up to the
    /// counter was filled already.
    filled: HashMap<TenantId, u64>,
    filled_scopes: HashSet<Scope>,
    /// Redis's clock minus this node's, in microseconds, as the last fill
    /// measured it.
    offset_us: i64,
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
            filled_scopes: HashSet::new(),
            offset_us: 0,
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
        let tenant = scope.tenant();
        if let Some(&counter) = self.filled.get(&tenant) {
            if n <= counter {
                if self.filled_scopes.contains(&scope) {
                    return Verdict::Filled;
                }
            } else {
                // A tenant's numbers grow in the order Redis runs its
                // calls: every later message is past the fill.
                self.filled.remove(&tenant);
            }
        }
        Verdict::Deliver(self.undelivered(tenant, n, channels))
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
            Ok(Ok((sink, stream, addr))) => {
                backoff.reset();
                failing = None;
                broker.set_subscribed(false, Some("catching up after a gap".into()));
                fill(&broker, &mut position, gap.take()).await;
                broker.set_subscribed(true, None);
                tracing::info!(server = %addr, "subscribed to Redis");
                let Some(why) =
                    listen(&broker, sink, stream, &addr, &mut position, &shutdown).await
                else {
                    return;
                };
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
/// master first); returns the connection and the server's address.
async fn open(broker: &RedisBroker) -> Result<(PubSubSink, PubSubStream, String), SubscribeError> {
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
    Ok((sink, stream, endpoint.addr))
}

/// Delivers messages until the connection is lost (returns why) or
/// `shutdown` (returns `None`).
async fn listen(
    broker: &RedisBroker,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    addr: &str,
    position: &mut Position,
    shutdown: &CancellationToken,
) -> Option<Lost> {
    let connector = broker.link.connector();
    let timing = broker.timing;
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + timing.health_check,
        timing.health_check,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = ping.tick() => {
                if !connector.is_current(addr) {
                    let to = connector.master().unwrap_or_default();
                    return Some(Lost::MasterMoved { from: addr.to_owned(), to });
                }
                match tokio::time::timeout(timing.timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => position.alive = Instant::now(),
                    Ok(Err(e)) => return Some(Lost::Ping(connector.describe(&e))),
                    Err(_) => return Some(Lost::NoPong(timing.timeout)),
                }
            }
            message = stream.next() => match message {
                Some(m) => receive(broker, &m, position),
                None => return Some(Lost::Closed),
            },
        }
    }
}

fn receive(broker: &RedisBroker, m: &redis::Msg, position: &mut Position) {
    position.alive = Instant::now();
    let channel = m.get_channel_name();
    let payload = m.get_payload_bytes();
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

/// Measures Redis's clock and, after a gap, fills it: queues what history
/// kept for this node's scopes, in order, and tells the connections what
/// it could not.
async fn fill(broker: &RedisBroker, position: &mut Position, gap: Option<Gap>) {
    let scopes = match gap {
        Some(_) => broker.listeners.scopes(),
        None => Vec::new(),
    };
    let starts: Vec<u64> = scopes
        .iter()
        .map(|s| position.gap_start(s.tenant()))
        .collect();
    let (read, restarted) = read_and_measure(broker, position, &scopes, &starts).await;
    let Some(gap) = gap else {
        return;
    };
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
    position.filled = std::mem::take(&mut filled.counters);
    position.filled_scopes = scopes.into_iter().collect();
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
    position.filled.clear();
    position.filled_scopes.clear();
    let restarted = match &read {
        Ok(filled) => {
            // Halfway through the call: the error is half its time at most.
            let local = (asked_at + unix_us()) / 2;
            position.offset_us = filled.redis_us - local;
            let before = position.run_id.replace(filled.run_id.clone());
            before.is_some_and(|run| run != filled.run_id)
        }
        Err(_) => false,
    };
    (read, restarted)
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
    let mut chunks: Vec<(&[Scope], &[u64])> = scopes
        .chunks(SCOPES_PER_READ)
        .zip(starts.chunks(SCOPES_PER_READ))
        .collect();
    if chunks.is_empty() {
        chunks.push((&[], &[]));
    }
    let function = broker.names.function("wsgateway_gap");
    for (chunk, starts) in chunks {
        let mut fcall = redis::cmd("FCALL");
        fcall.arg(&function).arg(chunk.len());
        for scope in chunk {
            fcall.arg(broker.names.stream(*scope));
        }
        fcall.arg(broker.history.size.saturating_add(1));
        for (scope, start) in chunk.iter().zip(starts) {
            fcall.arg(scope.tenant()).arg(*start);
        }
        let raw = broker
            .link
            .call(|mut c| {
                let fcall = fcall.clone();
                async move { fcall.query_async::<redis::Value>(&mut c).await }
            })
            .await?;
        read_gap_answer(raw, chunk, starts, &mut filled).ok_or(GapError::Unexpected)?;
    }
    Ok(filled)
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
        p.filled.insert(1, n);
        p.filled_scopes.insert(read);
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
            p.filled.is_empty(),
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
