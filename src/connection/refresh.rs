//! `refresh_token`: an open connection trades its token for a new one
//! without reconnecting (PROTOCOL.md §7, "`refresh_token`").
//!
//! A new token is checked as admission checks one (signature and claims,
//! the same owner, the endpoint's roles, revocation), then its waiter's
//! sectors are read for the branches it adds; only then is the
//! connection's place in the hub swapped, in one write section
//! ([`Hub::refresh_token`]), and `token_refreshed` queued.
//!
//! The checks that wait on Redis or PostgreSQL run as a future the
//! connection's loop polls beside its socket and its queue
//! ([`Refreshes`]), not awaited inline: a slow Redis (up to
//! `WSGATEWAY_REDIS_TIMEOUT_S`) or database (up to
//! `WSGATEWAY_SECTOR_QUERY_TIMEOUT_S`) then stalls neither the client's
//! events nor close requests. Nor is the work handed to a shared task as
//! `refresh_sectors` is: its answer is the connection's own.
//!
//! A connection has at most one refresh under way, and nothing waits
//! behind it: a `refresh_token` that arrives while one is being checked is
//! answered at once with `refresh_in_progress` and its token dropped. So
//! however long Redis or the database take, a connection holds one token
//! for its refreshes, not one per message the rate limit lets through, and
//! a later token never loses to an earlier one that was slower to check.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Context;
use super::messages::NewToken;
use crate::auth::{AuthError, BranchId, Endpoint, SessionId, TenantId, UserId};
use crate::hub::{ConnHandle, ConnId, Member, Outbound, RefreshRefusal, Refreshed, SectorScope};
use crate::metrics::TokenRefresh;
use crate::reply::{ErrorCode, Reply};

/// Whose connection it is, as its first token said: a new token must name
/// the same owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// Same tenant and user; branches and roles may change.
    Staff {
        tenant_id: TenantId,
        user_id: UserId,
    },
    /// Same tenant, branch, table session and table.
    Diner {
        tenant_id: TenantId,
        branch_id: BranchId,
        session_id: SessionId,
        table_id: i64,
    },
}

/// Why a new token was refused. Never carries the token's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejected {
    /// Bad signature, expired, malformed, wrong `iss`/`aud`.
    Token(AuthError),
    /// Another user, tenant, branch, session or table.
    OtherOwner,
    /// Its roles do not allow the endpoint.
    Forbidden,
    /// Its `jti` is in the revoked set.
    Revoked,
}

impl Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Token(AuthError::Missing | AuthError::Invalid) => "invalid",
            Rejected::Token(AuthError::Expired) => "expired",
            Rejected::OtherOwner => "other_owner",
            Rejected::Forbidden => "forbidden",
            Rejected::Revoked => "revoked",
        }
    }
}

type Checking = Pin<Box<dyn Future<Output = Result<Refreshed, Rejected>> + Send>>;

/// A connection's refresh: the one being checked, if any. One at most:
/// there is no queue behind it (see [`Refreshes::push`]).
#[derive(Default)]
pub(super) struct Refreshes {
    running: Option<Checking>,
}

impl Refreshes {
    /// Whether a check is under way (the loop polls [`Refreshes::next`]
    /// only then).
    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts checking a refresh; or, while another is being checked,
    /// refuses it unchecked: answered at once with `refresh_in_progress`,
    /// counted, and its token dropped here, so that an outage of Redis or
    /// the database holds one token per connection, not a growing queue.
    pub(super) fn push(
        &mut self,
        ctx: &Arc<Context>,
        handle: &ConnHandle,
        owner: Owner,
        token: NewToken,
    ) {
        if self.running.is_some() {
            drop(token);
            ctx.metrics.token_refreshed(TokenRefresh::Busy);
            // Debug: a client may send these at the rate limit for as long
            // as an outage lasts; the counter says how many.
            tracing::debug!("token refresh refused: another is being checked");
            let reply = Reply::Error {
                code: ErrorCode::RefreshInProgress,
            };
            handle.push(Outbound::reply(reply.to_text()));
            return;
        }
        let checking = check(ctx.clone(), handle.id, handle.endpoint, owner, token);
        self.running = Some(Box::pin(checking));
    }

    /// Waits for the running check and applies its outcome; the slot is
    /// free again before the answer is queued, so a refresh the client
    /// sends after reading it is checked. Cancel-safe: the check lives in
    /// `self`, not in this future, so a `select!` that picks another branch
    /// loses nothing.
    pub(super) async fn next(&mut self, ctx: &Arc<Context>, handle: &ConnHandle) {
        let Some(running) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let checked = running.await;
        self.running = None;
        apply(ctx, handle, checked);
    }
}

/// Checks a new token for connection `id`: what it would change, or why
/// not. Reads the hub (briefly), Redis and PostgreSQL; changes nothing.
async fn check(
    ctx: Arc<Context>,
    id: ConnId,
    endpoint: Endpoint,
    owner: Owner,
    token: NewToken,
) -> Result<Refreshed, Rejected> {
    let token = Some(token.as_str());
    match owner {
        Owner::Diner { .. } => check_diner(&ctx, owner, token),
        Owner::Staff { tenant_id, user_id } => {
            let new = ctx.verifier.staff(token).map_err(Rejected::Token)?;
            if (new.tenant_id, new.user_id) != (tenant_id, user_id) {
                return Err(Rejected::OtherOwner);
            }
            if !endpoint.allows(new.roles) {
                return Err(Rejected::Forbidden);
            }
            // As admission: a Redis without an answer lets the token pass.
            let jti = new.jti.as_deref();
            if super::token_revoked(&ctx, tenant_id, jti, "refreshed token").await {
                return Err(Rejected::Revoked);
            }
            let sectors = if endpoint == Endpoint::Waiter && !new.roles.sees_all_sectors() {
                waiter_sectors(&ctx, id, tenant_id, user_id, &new.branch_ids).await
            } else {
                SectorScope::All
            };
            Ok(Refreshed {
                member: Member::Staff {
                    user_id,
                    branch_ids: new.branch_ids,
                    sectors,
                },
                expires_at: new.exp,
                jti: new.jti.map(String::into_boxed_str),
            })
        }
    }
}

/// A diner's new table token: the same tenant, branch, session and table
/// as `owner`.
fn check_diner(ctx: &Context, owner: Owner, token: Option<&str>) -> Result<Refreshed, Rejected> {
    let new = ctx.verifier.table(token).map_err(Rejected::Token)?;
    let same = Owner::Diner {
        tenant_id: new.tenant_id,
        branch_id: new.branch_id,
        session_id: new.session_id,
        table_id: new.table_id,
    } == owner;
    if !same {
        return Err(Rejected::OtherOwner);
    }
    // Table tokens carry no `jti`: nothing to check for revocation.
    Ok(Refreshed {
        member: Member::Diner {
            branch_id: new.branch_id,
            session_id: new.session_id,
            table_id: new.table_id,
        },
        expires_at: new.exp,
        jti: None,
    })
}

/// The sectors of a waiter whose new token lists `branch_ids`. Only the
/// branches it adds are read: the hub keeps the sectors it knows for the
/// others (`Hub::refresh_token`).
async fn waiter_sectors(
    ctx: &Context,
    id: ConnId,
    tenant_id: TenantId,
    user_id: UserId,
    branch_ids: &[BranchId],
) -> SectorScope {
    let known: Vec<BranchId> = match ctx.hub.member(id) {
        Some((
            _,
            _,
            Member::Staff {
                branch_ids,
                sectors: SectorScope::ByBranch(_),
                ..
            },
        )) => branch_ids,
        _ => Vec::new(),
    };
    let added: Vec<BranchId> = branch_ids
        .iter()
        .copied()
        .filter(|b| !known.contains(b))
        .collect();
    // A lookup answers by branch; anything else counts as unknown.
    let read = match ctx.sectors.scope(tenant_id, user_id, &added).await {
        SectorScope::ByBranch(read) => read,
        SectorScope::All => Vec::new(),
    };
    let scope = branch_ids
        .iter()
        .map(|b| {
            let found = read.iter().find(|(r, _)| r == b);
            (*b, found.and_then(|(_, s)| s.clone()))
        })
        .collect();
    SectorScope::ByBranch(scope)
}

/// Applies a checked refresh: swaps the connection's place in the hub and
/// queues the answer (`token_refreshed`, then `sectors_updated` when a
/// waiter's reported sectors changed), or queues `token_rejected`.
fn apply(ctx: &Context, handle: &ConnHandle, checked: Result<Refreshed, Rejected>) {
    let span = tracing::Span::current();
    let rejected = |why: Rejected| {
        ctx.metrics.token_refreshed(TokenRefresh::Rejected);
        tracing::info!(reason = why.as_str(), "token refresh rejected");
        let reply = Reply::Error {
            code: ErrorCode::TokenRejected,
        };
        handle.push(Outbound::reply(reply.to_text()));
    };
    let refreshed = match checked {
        Ok(refreshed) => refreshed,
        Err(why) => return rejected(why),
    };
    let expires_at = refreshed.expires_at;
    let branches = match &refreshed.member {
        Member::Staff { branch_ids, .. } => Some(branch_ids.clone()),
        Member::Diner { .. } => None,
    };
    match ctx.hub.refresh_token(handle.id, refreshed) {
        Ok(swapped) => {
            ctx.metrics.token_refreshed(TokenRefresh::Accepted);
            if let Some(branches) = &branches {
                span.record("branches", tracing::field::debug(branches));
            }
            let (before, after) = (swapped.before.reported(), swapped.after.reported());
            if handle.endpoint == Endpoint::Waiter {
                super::record_sector_ids(&span, &swapped.after);
            }
            tracing::info!(expires_at, "token refreshed");
            handle.push(Outbound::reply(
                Reply::TokenRefreshed { expires_at }.to_text(),
            ));
            if handle.endpoint == Endpoint::Waiter && before != after {
                let reply = Reply::SectorsUpdated { sector_ids: after };
                handle.push(Outbound::reply(reply.to_text()));
            }
        }
        // Leaving the hub: nobody to answer.
        Err(RefreshRefusal::Gone) => {}
        // The checks compared the owner already; kept as a refusal.
        Err(RefreshRefusal::OtherIdentity) => rejected(Rejected::OtherOwner),
    }
}
