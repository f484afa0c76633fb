//! The hub: the index of open connections, and fan-out over it.
//!
//! Every index is reached through a tenant first (`tenant → branch → role`,
//! `tenant → (branch, session)`, `tenant → user`, which is also the
//! tenant's staff), so a lookup for one
//! tenant cannot return another's connection; each push also re-checks the
//! connection's tenant as defence in depth. The index sits behind one
//! `parking_lot::RwLock` held only for short synchronous sections: nothing
//! is awaited while it is held, so no lock ordering is needed anywhere.

pub mod audience;
mod handle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;

pub use audience::{Member, SectorScope};
pub use handle::{Broken, ConnHandle, ConnId, Outbound, Push, Signal, monotonic_ms};

use crate::auth::{BranchId, Endpoint, SectorId, SessionId, TenantId, UserId};
use crate::channel::Channel;
use crate::close::Close;
use crate::event::Event;
use crate::metrics::{Metrics, Undelivered};
use crate::reply::{Reply, ResyncReason};

type Members = HashMap<ConnId, Arc<ConnHandle>>;

/// How long past an event's second ack deadline a connection's receipt of
/// it lasts: an ack on its way when the deadline passed still finds it.
pub const RECEIPT_SLACK_MS: u64 = 5_000;

/// Connection limits enforced at registration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_total: usize,
    pub max_per_user: usize,
    /// Diner connections per table session: a leaked table token cannot
    /// take the whole node.
    pub max_per_session: usize,
}

/// Why the hub refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The gateway holds `max_total` connections (1013).
    AtCapacity,
    /// The user holds `max_per_user` staff connections (4008).
    UserLimit,
    /// The table session holds `max_per_session` diner connections (4008).
    SessionLimit,
}

/// What the hub needs to index a new connection.
pub struct Registration {
    pub tenant_id: TenantId,
    pub endpoint: Endpoint,
    pub member: Member,
    /// The token's expiry, Unix seconds; checked by [`Hub::close_expired`].
    pub expires_at: u64,
    /// The token's id, for revocation checks.
    pub jti: Option<Box<str>>,
    /// Frames the connection's queue holds before it counts as slow.
    pub queue_capacity: usize,
    /// Queued before the connection is indexed, so no event precedes it.
    pub greeting: Option<Outbound>,
}

/// What a refreshed token changes in a connection's place in the hub
/// ([`Hub::refresh_token`]). The user (staff) or the table session
/// (diners) stays: only its branches, sectors, expiry and token id move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    pub member: Member,
    /// The new token's expiry, Unix seconds.
    pub expires_at: u64,
    pub jti: Option<Box<str>>,
}

/// A waiter's sectors before and after [`Hub::refresh_token`] (both
/// [`SectorScope::All`] for the other endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swapped {
    pub before: SectorScope,
    pub after: SectorScope,
}

/// Why [`Hub::refresh_token`] changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRefusal {
    /// The connection has left the hub.
    Gone,
    /// The new membership is of another user or table session.
    OtherIdentity,
}

/// A waiter-endpoint connection whose sectors are looked up (not MANAGER
/// or ADMIN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterRef {
    pub id: ConnId,
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub branch_ids: Vec<BranchId>,
}

/// Result of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub queued: usize,
    pub overflowed: usize,
    /// Recipients whose connection had already ended.
    pub gone: usize,
    /// Candidates skipped because they already got this event.
    pub repeated: usize,
    /// Of an event asking for an ack: connections queued it for the first
    /// time (not on another channel, not before its redelivery).
    pub receipts: u32,
}

/// Open connections by endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub by_endpoint: [usize; 4],
}

/// How many keys each index holds (`wsgateway_hub_index_entries`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexSizes {
    pub tenants: usize,
    pub branches: usize,
    pub sessions: usize,
    pub users: usize,
}

#[derive(Default)]
struct Branch {
    /// Every waiter-endpoint connection of the branch.
    waiters: Members,
    /// Waiter connections that hear every sector (MANAGER/ADMIN, or unknown
    /// assignments).
    waiters_open: Members,
    /// Waiter connections by assigned sector.
    waiters_by_sector: HashMap<SectorId, Members>,
    kitchen: Members,
    admins: Members,
}

/// How many scopes of each kind a tenant's index holds: when it changes, a
/// scope gained its first connection or lost its last.
type Shape = (usize, usize, usize);

impl Branch {
    fn is_empty(&self) -> bool {
        self.waiters.is_empty() && self.kitchen.is_empty() && self.admins.is_empty()
    }
}

#[derive(Default)]
struct Tenant {
    branches: HashMap<BranchId, Branch>,
    sessions: HashMap<(BranchId, SessionId), Members>,
    users: HashMap<UserId, Members>,
}

fn shape(tenant: Option<&Tenant>) -> Shape {
    tenant.map_or((0, 0, 0), |t| {
        (t.branches.len(), t.sessions.len(), t.users.len())
    })
}

struct Entry {
    handle: Arc<ConnHandle>,
    member: Member,
    expires_at: u64,
    jti: Option<Box<str>>,
    /// When it was registered, Unix ms (presence).
    connected_at: u64,
}

/// Told when a connection enters or leaves the hub, or its branches or
/// sectors change ([`Hub::watch`]): presence mirrors the node's
/// connections. Called with the index unlocked; it must not block.
pub trait Watcher: Send + Sync {
    fn changed(&self, id: ConnId);
}

/// One open connection as presence lists it in one branch, copied out of
/// the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub id: ConnId,
    pub endpoint: Endpoint,
    /// Staff only.
    pub user_id: Option<UserId>,
    /// Diners only.
    pub session_id: Option<SessionId>,
    /// Diners only.
    pub table_id: Option<i64>,
    /// A waiter's sectors in this branch; `None` when not filtered (or
    /// unknown), and for the other endpoints.
    pub sector_ids: Option<Vec<SectorId>>,
    /// Unix ms.
    pub connected_at: u64,
}

#[derive(Default)]
struct Index {
    conns: HashMap<ConnId, Entry>,
    counts: Counts,
    tenants: HashMap<TenantId, Tenant>,
}

pub struct Hub {
    index: RwLock<Index>,
    limits: Limits,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// Signalled when the index's scopes change (the Redis subscriber
    /// follows them).
    changes: crate::broker::ScopeChanges,
    /// Presence's mirror, in Redis mode ([`Hub::watch`]).
    watcher: OnceLock<Arc<dyn Watcher>>,
}

/// A connection's place in the hub; dropping it unregisters the connection.
pub struct Registered {
    hub: Arc<Hub>,
    pub handle: Arc<ConnHandle>,
}

impl Registered {
    /// Takes the connection out of the hub and detaches its handle; returns
    /// how many event frames were still queued (never to be written). The
    /// caller counts them; a second call returns 0.
    pub fn release(&self) -> usize {
        self.hub.unregister(self.handle.id);
        self.handle.detach()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let unsent = self.release();
        self.hub
            .metrics
            .undelivered(Undelivered::ConnectionClosed, unsent as u64);
    }
}

impl Hub {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Hub {
        Hub {
            index: RwLock::new(Index::default()),
            limits,
            next_id: AtomicU64::new(1),
            metrics,
            changes: crate::broker::ScopeChanges::default(),
            watcher: OnceLock::new(),
        }
    }

    /// Tells `watcher` of every change of the index from now on (once: a
    /// second watcher is ignored).
    pub fn watch(&self, watcher: Arc<dyn Watcher>) {
        let _ = self.watcher.set(watcher);
    }

    fn changed(&self, id: ConnId) {
        if let Some(w) = self.watcher.get() {
            w.changed(id);
        }
    }

    /// Indexes a connection, unless a limit forbids it. The total limit is
    /// checked before the per-user or per-session one (PROTOCOL.md §2).
    pub fn register(self: &Arc<Self>, reg: Registration) -> Result<Registered, Refusal> {
        let connected_at = crate::event::unix_ms().max(0) as u64;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(ConnHandle::new(
            id,
            reg.tenant_id,
            reg.endpoint,
            reg.queue_capacity,
        ));
        if let Some(greeting) = reg.greeting {
            handle.push(greeting);
        }
        let mut index = self.index.write();
        if index.counts.total >= self.limits.max_total {
            return Err(Refusal::AtCapacity);
        }
        let before = shape(index.tenants.get(&reg.tenant_id));
        let tenant = index.tenants.entry(reg.tenant_id).or_default();
        match &reg.member {
            Member::Staff {
                user_id,
                branch_ids,
                sectors,
            } => {
                let mine = tenant.users.entry(*user_id).or_default();
                if mine.len() >= self.limits.max_per_user {
                    if mine.is_empty() {
                        tenant.users.remove(user_id);
                    }
                    return Err(Refusal::UserLimit);
                }
                mine.insert(id, handle.clone());
                tenant.index_branches(&handle, branch_ids, sectors);
            }
            Member::Diner {
                branch_id,
                session_id,
                ..
            } => {
                let key = (*branch_id, *session_id);
                let mine = tenant.sessions.entry(key).or_default();
                if mine.len() >= self.limits.max_per_session {
                    if mine.is_empty() {
                        tenant.sessions.remove(&key);
                    }
                    return Err(Refusal::SessionLimit);
                }
                mine.insert(id, handle.clone());
            }
        }
        if shape(Some(tenant)) != before {
            self.changes.changed();
        }
        index.counts.total += 1;
        index.counts.by_endpoint[reg.endpoint.index()] += 1;
        index.conns.insert(
            id,
            Entry {
                handle: handle.clone(),
                member: reg.member,
                expires_at: reg.expires_at,
                jti: reg.jti,
                connected_at,
            },
        );
        drop(index);
        self.changed(id);
        self.metrics.connections_total.inc();
        self.metrics
            .connections_by_endpoint
            .with_label_values(&[reg.endpoint.as_str()])
            .inc();
        Ok(Registered {
            hub: self.clone(),
            handle,
        })
    }

    fn unregister(&self, id: ConnId) {
        let mut index = self.index.write();
        let Some(entry) = index.conns.remove(&id) else {
            return;
        };
        let endpoint = entry.handle.endpoint;
        index.counts.total -= 1;
        index.counts.by_endpoint[endpoint.index()] -= 1;
        let tenant_id = entry.handle.tenant_id;
        if let Some(tenant) = index.tenants.get_mut(&tenant_id) {
            let before = shape(Some(tenant));
            match &entry.member {
                Member::Staff {
                    user_id,
                    branch_ids,
                    ..
                } => {
                    remove_from(&mut tenant.users, user_id, id);
                    tenant.unindex_branches(id, branch_ids);
                }
                Member::Diner {
                    branch_id,
                    session_id,
                    ..
                } => remove_from(&mut tenant.sessions, &(*branch_id, *session_id), id),
            }
            if shape(Some(tenant)) != before {
                self.changes.changed();
            }
            if tenant.branches.is_empty() && tenant.sessions.is_empty() && tenant.users.is_empty() {
                index.tenants.remove(&tenant_id);
            }
        }
        drop(index);
        self.changed(id);
        self.metrics.connections_total.dec();
        self.metrics
            .connections_by_endpoint
            .with_label_values(&[endpoint.as_str()])
            .dec();
    }

    /// Queues the event's frame to every connection of its audience, except
    /// those that already got it on one of the `prior` channels. Handles
    /// whose socket takes the frame now are added to `to_flush`: the caller
    /// writes them ([`ConnHandle::flush`]) once its batch is queued, with
    /// the index no longer locked.
    pub fn deliver(
        &self,
        event: &Event,
        prior: &[Channel],
        to_flush: &mut Vec<Arc<ConnHandle>>,
    ) -> Fanout {
        let index = self.index.read();
        let mut fanout = Fanout::default();
        let Some(tenant) = index.tenants.get(&event.fields.tenant_id) else {
            return fanout;
        };
        let outbound = Outbound::event(event.frame.clone(), event.fields.ts_ms.unwrap_or(0));
        // An event asking for an ack is noted on each recipient, until
        // well past its second deadline.
        let ack = match (&event.fields.event_id, event.fields.ack_within_s) {
            (Some(id), Some(within_s)) => Some((
                id.as_str(),
                handle::monotonic_ms() + 2_000 * u64::from(within_s) + RECEIPT_SLACK_MS,
            )),
            _ => None,
        };
        // Whether a recipient answers for the event here (it asks for an
        // ack, and the recipient is not only overseeing this channel); a
        // new receipt is noted on it.
        let answers = |handle: &ConnHandle| {
            ack.is_some_and(|(event_id, until)| {
                audience::acks_from(handle.endpoint, event.channel)
                    && handle.note_receipt(event_id, until)
            })
        };
        let mut send = |members: &Members| {
            for (id, handle) in members {
                if !prior.is_empty() && index.got_already(*id, prior, event) {
                    fanout.repeated += 1;
                    // Got on a channel it only oversees (an admin, the
                    // kitchen's), it answers on this one (the admins').
                    fanout.receipts += u32::from(answers(handle));
                    continue;
                }
                if handle.tenant_id != event.fields.tenant_id {
                    // Unreachable by construction; refuse rather than leak.
                    tracing::error!(conn = id, "tenant mismatch in the hub index; not delivered");
                    continue;
                }
                // Noted before the frame can reach the client, so that its
                // ack always finds it (a frame not queued leaves a receipt on
                // a connection that is closing, uncounted).
                let new_receipt = answers(handle);
                let pushed = handle.enqueue(outbound.clone());
                match pushed {
                    Push::Queued => fanout.queued += 1,
                    Push::ToFlush => {
                        fanout.queued += 1;
                        to_flush.push(handle.clone());
                    }
                    Push::Overflowed => fanout.overflowed += 1,
                    Push::Gone => fanout.gone += 1,
                }
                if pushed.queued() {
                    fanout.receipts += u32::from(new_receipt);
                }
            }
        };
        let branch = |b: BranchId| tenant.branches.get(&b);
        match event.channel {
            Channel::BranchWaiters(b) => {
                if let Some(br) = branch(b) {
                    match event.fields.sector_id {
                        None => send(&br.waiters),
                        Some(s) => send_sector(br, s, &mut send),
                    }
                    send(&br.admins);
                }
            }
            Channel::SectorWaiters(b, s) => {
                if let Some(br) = branch(b) {
                    send_sector(br, s, &mut send);
                    send(&br.admins);
                }
            }
            Channel::BranchKitchen(b) => {
                if let Some(br) = branch(b) {
                    send(&br.kitchen);
                    send(&br.admins);
                }
            }
            Channel::BranchAdmin(b) => {
                if let Some(br) = branch(b) {
                    send(&br.admins);
                }
            }
            Channel::Session(s) => {
                if let Some(diners) = tenant.sessions.get(&(event.fields.branch_id, s)) {
                    send(diners);
                }
            }
            Channel::User(u) => {
                if let Some(mine) = tenant.users.get(&u) {
                    send(mine);
                }
            }
            // Each staff connection is in exactly one user's set.
            Channel::TenantStaff => tenant.users.values().for_each(&mut send),
        }
        fanout
    }

    /// Asks every connection silent for longer than `timeout_ms` to close
    /// with 1001; returns how many.
    pub fn close_silent(&self, timeout_ms: u64) -> usize {
        let now = monotonic_ms();
        self.close_where(Close::Heartbeat, |e| {
            e.handle.silent_for_ms(now) > timeout_ms
        })
    }

    /// Asks every connection whose token is no longer valid (per `valid`)
    /// to close with 4001; returns how many.
    pub fn close_expired(&self, valid: impl Fn(u64) -> bool) -> usize {
        self.close_where(Close::Unauthorized, |e| !valid(e.expires_at))
    }

    /// The tenant and token id of the open connections whose token has one.
    pub fn token_ids(&self) -> Vec<(ConnId, TenantId, Box<str>)> {
        let index = self.index.read();
        index
            .conns
            .iter()
            .filter_map(|(id, e)| {
                let jti = e.jti.clone()?;
                Some((*id, e.handle.tenant_id, jti))
            })
            .collect()
    }

    /// The ids of the open connections, in no particular order (a drain
    /// closes them in this order).
    pub fn ids(&self) -> Vec<ConnId> {
        self.index.read().conns.keys().copied().collect()
    }

    /// Asks every connection to close, for `why` (shutdown).
    pub fn close_all(&self, why: Close) -> usize {
        self.close_where(why, |_| true)
    }

    /// Asks the given connections to close, for `why`.
    pub fn close_ids(&self, ids: &[ConnId], why: Close) {
        let index = self.index.read();
        for id in ids {
            if let Some(entry) = index.conns.get(id) {
                entry.handle.close(why);
            }
        }
    }

    fn close_where(&self, why: Close, pick: impl Fn(&Entry) -> bool) -> usize {
        let index = self.index.read();
        let mut n = 0;
        for entry in index.conns.values().filter(|e| pick(e)) {
            entry.handle.close(why);
            n += 1;
        }
        n
    }

    /// The sector-filtered waiter connections of a branch (of one user, or
    /// all).
    pub fn filtered_waiters(
        &self,
        tenant: TenantId,
        branch: BranchId,
        user: Option<UserId>,
    ) -> Vec<WaiterRef> {
        let index = self.index.read();
        let Some(br) = index
            .tenants
            .get(&tenant)
            .and_then(|t| t.branches.get(&branch))
        else {
            return Vec::new();
        };
        br.waiters
            .keys()
            .filter_map(|id| index.waiter_ref(*id))
            .filter(|w| user.is_none_or(|u| u == w.user_id))
            .collect()
    }

    /// The connection, if it is a sector-filtered waiter.
    pub fn filtered_waiter(&self, id: ConnId) -> Option<WaiterRef> {
        self.index.read().waiter_ref(id)
    }

    /// Filtered waiters whose sectors are unknown in some branch.
    pub fn waiters_with_unknown_sectors(&self) -> Vec<WaiterRef> {
        let index = self.index.read();
        index
            .conns
            .iter()
            .filter(|(_, e)| match &e.member {
                Member::Staff {
                    sectors: SectorScope::ByBranch(branches),
                    ..
                } => branches.iter().any(|(_, s)| s.is_none()),
                _ => false,
            })
            .filter_map(|(id, _)| index.waiter_ref(*id))
            .collect()
    }

    /// Re-indexes a waiter under new sectors; returns whether they changed.
    pub fn set_sectors(&self, id: ConnId, scope: SectorScope) -> bool {
        let mut guard = self.index.write();
        let index = &mut *guard;
        let Some(entry) = index.conns.get_mut(&id) else {
            return false;
        };
        let Member::Staff {
            branch_ids,
            sectors,
            ..
        } = &mut entry.member
        else {
            return false;
        };
        if *sectors == scope || *sectors == SectorScope::All {
            return false;
        }
        // Read for other branches than the connection has now (a token
        // refresh changed them meanwhile): stale, the refresh read its own.
        if let SectorScope::ByBranch(read) = &scope
            && (read.len() != branch_ids.len() || !read.iter().all(|(b, _)| branch_ids.contains(b)))
        {
            return false;
        }
        *sectors = scope;
        if let Some(tenant) = index.tenants.get_mut(&entry.handle.tenant_id) {
            for b in branch_ids.iter() {
                if let Some(branch) = tenant.branches.get_mut(b) {
                    unindex_in_branch(branch, id);
                    index_in_branch(branch, &entry.handle, entry.handle.endpoint, *b, sectors);
                }
            }
        }
        drop(guard);
        self.changed(id);
        true
    }

    /// Swaps a connection's membership, expiry and token id for those of its
    /// refreshed token, in one write section: the branches it leaves stop
    /// getting its events and those it joins start, and the expiry and
    /// revocation passes see the new token from then on. A staff
    /// connection keeps its user, a diner its table session. A waiter keeps
    /// the sectors the hub holds for the branches it stays in (they may be
    /// newer than the refresh's reading, and were not read again); the new
    /// membership's sectors count for the branches it adds.
    pub fn refresh_token(&self, id: ConnId, mut new: Refreshed) -> Result<Swapped, RefreshRefusal> {
        let mut guard = self.index.write();
        let index = &mut *guard;
        let entry = index.conns.get_mut(&id).ok_or(RefreshRefusal::Gone)?;
        let same_owner = match (&entry.member, &new.member) {
            (Member::Staff { user_id: a, .. }, Member::Staff { user_id: b, .. }) => a == b,
            (
                Member::Diner {
                    branch_id: a,
                    session_id: s,
                    ..
                },
                Member::Diner {
                    branch_id: b,
                    session_id: t,
                    ..
                },
            ) => a == b && s == t,
            _ => false,
        };
        if !same_owner {
            return Err(RefreshRefusal::OtherIdentity);
        }
        if let (
            Member::Staff {
                sectors: SectorScope::ByBranch(kept),
                ..
            },
            Member::Staff {
                sectors: SectorScope::ByBranch(fresh),
                ..
            },
        ) = (&entry.member, &mut new.member)
        {
            for (b, sectors) in fresh.iter_mut() {
                if let Some((_, known)) = kept.iter().find(|(k, _)| k == b) {
                    sectors.clone_from(known);
                }
            }
        }
        let handle = entry.handle.clone();
        let old = std::mem::replace(&mut entry.member, new.member);
        entry.expires_at = new.expires_at;
        entry.jti = new.jti;
        if let (
            Member::Staff {
                branch_ids: old_branches,
                ..
            },
            Member::Staff {
                branch_ids,
                sectors,
                ..
            },
        ) = (&old, &entry.member)
            && let Some(tenant) = index.tenants.get_mut(&handle.tenant_id)
        {
            tenant.unindex_branches(id, old_branches);
            tenant.index_branches(&handle, branch_ids, sectors);
            if old_branches != branch_ids {
                self.changes.changed();
            }
        }
        let sectors = |m: &Member| match m {
            Member::Staff { sectors, .. } => sectors.clone(),
            Member::Diner { .. } => SectorScope::All,
        };
        let swapped = Swapped {
            before: sectors(&old),
            after: sectors(&entry.member),
        };
        drop(guard);
        self.changed(id);
        Ok(swapped)
    }

    /// Who a connection is: its tenant, endpoint and membership.
    pub fn member(&self, id: ConnId) -> Option<(TenantId, Endpoint, Member)> {
        let index = self.index.read();
        let entry = index.conns.get(&id)?;
        Some((
            entry.handle.tenant_id,
            entry.handle.endpoint,
            entry.member.clone(),
        ))
    }

    pub fn handle(&self, id: ConnId) -> Option<Arc<ConnHandle>> {
        self.index.read().conns.get(&id).map(|e| e.handle.clone())
    }

    /// The open connections of a tenant's branch, as presence lists them
    /// (a staff connection of several branches is in each), in no
    /// particular order.
    pub fn present(&self, tenant: TenantId, branch: BranchId) -> Vec<Present> {
        let index = self.index.read();
        let Some(t) = index.tenants.get(&tenant) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(br) = t.branches.get(&branch) {
            for id in br
                .waiters
                .keys()
                .chain(br.kitchen.keys())
                .chain(br.admins.keys())
            {
                if let Some(p) = index.present_in(*id, branch) {
                    out.push(p);
                }
            }
        }
        for ((b, _), diners) in &t.sessions {
            if *b == branch {
                out.extend(diners.keys().filter_map(|id| index.present_in(*id, branch)));
            }
        }
        out
    }

    /// One connection as presence lists it in each of its branches, with
    /// its tenant; `None` once it has left the hub.
    pub fn present_everywhere(&self, id: ConnId) -> Option<(TenantId, Vec<(BranchId, Present)>)> {
        let index = self.index.read();
        let entry = index.conns.get(&id)?;
        let branches: &[BranchId] = match &entry.member {
            Member::Staff { branch_ids, .. } => branch_ids,
            Member::Diner { branch_id, .. } => std::slice::from_ref(branch_id),
        };
        let listed = branches
            .iter()
            .filter_map(|b| Some((*b, index.present_in(id, *b)?)))
            .collect();
        Some((entry.handle.tenant_id, listed))
    }

    pub fn index_sizes(&self) -> IndexSizes {
        let index = self.index.read();
        index.tenants.values().fold(
            IndexSizes {
                tenants: index.tenants.len(),
                ..IndexSizes::default()
            },
            |acc, t| IndexSizes {
                branches: acc.branches + t.branches.len(),
                sessions: acc.sessions + t.sessions.len(),
                users: acc.users + t.users.len(),
                ..acc
            },
        )
    }

    /// The tenants with open connections here.
    pub fn tenants(&self) -> Vec<TenantId> {
        self.index.read().tenants.keys().copied().collect()
    }

    pub fn counts(&self) -> Counts {
        self.index.read().counts
    }

    /// The history scopes of the open connections, each once: what a node
    /// must catch up on after a gap in its broker subscription.
    pub fn scopes(&self) -> Vec<crate::broker::Scope> {
        use crate::broker::Scope;
        let index = self.index.read();
        let mut scopes = Vec::new();
        for (tenant_id, tenant) in &index.tenants {
            scopes.extend(
                tenant
                    .branches
                    .keys()
                    .map(|b| Scope::Branch(*tenant_id, *b)),
            );
            scopes.extend(
                tenant
                    .sessions
                    .keys()
                    .map(|(_, s)| Scope::Session(*tenant_id, *s)),
            );
            scopes.extend(tenant.users.keys().map(|u| Scope::User(*tenant_id, *u)));
            if !tenant.users.is_empty() {
                scopes.push(Scope::TenantStaff(*tenant_id));
            }
        }
        scopes.sort_unstable();
        scopes.dedup();
        scopes
    }

    /// Queues `frame` to every connection with a scope in `scopes` (every
    /// connection, when `None`); returns how many got it.
    pub fn notify_scopes(
        &self,
        scopes: Option<&[crate::broker::Scope]>,
        frame: &Outbound,
    ) -> usize {
        let index = self.index.read();
        let mut notified = 0;
        for entry in index.conns.values() {
            let tenant = entry.handle.tenant_id;
            let affected = scopes.is_none_or(|wanted| {
                entry
                    .member
                    .scopes(tenant)
                    .iter()
                    .any(|s| wanted.binary_search(s).is_ok())
            });
            if affected && entry.handle.push(frame.clone()).queued() {
                notified += 1;
            }
        }
        notified
    }
}

impl Index {
    /// Connection `id` as presence lists it in `branch`.
    fn present_in(&self, id: ConnId, branch: BranchId) -> Option<Present> {
        let entry = self.conns.get(&id)?;
        let endpoint = entry.handle.endpoint;
        let mut p = Present {
            id,
            endpoint,
            user_id: None,
            session_id: None,
            table_id: None,
            sector_ids: None,
            connected_at: entry.connected_at,
        };
        match &entry.member {
            Member::Staff {
                user_id, sectors, ..
            } => {
                p.user_id = Some(*user_id);
                if endpoint == Endpoint::Waiter {
                    p.sector_ids = sectors.in_branch(branch).map(<[SectorId]>::to_vec);
                }
            }
            Member::Diner {
                session_id,
                table_id,
                ..
            } => {
                p.session_id = Some(*session_id);
                p.table_id = Some(*table_id);
            }
        }
        Some(p)
    }

    fn waiter_ref(&self, id: ConnId) -> Option<WaiterRef> {
        let entry = self.conns.get(&id)?;
        match &entry.member {
            Member::Staff {
                user_id,
                branch_ids,
                sectors: SectorScope::ByBranch(_),
            } if entry.handle.endpoint == Endpoint::Waiter => Some(WaiterRef {
                id,
                tenant_id: entry.handle.tenant_id,
                user_id: *user_id,
                branch_ids: branch_ids.clone(),
            }),
            _ => None,
        }
    }

    /// Whether connection `id` was in the audience of `event` on any of the
    /// `prior` channels.
    fn got_already(&self, id: ConnId, prior: &[Channel], event: &Event) -> bool {
        self.conns.get(&id).is_some_and(|e| {
            prior.iter().any(|&c| {
                audience::receives(
                    e.handle.tenant_id,
                    e.handle.endpoint,
                    &e.member,
                    c,
                    &event.fields,
                )
            })
        })
    }
}

fn send_sector(br: &Branch, s: SectorId, send: &mut impl FnMut(&Members)) {
    send(&br.waiters_open);
    if let Some(assigned) = br.waiters_by_sector.get(&s) {
        send(assigned);
    }
}

impl Tenant {
    /// Indexes a staff connection in each of its branches.
    fn index_branches(
        &mut self,
        handle: &Arc<ConnHandle>,
        branch_ids: &[BranchId],
        sectors: &SectorScope,
    ) {
        for b in branch_ids {
            let branch = self.branches.entry(*b).or_default();
            index_in_branch(branch, handle, handle.endpoint, *b, sectors);
        }
    }

    /// Takes a staff connection out of each of its branches, and drops a
    /// branch left empty.
    fn unindex_branches(&mut self, id: ConnId, branch_ids: &[BranchId]) {
        for b in branch_ids {
            if let Some(branch) = self.branches.get_mut(b) {
                unindex_in_branch(branch, id);
                if branch.is_empty() {
                    self.branches.remove(b);
                }
            }
        }
    }
}

fn index_in_branch(
    branch: &mut Branch,
    handle: &Arc<ConnHandle>,
    endpoint: Endpoint,
    b: BranchId,
    sectors: &SectorScope,
) {
    let id = handle.id;
    match endpoint {
        Endpoint::Waiter => {
            branch.waiters.insert(id, handle.clone());
            match sectors.in_branch(b) {
                None => {
                    branch.waiters_open.insert(id, handle.clone());
                }
                Some(assigned) => {
                    for s in assigned {
                        branch
                            .waiters_by_sector
                            .entry(*s)
                            .or_default()
                            .insert(id, handle.clone());
                    }
                }
            }
        }
        Endpoint::Kitchen => {
            branch.kitchen.insert(id, handle.clone());
        }
        Endpoint::Admin => {
            branch.admins.insert(id, handle.clone());
        }
        Endpoint::Diner => {}
    }
}

fn unindex_in_branch(branch: &mut Branch, id: ConnId) {
    branch.waiters.remove(&id);
    branch.waiters_open.remove(&id);
    branch.waiters_by_sector.retain(|_, m| {
        m.remove(&id);
        !m.is_empty()
    });
    branch.kitchen.remove(&id);
    branch.admins.remove(&id);
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Members>, key: &K, id: ConnId) {
    if let Some(members) = map.get_mut(key) {
        members.remove(&id);
        if members.is_empty() {
            map.remove(key);
        }
    }
}

/// The frame that tells a client events were lost in a gap the gateway
/// could not fill (PROTOCOL.md: `resync`): reload state from the backend.
pub fn resync_frame(reason: ResyncReason) -> Outbound {
    Outbound::reply(Reply::Resync { reason }.to_text())
}

impl crate::broker::Listeners for Hub {
    fn scopes(&self) -> Vec<crate::broker::Scope> {
        Hub::scopes(self)
    }

    fn changes(&self) -> &crate::broker::ScopeChanges {
        &self.changes
    }

    fn events_lost(&self, scopes: Option<&[crate::broker::Scope]>, reason: ResyncReason) -> usize {
        let n = self.notify_scopes(scopes, &resync_frame(reason));
        self.metrics.resync_notices.inc_by(n as u64);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub of ten places, none of them limited per user or session.
    fn small_hub() -> Arc<Hub> {
        let limits = Limits {
            max_total: 10,
            max_per_user: 10,
            max_per_session: 10,
        };
        Arc::new(Hub::new(limits, Arc::new(Metrics::new())))
    }

    #[test]
    fn prior_channels_exclude_those_already_served() {
        let hub = small_hub();
        let staff = |sectors| Member::Staff {
            user_id: 1,
            branch_ids: vec![5],
            sectors,
        };
        let a = hub
            .register(Registration {
                tenant_id: 1,
                endpoint: Endpoint::Admin,
                member: staff(SectorScope::All),
                expires_at: 0,
                jti: None,
                queue_capacity: 10,
                greeting: None,
            })
            .unwrap();
        let w = hub
            .register(Registration {
                tenant_id: 1,
                endpoint: Endpoint::Waiter,
                member: staff(SectorScope::All),
                expires_at: 0,
                jti: None,
                queue_capacity: 10,
                greeting: None,
            })
            .unwrap();
        let text = r#"{"type":"X","tenant_id":1,"branch_id":5}"#;
        let ev = Event::parse(
            Channel::BranchAdmin(5),
            bytes::Bytes::from_static(text.as_bytes()),
        )
        .unwrap();
        let fanout = hub.deliver(&ev, &[Channel::BranchWaiters(5)], &mut Vec::new());
        assert_eq!(
            fanout,
            Fanout {
                queued: 0,
                overflowed: 0,
                gone: 0,
                repeated: 1,
                receipts: 0,
            }
        );
        assert!(a.handle.pop().is_none() && w.handle.pop().is_none());
        assert_eq!(hub.close_expired(|exp| exp > 0), 2);
    }

    #[test]
    fn a_refresh_swaps_branches_expiry_and_jti_and_keeps_known_sectors() {
        let hub = small_hub();
        let waiter = |branch_ids: Vec<BranchId>, sectors| Member::Staff {
            user_id: 1,
            branch_ids,
            sectors,
        };
        let w = hub
            .register(Registration {
                tenant_id: 1,
                endpoint: Endpoint::Waiter,
                member: waiter(vec![5], SectorScope::ByBranch(vec![(5, Some(vec![10]))])),
                expires_at: 100,
                jti: Some("old".into()),
                queue_capacity: 10,
                greeting: None,
            })
            .unwrap();
        let id = w.handle.id;
        let other_user = Refreshed {
            member: Member::Staff {
                user_id: 2,
                branch_ids: vec![5],
                sectors: SectorScope::All,
            },
            expires_at: 200,
            jti: None,
        };
        assert_eq!(
            hub.refresh_token(id, other_user),
            Err(RefreshRefusal::OtherIdentity)
        );
        assert_eq!(hub.token_ids()[0].2.as_ref(), "old");
        // Branch 5 was not read again (None): the hub keeps its [10].
        let new = Refreshed {
            member: waiter(
                vec![5, 6],
                SectorScope::ByBranch(vec![(5, None), (6, Some(vec![20]))]),
            ),
            expires_at: 200,
            jti: Some("new".into()),
        };
        let swapped = hub.refresh_token(id, new).unwrap();
        assert_eq!(swapped.before.reported(), Some(vec![10]));
        assert_eq!(swapped.after.reported(), Some(vec![10, 20]));
        assert_eq!(hub.token_ids()[0].2.as_ref(), "new");
        assert_eq!(hub.close_expired(|exp| exp > 100), 0);
        assert_eq!(hub.filtered_waiters(1, 6, None).len(), 1);
        // A sector read for the old branches only is stale: ignored.
        let stale = SectorScope::ByBranch(vec![(5, Some(vec![11]))]);
        assert!(!hub.set_sectors(id, stale));
        let leave = Refreshed {
            member: waiter(vec![6], SectorScope::ByBranch(vec![(6, None)])),
            expires_at: 300,
            jti: None,
        };
        hub.refresh_token(id, leave).unwrap();
        assert!(hub.filtered_waiters(1, 5, None).is_empty());
        assert_eq!(hub.index_sizes().branches, 1);
        assert!(hub.token_ids().is_empty());
        drop(w);
        assert_eq!(
            hub.refresh_token(
                id,
                Refreshed {
                    member: waiter(vec![6], SectorScope::All),
                    expires_at: 1,
                    jti: None
                }
            ),
            Err(RefreshRefusal::Gone)
        );
    }
}
