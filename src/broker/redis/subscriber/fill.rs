//! Reading history back into the event queue: after a gap, for every
//! subscribed scope; for a new scope, its first moments; what history
//! cannot give back told to the connections (`resync`).

use std::collections::HashMap;
use std::time::Instant;

use futures_util::StreamExt;

use super::position::{Gap, Position, unix_us};
use super::{GapError, Lost};
use crate::auth::TenantId;
use crate::broker::history::Merged;
use crate::broker::redis::{RedisBroker, read_entries, text};
use crate::broker::{Arrival, Scope};
use crate::metrics::Drop;
use crate::reply::ResyncReason;

/// Scopes read per gap-fill call.
pub(super) const SCOPES_PER_READ: usize = 256;

/// What one gap read found.
#[derive(Default)]
pub(super) struct Filled {
    /// Redis's clock when it read, microseconds.
    pub(super) redis_us: i64,
    /// The `run_id` of the Redis process it read from.
    pub(super) run_id: String,
    /// Per tenant read, its counter.
    pub(super) counters: HashMap<TenantId, u64>,
    /// Kept events after each tenant's gap start, by number, and the
    /// tenant of each.
    pub(super) entries: HashMap<TenantId, Merged>,
    /// Scopes whose history was trimmed past their gap's start.
    pub(super) trimmed: Vec<Scope>,
    /// Scopes whose tenant's data was reloaded (a restart, a failover)
    /// after their gap's start: what was written last before it may be
    /// gone.
    pub(super) reloaded: Vec<Scope>,
    /// Scopes whose tenant's data has no note (new, or flushed).
    pub(super) gone: Vec<Scope>,
}

/// Fills a gap: queues what history kept for the subscribed `scopes` since
/// the gap began, in order, and tells the connections what it could not.
pub(super) async fn fill(
    broker: &RedisBroker,
    position: &mut Position,
    scopes: &[Scope],
    gap: Gap,
) {
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
    let count = queue(broker, position, scopes, &mut filled);
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

/// Queues what a read of `scopes` found, in order, each event on the
/// channels it was not delivered on yet, and notes the read: live messages
/// of those scopes numbered up to their tenant's counter then are skipped.
/// Returns how many events were queued.
fn queue(
    broker: &RedisBroker,
    position: &mut Position,
    scopes: &[Scope],
    filled: &mut Filled,
) -> u64 {
    let count = deliver_filled(broker, position, std::mem::take(&mut filled.entries));
    for scope in scopes {
        if let Some(&counter) = filled.counters.get(&scope.tenant()) {
            position.filled.insert(*scope, counter);
        }
    }
    count
}

/// Fills the scopes of a tenant whose slot moved to another node (just
/// subscribed there) from the tenant's last event delivered, all from one
/// start taken before any is queued (a scope's fill must not move another's
/// start past events it has not had). A read that fails gives the
/// subscription up; what history cannot vouch for is told to the scopes'
/// connections. Returns how many events were queued.
pub(super) async fn fill_moved(
    broker: &RedisBroker,
    position: &mut Position,
    scopes: &[Scope],
    gap: Gap,
) -> Result<u64, Lost> {
    let starts: Vec<u64> = scopes
        .iter()
        .map(|s| position.gap_start(s.tenant()))
        .collect();
    let (read, _) = read_and_measure(broker, position, scopes, &starts).await;
    let mut filled = read.map_err(|why| Lost::History(why.to_string()))?;
    let count = queue(broker, position, scopes, &mut filled);
    broker.metrics.gap_filled_events.inc_by(count);
    let mut unvouched: Vec<Scope> = filled
        .reloaded
        .iter()
        .chain(&filled.trimmed)
        .copied()
        .collect();
    unvouched.sort_unstable();
    unvouched.dedup();
    if unvouched.is_empty() {
        broker
            .metrics
            .subscription_gaps
            .with_label_values(&["filled"])
            .inc();
    } else {
        lost(
            broker,
            Some(&unvouched),
            ResyncReason::HistoryUnavailable,
            gap,
        );
    }
    Ok(count)
}

/// Fills the window of new scopes (just subscribed, their connections
/// there since `since`, this node's clock in µs): queues what history kept
/// of each from just before then, in order. Without `since` (nothing
/// changed), only measures Redis's clock. A trim within the window is told
/// to the scopes' connections. A read that fails gives the subscription
/// up: the subscriber then subscribes afresh and fills the gap, live
/// messages waiting meanwhile, so nothing arrives out of order.
pub(super) async fn fill_new(
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
    let count = queue(broker, position, scopes, &mut filled);
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
                    .ingest_numbered(&fresh, entry.frame, Arrival::History, None)
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
pub(super) fn gap_outcome(
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
pub(super) async fn read_gap(
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
pub(super) fn read_chunks(
    cluster: bool,
    scopes: &[Scope],
    starts: &[u64],
) -> Vec<(Vec<Scope>, Vec<u64>)> {
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
pub(super) fn read_gap_answer(
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
