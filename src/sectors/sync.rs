//! Keeps the hub's sector index in step with the assignments.
//!
//! One task, fed by a bounded queue, so that neither the dispatcher nor a
//! connection ever waits on the database: it handles `refresh_sectors`,
//! `SECTOR_ASSIGNMENT_CHANGED`, and the return of a database that was down
//! (waiters whose sectors were unknown are looked up again). Each change
//! re-indexes the waiter's connection and pushes `sectors_updated` to it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SectorAssignments;
use crate::auth::{BranchId, TenantId, UserId};
use crate::hub::{ConnId, Hub, Outbound, WaiterRef};

/// Lookups run at once; the pool bounds them anyway.
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

/// The sending side, cheap to clone; never blocks.
#[derive(Clone)]
pub struct SectorSync {
    tx: mpsc::Sender<SectorCommand>,
}

impl SectorSync {
    pub fn channel(capacity: usize) -> (SectorSync, mpsc::Receiver<SectorCommand>) {
        let (tx, rx) = mpsc::channel(capacity);
        (SectorSync { tx }, rx)
    }

    /// Queues a command; when the queue is full it is dropped and logged.
    /// The waiter's sectors are then re-read at its next `refresh_sectors`,
    /// the next change event for its branch, or its next connection.
    pub fn send(&self, command: SectorCommand) {
        if let Err(e) = self.tx.try_send(command) {
            tracing::warn!(error = %e, "sector command dropped");
        }
    }
}

/// Runs until `shutdown`: commands as they come, and every `retry` a check
/// for waiters whose sectors are unknown.
pub async fn run(
    mut commands: mpsc::Receiver<SectorCommand>,
    hub: Arc<Hub>,
    sectors: Arc<SectorAssignments>,
    retry: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(retry);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let work: Vec<(WaiterRef, bool)> = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(command) = commands.recv() => match command {
                SectorCommand::Changed { tenant, branch, waiter } => {
                    sectors.invalidate(tenant, branch, waiter).await;
                    hub.filtered_waiters(tenant, branch, waiter).into_iter().map(|w| (w, false)).collect()
                }
                SectorCommand::Refresh(id) => match hub.filtered_waiter(id) {
                    Some(w) => {
                        for b in &w.branch_ids {
                            sectors.invalidate(w.tenant_id, *b, Some(w.user_id)).await;
                        }
                        vec![(w, true)]
                    }
                    // Not filtered (MANAGER/ADMIN): its sectors are all of them.
                    None => {
                        reply(&hub, id, None);
                        Vec::new()
                    }
                },
            },
            _ = every.tick() => {
                if !sectors.is_enabled() || (sectors.status() == "degraded" && !sectors.probe().await) {
                    continue;
                }
                hub.waiters_with_unknown_sectors().into_iter().map(|w| (w, false)).collect()
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
        let text = json!({"type": "sectors_updated", "sector_ids": sectors}).to_string();
        handle.push(Outbound::reply(Utf8Bytes::from(text)));
    }
}
