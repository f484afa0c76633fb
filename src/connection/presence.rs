//! An admin's `presence` (PROTOCOL.md §16): read beside the socket loop,
//! as `refresh.rs` checks a token, so that a slow Redis stalls neither the
//! connection's events nor its close requests.
//!
//! One read at a time per connection. Requests sent meanwhile wait their
//! turn, in order, up to [`MAX_WAITING`]; one more is answered at once with
//! `presence_unavailable`. The branches a request may name are the
//! admin's token's as the hub holds them when its turn comes (a refreshed
//! token counts).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tungstenite::Utf8Bytes;

use super::Context;
use crate::auth::BranchId;
use crate::hub::{ConnHandle, ConnId, Member, Outbound};
use crate::reply::{ErrorCode, Reply};

/// Requests waiting behind the one being read.
pub(super) const MAX_WAITING: usize = 8;

type Reading = Pin<Box<dyn Future<Output = Vec<Utf8Bytes>> + Send>>;

/// A connection's presence requests: nothing until its first (most
/// connections never send one), so the loop's state grows by a pointer.
#[derive(Default)]
pub(super) struct Presences(Option<Box<Queue>>);

struct Queue {
    running: Option<Reading>,
    waiting: VecDeque<Option<BranchId>>,
}

impl Presences {
    /// Whether a read is under way (the loop polls [`Presences::next`]
    /// only then).
    pub(super) fn is_running(&self) -> bool {
        self.0.as_ref().is_some_and(|q| q.running.is_some())
    }

    /// Starts answering a request, or queues it behind the one under way.
    pub(super) fn push(
        &mut self,
        ctx: &Arc<Context>,
        handle: &ConnHandle,
        branch: Option<BranchId>,
    ) {
        let queue = self.0.get_or_insert_with(|| {
            Box::new(Queue {
                running: None,
                waiting: VecDeque::new(),
            })
        });
        if queue.running.is_none() {
            queue.running = Some(Box::pin(answer(ctx.clone(), handle.id, branch)));
        } else if queue.waiting.len() < MAX_WAITING {
            queue.waiting.push_back(branch);
        } else {
            ctx.metrics.presence_requested("websocket", "busy");
            let reply = Reply::Error {
                code: ErrorCode::PresenceUnavailable,
            };
            handle.push(Outbound::reply(reply.to_text()));
        }
    }

    /// Waits for the read under way, queues its frames and starts the next
    /// one. Cancel-safe: the read lives in `self`.
    pub(super) async fn next(&mut self, ctx: &Arc<Context>, handle: &ConnHandle) {
        let Some(running) = self.0.as_mut().and_then(|q| q.running.as_mut()) else {
            return std::future::pending().await;
        };
        let frames = running.await;
        if let Some(queue) = self.0.as_mut() {
            queue.running = queue
                .waiting
                .pop_front()
                .map(|b| Box::pin(answer(ctx.clone(), handle.id, b)) as Reading);
            if queue.running.is_none() {
                // Back to a pointer's worth.
                self.0 = None;
            }
        }
        for frame in frames {
            handle.push(Outbound::reply(frame));
        }
    }
}

/// The frames that answer one request: a `presence` per branch (those of
/// the token, in its order, or the one asked for), or one error.
async fn answer(ctx: Arc<Context>, id: ConnId, branch: Option<BranchId>) -> Vec<Utf8Bytes> {
    let error = |code| vec![Reply::Error { code }.to_text()];
    let Some((tenant, _, member)) = ctx.hub.member(id) else {
        // Leaving the hub: nobody to answer.
        return Vec::new();
    };
    let branches = match member {
        Member::Staff { branch_ids, .. } => branch_ids,
        Member::Diner { branch_id, .. } => vec![branch_id],
    };
    let wanted = match branch {
        Some(b) if !branches.contains(&b) => {
            ctx.metrics
                .presence_requested("websocket", "forbidden_branch");
            return error(ErrorCode::ForbiddenBranch);
        }
        Some(b) => vec![b],
        None => branches,
    };
    match ctx.presence.list(tenant, &wanted).await {
        Ok(lists) => {
            ctx.metrics.presence_requested("websocket", "ok");
            lists
                .into_iter()
                .map(|l| Reply::Presence(l).to_text())
                .collect()
        }
        Err(e) => {
            ctx.metrics.presence_requested("websocket", "unavailable");
            tracing::warn!(error = %e, "presence unavailable");
            error(ErrorCode::PresenceUnavailable)
        }
    }
}
