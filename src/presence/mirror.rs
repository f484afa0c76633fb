//! The mirror: one task that keeps this node's connections in Redis for
//! the other nodes' readers (the layout is in `mod.rs`).
//!
//! The hub tells it which connection changed (registered, closed, its
//! branches or sectors changed) through a bounded channel, never
//! waiting: a change that finds the channel full is lost, and the task
//! then rewrites the whole of this node's set from the hub instead. It
//! reads each changed connection from the hub as it is when written
//! (`HSET` into each of its branches, `HDEL` from the branches it left or
//! once closed), pipelined, one pipeline per tenant in a cluster.
//!
//! It keeps what it may have written (`written`: connection → tenant and
//! branches, a superset of what Redis holds of this run), so that a full
//! rewrite deletes what no longer is, and heals after any failure. A full
//! rewrite happens at start, after a lost change, after a failed write or
//! heartbeat (once the heartbeat succeeds again), and when the heartbeat
//! finds this run's expired or gone (readers may have deleted its entries
//! meanwhile; then once more at the next heartbeat, after the deletions a
//! reader had decided on before the renewal). Entries are written only
//! while the heartbeat is in. At shutdown the heartbeat and every entry
//! are removed (best effort: otherwise they expire).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{NodeId, Store, listed};
use crate::auth::{BranchId, TenantId};
use crate::broker::RedisConn;
use crate::event::unix_ms;
use crate::hub::{ConnId, Hub, Present, Watcher};
use crate::metrics::Metrics;

/// Changes waiting for the task; beyond, a full rewrite.
const CHANGES: usize = 8192;
/// Commands per pipeline.
const BATCH: usize = 1000;
/// Heartbeat retry after a failure, when a third of the TTL is longer.
const RETRY: Duration = Duration::from_secs(1);

/// What the hub calls ([`Hub::watch`]).
pub struct Changes {
    tx: mpsc::Sender<ConnId>,
    lost: AtomicBool,
    wake: Notify,
}

impl Watcher for Changes {
    fn changed(&self, id: ConnId) {
        if self.tx.try_send(id).is_err() {
            self.lost.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }
}

/// The mirror task, to run once.
pub struct Mirror {
    hub: Arc<Hub>,
    node: NodeId,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    changes: Arc<Changes>,
    rx: mpsc::Receiver<ConnId>,
}

/// What the task knows of Redis.
#[derive(Default)]
struct State {
    /// Connection → tenant and the branches Redis may hold it in.
    written: HashMap<ConnId, (TenantId, Vec<BranchId>)>,
    /// The last heartbeat went in.
    alive: bool,
    /// Rewrite everything once alive.
    rewrite: bool,
    /// Rewrite again at the next heartbeat.
    again: bool,
    /// The last Redis call failed (logged once per outage).
    failing: bool,
}

/// One connection's commands, and the branches Redis holds it in once
/// they succeed.
struct Planned {
    id: ConnId,
    tenant: TenantId,
    after: Vec<BranchId>,
}

impl Mirror {
    pub(super) fn new(
        hub: Arc<Hub>,
        node: NodeId,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Mirror {
        let (tx, rx) = mpsc::channel(CHANGES);
        Mirror {
            hub,
            node,
            store,
            metrics,
            changes: Arc::new(Changes {
                tx,
                lost: AtomicBool::new(false),
                wake: Notify::new(),
            }),
            rx,
        }
    }

    /// What the hub tells of its changes ([`Hub::watch`]).
    pub fn watcher(&self) -> Arc<Changes> {
        self.changes.clone()
    }

    /// Runs until `shutdown`, then removes this run from Redis.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let period = Duration::from_millis(self.store.ttl_ms / 3).max(Duration::from_millis(100));
        let mut state = State {
            rewrite: true,
            ..State::default()
        };
        let mut next_beat = Instant::now();
        let mut ids = Vec::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next_beat) => {
                    self.heartbeat(&mut state).await;
                    next_beat = Instant::now() + if state.alive { period } else { period.min(RETRY) };
                }
                _ = self.rx.recv_many(&mut ids, BATCH) => {}
                () = self.changes.wake.notified() => {}
            }
            if self.changes.lost.swap(false, Ordering::Relaxed) {
                state.rewrite = true;
            }
            if state.rewrite {
                // Everything is read again: the changes say nothing more.
                ids.clear();
                while self.rx.try_recv().is_ok() {}
                if state.alive {
                    self.rewrite(&mut state).await;
                }
            } else if !ids.is_empty() {
                let changed: Vec<ConnId> = std::mem::take(&mut ids);
                self.write(&mut state, changed, true).await;
            }
            if !state.alive {
                next_beat = next_beat.min(Instant::now() + RETRY);
            }
        }
        let leave = self.leave(&mut state);
        if tokio::time::timeout(Duration::from_secs(5), leave)
            .await
            .is_err()
        {
            tracing::debug!("presence entries not removed in time; they expire");
        }
    }

    /// Renews this run's heartbeat; asks for a rewrite when it was expired
    /// or gone, or after a failure.
    async fn heartbeat(&self, state: &mut State) {
        let now = unix_ms().max(0) as u64;
        let ttl = self.store.ttl_ms;
        let key = self.store.nodes_key();
        let mut pipe = redis::pipe();
        pipe.cmd("ZSCORE").arg(&key).arg(self.node.member());
        pipe.cmd("ZADD")
            .arg(&key)
            .arg(now + ttl)
            .arg(self.node.member())
            .ignore();
        // Runs dead for over a TTL: their entries are deleted by readers.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({}", now.saturating_sub(ttl)))
            .ignore();
        let beat =
            |mut c: RedisConn| async move { pipe.query_async::<(Option<f64>,)>(&mut c).await };
        match self.store.link.call(beat).await {
            Ok((score,)) => {
                state.alive = true;
                let lapsed = score.is_none_or(|s| s < now as f64);
                if lapsed {
                    state.rewrite = true;
                    state.again = true;
                } else if std::mem::take(&mut state.again) {
                    state.rewrite = true;
                }
                self.recovered(state);
            }
            Err(e) => {
                state.alive = false;
                state.rewrite = true;
                self.failed(state, &e);
            }
        }
    }

    /// Writes every connection of the hub, and deletes what Redis may hold
    /// of those gone.
    async fn rewrite(&self, state: &mut State) {
        let mut ids: HashSet<ConnId> = self.hub.ids().into_iter().collect();
        ids.extend(state.written.keys().copied());
        self.metrics.presence_rewrites.inc();
        if self.write(state, ids.into_iter().collect(), true).await {
            state.rewrite = false;
        }
    }

    /// Brings Redis in line with the hub for `ids` (or, with `keep`
    /// false, deletes them all); returns whether every call succeeded.
    async fn write(&self, state: &mut State, mut ids: Vec<ConnId>, keep: bool) -> bool {
        ids.sort_unstable();
        ids.dedup();
        // One group per pipeline-able set of keys: per tenant in a
        // cluster (one slot), all together otherwise.
        let mut groups: HashMap<TenantId, (redis::Pipeline, usize, Vec<Planned>)> = HashMap::new();
        let mut batches = Vec::new();
        for id in ids {
            let now = if keep {
                self.hub.present_everywhere(id)
            } else {
                None
            };
            let before = state.written.get(&id);
            let Some(tenant) = now.as_ref().map(|(t, _)| *t).or(before.map(|(t, _)| *t)) else {
                continue;
            };
            let field = format!("{}/{id}", self.node.member());
            let listed_in: Vec<(BranchId, Present)> = now.map(|(_, l)| l).unwrap_or_default();
            let after: Vec<BranchId> = listed_in.iter().map(|(b, _)| *b).collect();
            let left: Vec<BranchId> = before
                .map(|(_, bs)| bs.iter().copied().filter(|b| !after.contains(b)).collect())
                .unwrap_or_default();
            let group_key = if self.store.cluster { tenant } else { 0 };
            let (pipe, n, planned) = groups
                .entry(group_key)
                .or_insert_with(|| (redis::pipe(), 0, Vec::new()));
            for (b, p) in listed_in {
                let entry = serde_json::to_string(&listed(&self.node, p)).unwrap_or_default();
                pipe.cmd("HSET")
                    .arg(self.store.branch_key(tenant, b))
                    .arg(&field)
                    .arg(entry)
                    .ignore();
                *n += 1;
            }
            for b in &left {
                pipe.cmd("HDEL")
                    .arg(self.store.branch_key(tenant, *b))
                    .arg(&field)
                    .ignore();
                *n += 1;
            }
            // Until the calls succeed, Redis may hold it in either.
            let mut maybe = after.clone();
            maybe.extend(left);
            state.written.insert(id, (tenant, maybe));
            planned.push(Planned { id, tenant, after });
            if *n >= BATCH
                && let Some(full) = groups.remove(&group_key)
            {
                batches.push(full);
            }
        }
        batches.extend(groups.into_values());
        let mut ok = true;
        for (pipe, n, planned) in batches {
            if n > 0 {
                let send = |mut c: RedisConn| async move { pipe.query_async::<()>(&mut c).await };
                if let Err(e) = self.store.link.call(send).await {
                    ok = false;
                    // Nothing more is written until a heartbeat goes in
                    // again; then everything is.
                    state.alive = false;
                    state.rewrite = true;
                    self.failed(state, &e);
                    continue;
                }
            }
            for p in planned {
                if p.after.is_empty() {
                    state.written.remove(&p.id);
                } else {
                    state.written.insert(p.id, (p.tenant, p.after));
                }
            }
        }
        if ok {
            self.recovered(state);
        }
        ok
    }

    /// At shutdown: the heartbeat first (readers stop counting this run at
    /// once), then the entries.
    async fn leave(&self, state: &mut State) {
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.store.nodes_key()).arg(self.node.member());
        let remove = |mut c: RedisConn| async move { zrem.query_async::<()>(&mut c).await };
        let _ = self.store.link.call(remove).await;
        let ids: Vec<ConnId> = state.written.keys().copied().collect();
        if !ids.is_empty() {
            self.write(state, ids, false).await;
        }
    }

    fn failed(&self, state: &mut State, e: &crate::broker::LinkError) {
        if !std::mem::replace(&mut state.failing, true) {
            tracing::warn!(error = %e, "presence not written to Redis; rewritten once it answers");
        }
    }

    fn recovered(&self, state: &mut State) {
        if std::mem::take(&mut state.failing) {
            tracing::info!("presence written to Redis again");
        }
    }
}
