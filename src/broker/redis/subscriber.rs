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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use super::connector::RoleError;
use super::{RedisBroker, read_entries, text};
use crate::broker::Scope;
use crate::broker::backoff::Backoff;
use crate::broker::history::Merged;
use crate::channel::Channel;
use crate::metrics::Drop;
use crate::reply::ResyncReason;

/// Where the function library publishes numbered events, per scope.
const SCOPE_PREFIX: &str = "wsgateway:events:";
const SCOPE_PATTERN: &str = "wsgateway:events:*";

/// Scopes read per gap-fill script call.
const SCOPES_PER_READ: usize = 256;

/// Reads what a node missed in a gap.
static GAP: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("../lua/gap.lua")));

/// How far this node's delivery of numbered events has got.
#[derive(Debug, Default)]
struct Position {
    /// The highest number delivered (live or filled).
    delivered: u64,
    /// The channels that number was delivered on so far: the function
    /// publishes an event once per scope, each message with that scope's
    /// channels only, so one number arrives several times, on disjoint
    /// channels.
    delivered_on: HashSet<Channel>,
    /// The sequence counter when the current subscription started: every
    /// number after it reaches this node live.
    baseline: u64,
    /// When the last plain (unnumbered) `PUBLISH` arrived.
    plain_seen: Option<Instant>,
}

impl Position {
    /// Everything up to this number was delivered or predates the
    /// subscription.
    fn high(&self) -> u64 {
        self.delivered.max(self.baseline)
    }

    /// Records event `seq` arriving on `channels`; returns those it was not
    /// delivered on yet (none for an older number, already delivered).
    fn fresh(&mut self, seq: u64, channels: &[Channel]) -> Vec<Channel> {
        if seq < self.delivered {
            return Vec::new();
        }
        if seq > self.delivered {
            self.delivered = seq;
            self.delivered_on.clear();
        }
        channels
            .iter()
            .copied()
            .filter(|c| self.delivered_on.insert(*c))
            .collect()
    }
}

/// A stretch of time without a subscription.
#[derive(Debug, Clone, Copy)]
struct Gap {
    /// Events numbered after this one may be missing.
    after: u64,
    since: Instant,
}

/// Subscribes, fills gaps, and delivers, until `shutdown`.
pub(super) async fn run(broker: Arc<RedisBroker>, shutdown: CancellationToken) {
    let timing = broker.timing;
    let mut backoff = Backoff::new(timing.retry_base, timing.retry_max);
    let mut position = Position::default();
    let mut gap: Option<Gap> = None;
    // The last failure logged: a failure is logged when it changes, not at
    // every retry.
    let mut failing: Option<String> = None;
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
                // The command connection most likely shares the fate of the
                // path: make the next call connect afresh.
                broker.link.reset();
                gap = Some(Gap {
                    after: position.high(),
                    since: Instant::now(),
                });
                None
            }
            Ok(Err(why)) => Some(format!("cannot subscribe: {why}")),
            Err(_) => Some("cannot subscribe: timed out".into()),
        };
        if let Some(why) = failure {
            if failing.as_ref() != Some(&why) {
                if why.contains("TLS:") {
                    tracing::error!(reason = %why, "Redis subscription failed; retrying");
                } else {
                    tracing::warn!(reason = %why, "Redis subscription failed; retrying");
                }
            }
            broker.set_subscribed(false, Some(why.clone()));
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
async fn open(broker: &RedisBroker) -> Result<(PubSubSink, PubSubStream, String), String> {
    let connector = broker.link.connector();
    let endpoint = connector.endpoint().await?;
    let describe = |e: redis::RedisError| connector.describe(&e);
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
                RoleError::NotMaster(why) => why,
                RoleError::Failed(e) => describe(e),
            })?;
    }
    let mut pubsub = endpoint.client.get_async_pubsub().await.map_err(describe)?;
    for pattern in Channel::PATTERNS {
        pubsub.psubscribe(pattern).await.map_err(describe)?;
    }
    pubsub.psubscribe(SCOPE_PATTERN).await.map_err(describe)?;
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
) -> Option<String> {
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
                    let master = connector.master().unwrap_or_default();
                    return Some(format!("the master moved from {addr} to {master}"));
                }
                match tokio::time::timeout(timing.timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(format!("PING failed: {}", connector.describe(&e))),
                    Err(_) => return Some(format!("no answer to PING within {:?}", timing.timeout)),
                }
            }
            message = stream.next() => match message {
                Some(m) => receive(broker, &m, position),
                None => return Some("connection closed".into()),
            },
        }
    }
}

fn receive(broker: &RedisBroker, m: &redis::Msg, position: &mut Position) {
    let channel = m.get_channel_name();
    let payload = m.get_payload_bytes();
    if !channel.starts_with(SCOPE_PREFIX) {
        position.plain_seen = Some(Instant::now());
        broker
            .queue
            .ingest(channel, bytes::Bytes::copy_from_slice(payload));
        return;
    }
    let Some((seq, channels, frame)) = read_numbered(payload) else {
        broker.metrics.dropped(Drop::Invalid);
        tracing::warn!(%channel, "malformed numbered event dropped");
        return;
    };
    // Another scope's share of an event is new; a share already delivered
    // (by a gap fill, or a repeat) is skipped.
    let fresh = position.fresh(seq, &channels);
    if !fresh.is_empty() {
        broker.queue.ingest_numbered(&fresh, frame, false);
    }
}

/// Reads `n\n<channels>\n<frame>`.
fn read_numbered(payload: &[u8]) -> Option<(u64, Vec<Channel>, Utf8Bytes)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (seq, rest) = text.split_once('\n')?;
    let (channels, frame) = rest.split_once('\n')?;
    let channels = channels
        .split(',')
        .map(|c| c.parse::<Channel>().ok())
        .collect::<Option<Vec<_>>>()?;
    Some((
        seq.parse().ok()?,
        channels,
        Utf8Bytes::from(frame.to_owned()),
    ))
}

/// What one gap read found.
#[derive(Default)]
struct Filled {
    /// The sequence counter when read (`None`: Redis has none yet).
    counter: Option<u64>,
    /// Kept events after the gap's start, by number.
    entries: Merged,
    /// Scopes whose history was trimmed past the gap's start.
    trimmed: Vec<Scope>,
}

/// Reads the new baseline and, after a gap, fills it: queues what history
/// kept for this node's scopes, in order, and tells the connections what
/// it could not.
async fn fill(broker: &RedisBroker, position: &mut Position, gap: Option<Gap>) {
    let scopes = match gap {
        Some(_) => broker.listeners.scopes(),
        None => Vec::new(),
    };
    // The last event delivered before the gap is read again: only some of
    // its scopes' messages may have arrived (the rest are filled, the
    // channels already delivered skipped).
    let after = match gap {
        Some(g) if g.after == position.delivered => g.after.saturating_sub(1),
        Some(g) => g.after,
        None => position.high(),
    };
    let read = read_gap(broker, &scopes, after).await;
    let Some(gap) = gap else {
        if let Ok(Filled {
            counter: Some(n), ..
        }) = read
        {
            position.baseline = n;
        }
        return;
    };
    let metrics = &broker.metrics;
    let filled = match read {
        Ok(filled) => filled,
        Err(why) => {
            tracing::warn!(reason = %why, "cannot read history to fill a subscription gap");
            lost(broker, None, ResyncReason::HistoryUnavailable, gap);
            return;
        }
    };
    // No counter at all: Redis lost its data, and numbering starts again
    // from the clock, above every number given before (see `lua/`).
    if let Some(counter) = filled.counter
        && counter < position.high()
    {
        // The counter went back: a failover lost writes the old master had
        // not replicated, or Redis restarted without persistence. Numbers
        // up to ours will be given again, to new events: deliver them
        // (the position restarts at the counter), and tell every
        // connection that history no longer matches what it saw.
        tracing::warn!(
            from = position.high(),
            to = counter,
            "Redis's event counter went back (a failover lost writes, or a restart without persistence)"
        );
        *position = Position {
            baseline: counter,
            plain_seen: position.plain_seen,
            ..Position::default()
        };
        lost(broker, None, ResyncReason::HistoryUnavailable, gap);
        return;
    }
    let mut count = 0;
    for entry in filled.entries.into_entries() {
        let fresh = position.fresh(entry.seq, &entry.channels);
        if !fresh.is_empty() {
            count += 1;
            broker.queue.ingest_numbered(&fresh, entry.frame, true);
        }
    }
    if let Some(n) = filled.counter {
        position.baseline = position.baseline.max(n);
    }
    metrics.gap_filled_events.inc_by(count as u64);
    let ttl = broker.history.ttl;
    let plain_recently = position
        .plain_seen
        .is_some_and(|at| at.elapsed() <= ttl + gap.since.elapsed());
    let outcome = if gap.since.elapsed() > ttl {
        lost(broker, None, ResyncReason::HistoryExpired, gap)
    } else if plain_recently {
        lost(broker, None, ResyncReason::UnnumberedEvents, gap)
    } else if !filled.trimmed.is_empty() {
        metrics.dropped_n(Drop::Gap, filled.trimmed.len() as u64);
        lost(
            broker,
            Some(&filled.trimmed),
            ResyncReason::HistoryTrimmed,
            gap,
        )
    } else {
        metrics
            .subscription_gaps
            .with_label_values(&["filled"])
            .inc();
        "filled"
    };
    tracing::info!(
        filled = count,
        outcome,
        gap_ms = gap.since.elapsed().as_millis() as u64,
        "subscription gap closed"
    );
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

/// Reads the gap script's answers for `scopes` (in chunks).
async fn read_gap(broker: &RedisBroker, scopes: &[Scope], after: u64) -> Result<Filled, String> {
    let mut filled = Filled::default();
    let chunks: Vec<&[Scope]> = if scopes.is_empty() {
        vec![&[]]
    } else {
        scopes.chunks(SCOPES_PER_READ).collect()
    };
    for chunk in chunks {
        let mut invocation = GAP.prepare_invoke();
        for scope in chunk {
            invocation.key(scope.redis_key());
        }
        invocation
            .arg(after.saturating_add(1))
            .arg(broker.history.size.saturating_add(1));
        let raw = broker
            .link
            .call(|mut c| async move { invocation.invoke_async::<redis::Value>(&mut c).await })
            .await
            .map_err(|e| e.to_string())?;
        read_gap_answer(raw, chunk, after, &mut filled).ok_or("unexpected gap answer")?;
    }
    Ok(filled)
}

/// Reads one answer of `lua/gap.lua` into `filled`.
fn read_gap_answer(
    raw: redis::Value,
    scopes: &[Scope],
    after: u64,
    filled: &mut Filled,
) -> Option<()> {
    use redis::Value;
    let Value::Array(mut top) = raw else {
        return None;
    };
    let Value::Array(streams) = top.pop()? else {
        return None;
    };
    filled.counter = match top.pop()? {
        Value::Nil => None,
        v => Some(text(&v)?.parse().ok()?),
    };
    for (scope, stream) in scopes.iter().zip(streams) {
        let Value::Array(mut parts) = stream else {
            return None;
        };
        let entries = read_entries(parts.pop()?)?;
        let first: u64 = text(&parts.pop()?)?.parse().ok()?;
        let trimmed: i64 = text(&parts.pop()?)?.parse().ok()?;
        // The size bound removed the entries before `first`; when `first`
        // is itself in the gap, some of them may have been too.
        if trimmed > 0 && first > after.saturating_add(1) {
            filled.trimmed.push(*scope);
        }
        for entry in entries.into_iter().filter(|e| e.seq > after) {
            filled.entries.add(entry);
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbered_messages() {
        let (seq, channels, frame) =
            read_numbered(b"17\nchannel:branch:5:admin,channel:session:7\n{\"a\":\"x\\ny\"}")
                .unwrap();
        assert_eq!(seq, 17);
        assert_eq!(channels, vec![Channel::BranchAdmin(5), Channel::Session(7)]);
        assert_eq!(frame.as_str(), "{\"a\":\"x\\ny\"}");
        assert!(read_numbered(b"x\nchannel:branch:5:admin\n{}").is_none());
        assert!(read_numbered(b"1\nchannel:nope\n{}").is_none());
        assert!(read_numbered(b"1\n{}").is_none());
    }

    #[test]
    fn each_scopes_share_of_an_event_is_delivered_once() {
        let mut p = Position::default();
        let (a, b, c) = (
            Channel::Session(1),
            Channel::Session(2),
            Channel::BranchAdmin(5),
        );
        assert_eq!(p.fresh(7, &[a]), vec![a]);
        assert_eq!(p.fresh(7, &[b, c]), vec![b, c], "another scope's share");
        assert_eq!(p.fresh(7, &[a, b, c]), vec![], "a whole-list repeat");
        assert_eq!(p.fresh(6, &[a]), vec![], "older");
        assert_eq!(p.fresh(8, &[a]), vec![a]);
        assert_eq!(p.delivered, 8);
    }
}
