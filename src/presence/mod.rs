//! Presence: who is connected to a tenant's branch, on every node
//! (PROTOCOL.md §16), for `GET /api/presence` and an admin's `presence`.
//!
//! A node answers its own connections from its hub, as they are at that
//! moment: one closed is gone at once. Embedded (no `REDIS_URL`), that is
//! all. With Redis, each node also mirrors its connections into Redis
//! ([`mirror`]): a hash per tenant's branch,
//! `wsgateway:{<tenant>}:presence:branch:<b>` (the tenant as hash tag, so
//! that one reader's keys share a slot in a cluster), field
//! `<node>/<run>/<conn>`, value the connection's JSON as listed; and a
//! heartbeat, the sorted set `wsgateway:presence:nodes`, member
//! `<node>/<run>`, score its expiry (Unix ms), renewed every third of
//! `WSGATEWAY_PRESENCE_TTL_S`. A reader adds the entries of the other
//! node-runs whose heartbeat has not expired: a dead node's connections
//! leave the answer within the TTL, and are deleted from Redis by readers
//! a TTL later. The run (random, per process) keeps a restarted node from
//! counting its previous life's entries as its own.
//!
//! The hashes are read first, then the heartbeats: a node writes entries
//! only once its heartbeat is in, so an entry read is never taken for a
//! dead node's merely because its heartbeat was read too early.

pub mod mirror;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{BranchId, TenantId};
use crate::broker::{LinkError, RedisConn, RedisConnector, RedisLink, RedisNames};
use crate::event::unix_ms;
use crate::hub::{Hub, Present};
use crate::metrics::Metrics;
use crate::reply::{PresenceConn, PresenceList};

pub use mirror::Mirror;

/// Why presence could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Redis gave no answer (its kind, never the URL).
    #[error("redis: {0}")]
    Unavailable(#[from] LinkError),
}

/// A node's name and this process's run of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    /// `WSGATEWAY_NODE_NAME`, or `<hostname>:<port>`.
    pub name: Arc<str>,
    /// Random, per process: 16 hex digits.
    pub run: Arc<str>,
}

impl NodeId {
    pub fn new(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            run: format!("{:016x}", rand::random::<u64>()).into(),
        }
    }

    /// The heartbeat's member, and the start of this run's fields.
    fn member(&self) -> String {
        format!("{}/{}", self.name, self.run)
    }
}

/// `WSGATEWAY_NODE_NAME`'s default: `<hostname>:<port>`.
pub fn default_node_name(port: u16) -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let host = from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{port}")
}

/// Where presence is read: the hub, and Redis when configured.
pub struct Presence {
    hub: Arc<Hub>,
    node: NodeId,
    store: Option<Arc<Store>>,
}

/// Presence's Redis: its own command connection (as revocation's), the
/// names, and the TTL.
pub(crate) struct Store {
    link: RedisLink,
    names: RedisNames,
    ttl_ms: u64,
    /// In a cluster, one pipeline holds one tenant's keys only.
    cluster: bool,
}

impl Store {
    fn branch_key(&self, tenant: TenantId, branch: BranchId) -> String {
        self.names
            .key(&format!("wsgateway:{{{tenant}}}:presence:branch:{branch}"))
    }

    fn nodes_key(&self) -> String {
        self.names.key("wsgateway:presence:nodes")
    }
}

impl Presence {
    /// One node: the hub is the whole answer.
    pub fn embedded(hub: Arc<Hub>, node: NodeId) -> Presence {
        Presence {
            hub,
            node,
            store: None,
        }
    }

    /// With Redis: the reader, and the mirror task that writes this node's
    /// connections (to run, and to [`Hub::watch`] with).
    pub fn redis(
        hub: Arc<Hub>,
        node: NodeId,
        connector: RedisConnector,
        names: RedisNames,
        timeout: Duration,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> (Presence, Mirror) {
        let store = Arc::new(Store {
            cluster: connector.is_cluster(),
            link: RedisLink::new(connector, timeout, None),
            names,
            ttl_ms: ttl.as_millis().max(1) as u64,
        });
        let mirror = Mirror::new(hub.clone(), node.clone(), store.clone(), metrics);
        let presence = Presence {
            hub,
            node,
            store: Some(store),
        };
        (presence, mirror)
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The open connections of each of `branches` of `tenant`, every node's,
    /// by `connected_at` then `id`.
    pub async fn list(
        &self,
        tenant: TenantId,
        branches: &[BranchId],
    ) -> Result<Vec<PresenceList>, PresenceError> {
        let remote = match &self.store {
            Some(store) => read_others(store, &self.node, tenant, branches).await?,
            None => vec![Vec::new(); branches.len()],
        };
        // The hub last: as fresh as can be.
        let lists = branches
            .iter()
            .zip(remote)
            .map(|(b, mut connections)| {
                connections.extend(
                    self.hub
                        .present(tenant, *b)
                        .into_iter()
                        .map(|p| listed(&self.node, p)),
                );
                connections.sort_by(|a, b| (a.connected_at, &a.id).cmp(&(b.connected_at, &b.id)));
                PresenceList {
                    tenant_id: tenant,
                    branch_id: *b,
                    connections,
                }
            })
            .collect();
        Ok(lists)
    }
}

/// A connection of this node as presence lists it.
fn listed(node: &NodeId, p: Present) -> PresenceConn {
    PresenceConn {
        id: format!("{}/{}", node.name, p.id),
        endpoint: p.endpoint.as_str().to_owned(),
        user_id: p.user_id,
        session_id: p.session_id,
        table_id: p.table_id,
        sector_ids: p.sector_ids,
        connected_at: p.connected_at,
        node: node.name.to_string(),
    }
}

/// The other live node-runs' entries of each branch, from Redis; entries
/// of runs dead for over a TTL are deleted on the side.
async fn read_others(
    store: &Arc<Store>,
    me: &NodeId,
    tenant: TenantId,
    branches: &[BranchId],
) -> Result<Vec<Vec<PresenceConn>>, PresenceError> {
    let keys: Vec<String> = branches
        .iter()
        .map(|b| store.branch_key(tenant, *b))
        .collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // One tenant's keys: one slot, one pipeline.
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("HGETALL").arg(key);
    }
    let read = |mut c: RedisConn| async move {
        pipe.query_async::<Vec<std::collections::HashMap<String, String>>>(&mut c)
            .await
    };
    let hashes = store.link.call(read).await?;
    let mut lists = vec![Vec::new(); keys.len()];
    if hashes.iter().all(|h| h.is_empty()) {
        return Ok(lists);
    }
    let now = unix_ms().max(0) as u64;
    let ttl = store.ttl_ms;
    let mut heartbeats = redis::cmd("ZRANGEBYSCORE");
    heartbeats
        .arg(store.nodes_key())
        .arg(now.saturating_sub(ttl))
        .arg("+inf")
        .arg("WITHSCORES");
    let beats = |mut c: RedisConn| async move {
        heartbeats.query_async::<Vec<(String, f64)>>(&mut c).await
    };
    let runs = store.link.call(beats).await?;
    let mine = format!("{}/", me.member());
    let mut dead: Vec<(String, Vec<String>)> = Vec::new();
    for ((key, hash), list) in keys.into_iter().zip(hashes).zip(lists.iter_mut()) {
        let mut gone = Vec::new();
        for (field, value) in hash {
            if field.starts_with(&mine) {
                // This node's own: the hub says.
                continue;
            }
            let run = field.rsplit_once('/').map_or("", |(run, _)| run);
            match runs.iter().find(|(r, _)| r == run) {
                Some((_, expiry)) if *expiry >= now as f64 => {
                    match serde_json::from_str::<PresenceConn>(&value) {
                        Ok(entry) => list.push(entry),
                        Err(e) => tracing::debug!(error = %e, "presence entry unreadable; skipped"),
                    }
                }
                // Expired less than a TTL ago: skipped, not deleted yet
                // (its node may be about to write it again).
                Some(_) => {}
                None => gone.push(field),
            }
        }
        if !gone.is_empty() {
            dead.push((key, gone));
        }
    }
    if !dead.is_empty() {
        tokio::spawn(delete_dead(store.clone(), dead));
    }
    Ok(lists)
}

/// Deletes the entries of dead runs (best effort: the next reader tries
/// again).
async fn delete_dead(store: Arc<Store>, dead: Vec<(String, Vec<String>)>) {
    let mut pipe = redis::pipe();
    for (key, fields) in &dead {
        pipe.cmd("HDEL").arg(key).arg(fields).ignore();
    }
    let delete = |mut c: RedisConn| async move { pipe.query_async::<()>(&mut c).await };
    if let Err(e) = store.link.call(delete).await {
        tracing::debug!(error = %e, "dead presence entries not deleted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Endpoint;
    use crate::hub::{Limits, Member, Registration, SectorScope};

    #[test]
    fn the_local_hub_lists_a_branch_of_its_tenant_in_order() {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits {
            max_total: 10,
            max_per_user: 10,
            max_per_session: 10,
        };
        let hub = Arc::new(Hub::new(limits, metrics));
        let reg = |tenant, endpoint, member| Registration {
            tenant_id: tenant,
            endpoint,
            member,
            expires_at: 0,
            jti: None,
            queue_capacity: 4,
            greeting: None,
        };
        let staff = |user, branches: Vec<BranchId>, sectors| Member::Staff {
            user_id: user,
            branch_ids: branches,
            sectors,
        };
        let waiter = staff(
            1,
            vec![5, 6],
            SectorScope::ByBranch(vec![(5, Some(vec![10, 11])), (6, None)]),
        );
        let _w = hub.register(reg(1, Endpoint::Waiter, waiter)).unwrap();
        let _k = hub
            .register(reg(
                1,
                Endpoint::Kitchen,
                staff(2, vec![5], SectorScope::All),
            ))
            .unwrap();
        let diner = Member::Diner {
            branch_id: 5,
            session_id: 77,
            table_id: 12,
        };
        let d = hub
            .register(reg(1, Endpoint::Diner, diner.clone()))
            .unwrap();
        let _other_tenant = hub.register(reg(2, Endpoint::Diner, diner)).unwrap();
        let presence = Presence::embedded(hub.clone(), NodeId::new("n1"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let lists = rt.block_on(presence.list(1, &[5, 6, 7])).unwrap();
        let five = &lists[0].connections;
        assert_eq!(five.len(), 3, "{five:?}");
        let ids: Vec<&str> = five.iter().map(|c| c.id.as_str()).collect();
        let mut sorted = five.clone();
        sorted.sort_by(|a, b| (a.connected_at, &a.id).cmp(&(b.connected_at, &b.id)));
        assert_eq!(&sorted, five);
        assert!(ids.iter().all(|id| id.starts_with("n1/")));
        let w = five.iter().find(|c| c.endpoint == "waiter").unwrap();
        assert_eq!(
            (w.user_id, w.sector_ids.clone()),
            (Some(1), Some(vec![10, 11]))
        );
        let diner = five.iter().find(|c| c.endpoint == "diner").unwrap();
        assert_eq!(
            (diner.user_id, diner.session_id, diner.table_id),
            (None, Some(77), Some(12))
        );
        let six = &lists[1].connections;
        assert_eq!(six.len(), 1);
        assert_eq!(six[0].sector_ids, None);
        assert!(lists[2].connections.is_empty());
        drop(d);
        let lists = rt.block_on(presence.list(1, &[5])).unwrap();
        assert_eq!(lists[0].connections.len(), 2);
        assert_eq!(lists[0].branch_id, 5);
        assert_eq!(lists[0].tenant_id, 1);
    }

    #[test]
    fn a_run_is_random_and_the_default_name_ends_with_the_port() {
        assert_ne!(NodeId::new("a").run, NodeId::new("a").run);
        assert_eq!(NodeId::new("a").run.len(), 16);
        assert!(default_node_name(8001).ends_with(":8001"));
    }
}
