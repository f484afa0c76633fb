//! Keeps the hub's sector index in step with the assignments.
//!
//! One task, so that neither the dispatcher nor a connection ever waits on
//! the database: it handles `refresh_sectors`, `SECTOR_ASSIGNMENT_CHANGED`,
//! and the return of a database that was down (waiters whose sectors were
//! unknown are looked up again). Each change re-indexes the waiter's
//! connection and pushes `sectors_updated` to it.
//!
//! Changes and refreshes do not share a queue: changes come from the
//! backend, few and each for many waiters, in a bounded queue; refreshes
//! come from clients (up to the rate limit each), so they are coalesced into
//! a set of connections — at most one pending per connection, however many
//! a client sends — and taken a batch at a time, after any waiting change.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{SectorAssignments, SectorStatus};
use crate::auth::{BranchId, TenantId, UserId};
use crate::hub::{ConnId, Hub, Outbound, WaiterRef};
use crate::metrics::Metrics;
use crate::reply::Reply;

/// Lookups run at once; the pool bounds them anyway. Also the most
/// refreshes taken per batch, so that a change waits for one batch at most.
const CONCURRENCY: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectorCommand {
    /// `SECTOR_ASSIGNMENT_CHANGED`: one waiter of a branch, or all of them.
    Changed {
        tenant: TenantId,
        branch: BranchId,
        waiter: Option<UserId>,
    },
    /// A waiter's `refresh_sectors`.
    Refresh(ConnId),
}

/// A change, as queued.
#[derive(Debug)]
struct Change {
    tenant: TenantId,
    branch: BranchId,
    waiter: Option<UserId>,
}

/// The connections that asked for a refresh not yet started, in order.
/// Bounded by the number of connections: one entry each at most.
#[derive(Default)]
struct PendingRefreshes {
    /// A `parking_lot` mutex: held only to insert or take, never across an await.
    ids: Mutex<(VecDeque<ConnId>, HashSet<ConnId>)>,
    /// Wakes the task when the set stops being empty.
    ready: Notify,
}

impl PendingRefreshes {
    /// False when `id` already had one pending (the new one is coalesced).
    fn insert(&self, id: ConnId) -> bool {
        let added = {
            let mut ids = self.ids.lock();
            let added = ids.1.insert(id);
            if added {
                ids.0.push_back(id);
            }
            added
        };
        if added {
            self.ready.notify_one();
        }
        added
    }

    /// The oldest `n` pending refreshes at most, once there is one.
    async fn take(&self, n: usize) -> Vec<ConnId> {
        loop {
            // Registered before looking, so that an insert in between still wakes us.
            let ready = self.ready.notified();
            {
                let mut ids = self.ids.lock();
                if !ids.0.is_empty() {
                    let at = ids.0.len().min(n);
                    let batch: Vec<ConnId> = ids.0.drain(..at).collect();
                    for id in &batch {
                        ids.1.remove(id);
                    }
                    return batch;
                }
            }
            ready.await;
        }
    }
}

/// The sending side, cheap to clone; never blocks.
#[derive(Clone)]
pub struct SectorSync {
    changes: mpsc::Sender<Change>,
    refreshes: Arc<PendingRefreshes>,
    metrics: Arc<Metrics>,
}

/// The receiving side, for [`run`].
pub struct SectorQueue {
    changes: mpsc::Receiver<Change>,
    refreshes: Arc<PendingRefreshes>,
}

impl SectorSync {
    /// `capacity` bounds the queue of changes (refreshes are bounded by
    /// the connections).
    pub fn channel(capacity: usize, metrics: Arc<Metrics>) -> (SectorSync, SectorQueue) {
        let (tx, rx) = mpsc::channel(capacity);
        let refreshes = Arc::new(PendingRefreshes::default());
        (
            SectorSync {
                changes: tx,
                refreshes: refreshes.clone(),
                metrics,
            },
            SectorQueue {
                changes: rx,
                refreshes,
            },
        )
    }

    /// Queues a command. A refresh of a connection that has one pending
    /// joins it (`wsgateway_sector_refreshes_coalesced_total`): both are
    /// answered by the one read, which starts after the last of them. A
    /// change that finds its queue full is dropped, logged and counted
    /// (`wsgateway_sector_changes_dropped_total`); the waiters' sectors are
    /// then re-read at their next `refresh_sectors`, the next change event
    /// for their branch, or their next connection.
    pub fn send(&self, command: SectorCommand) {
        match command {
            SectorCommand::Refresh(id) => {
                if !self.refreshes.insert(id) {
                    self.metrics.sector_refreshes_coalesced.inc();
                }
            }
            SectorCommand::Changed {
                tenant,
                branch,
                waiter,
            } => {
                let change = Change {
                    tenant,
                    branch,
                    waiter,
                };
                if let Err(e) = self.changes.try_send(change) {
                    self.metrics.sector_changes_dropped.inc();
                    tracing::warn!(error = %e, "sector assignment change dropped");
                }
            }
        }
    }
}

/// Runs until `shutdown`: commands as they come, and every `retry` a check
/// for waiters whose sectors are unknown.
pub async fn run(
    queue: SectorQueue,
    hub: Arc<Hub>,
    sectors: Arc<SectorAssignments>,
    retry: Duration,
    shutdown: CancellationToken,
) {
    let SectorQueue {
        mut changes,
        refreshes,
    } = queue;
    let mut every = tokio::time::interval(retry);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased: a change, then the retry, before any refresh.
        let work: Vec<(WaiterRef, bool)> = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(Change { tenant, branch, waiter }) = changes.recv() => {
                sectors.invalidate(tenant, branch, waiter).await;
                hub.filtered_waiters(tenant, branch, waiter).into_iter().map(|w| (w, false)).collect()
            }
            _ = every.tick() => {
                if !sectors.is_enabled() || (sectors.status() == SectorStatus::Degraded && !sectors.probe().await) {
                    continue;
                }
                hub.waiters_with_unknown_sectors().into_iter().map(|w| (w, false)).collect()
            }
            ids = refreshes.take(CONCURRENCY) => {
                let mut work = Vec::with_capacity(ids.len());
                for id in ids {
                    match hub.filtered_waiter(id) {
                        Some(w) => {
                            for b in &w.branch_ids {
                                sectors.invalidate(w.tenant_id, *b, Some(w.user_id)).await;
                            }
                            work.push((w, true));
                        }
                        // Not filtered (MANAGER/ADMIN): its sectors are all of them.
                        None => reply(&hub, id, None),
                    }
                }
                work
            }
        };
        futures_util::stream::iter(work)
            .for_each_concurrent(CONCURRENCY, |(waiter, always_reply)| {
                let (hub, sectors) = (&hub, &sectors);
                async move {
                    let scope = sectors
                        .scope(waiter.tenant_id, waiter.user_id, &waiter.branch_ids)
                        .await;
                    let changed = hub.set_sectors(waiter.id, scope.clone());
                    if changed || always_reply {
                        reply(hub, waiter.id, scope.reported());
                    }
                }
            })
            .await;
    }
}

fn reply(hub: &Hub, id: ConnId, sectors: Option<Vec<i64>>) {
    if let Some(handle) = hub.handle(id) {
        let reply = Reply::SectorsUpdated {
            sector_ids: sectors,
        };
        handle.push(Outbound::reply(reply.to_text()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refreshes_coalesce_per_connection_and_come_in_order() {
        let pending = PendingRefreshes::default();
        assert!(pending.insert(3));
        assert!(pending.insert(1));
        assert!(!pending.insert(3), "one pending per connection");
        assert!(pending.insert(2));
        assert_eq!(pending.take(2).await, vec![3, 1]);
        // Taken refreshes may be asked for again.
        assert!(pending.insert(3));
        assert_eq!(pending.take(16).await, vec![2, 3]);
        let waiting = pending.take(16);
        tokio::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        pending.insert(7);
        assert_eq!(waiting.await, vec![7]);
    }
}
