//! The node's side of acknowledgements (PROTOCOL.md §15,
//! "Acknowledgements"): one task that tells the broker who received an
//! event asking for an ack (the dispatcher's and resumes' receipts) and
//! which of them acked it (connections' `ack` messages), and that takes the
//! past deadlines: the one redelivery, then the escalation on the branch's
//! admin channel. The state lives in the broker (in Redis, shared by every
//! node), so any node may take any step, and each step is taken once.
//!
//! Connections and the dispatcher hand work over through a bounded queue
//! and never wait: when it is full, what does not fit is counted
//! (`wsgateway_acks_total{outcome="failed"}`) and logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::TenantId;
use crate::broker::Broker;
use crate::broker::acks::{AckOutcome, AckStep, Seen};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// How often the deadlines are looked at: an escalation comes at most
/// this late.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// Work waiting for the task at most.
const QUEUE: usize = 8192;

/// How long the task gathers work after the first item: the acks of one
/// event's recipients, sent a moment apart, go to the broker together
/// (one call, each id once) instead of waking it once each.
const GATHER: Duration = Duration::from_millis(2);

/// The events this node learned are acknowledged, remembered at most: their
/// repeated acks are counted here without asking the broker again.
const SETTLED: usize = 16_384;

enum Work {
    Seen(Seen),
    Acked { tenant: TenantId, ids: Vec<String> },
}

/// The handle connections and the dispatcher hold: sends never wait.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::Sender<Work>,
    metrics: Arc<Metrics>,
}

/// The task's end of the queue.
pub struct AckQueue(mpsc::Receiver<Work>);

impl Acks {
    pub fn new(metrics: Arc<Metrics>) -> (Acks, AckQueue) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Acks { tx, metrics }, AckQueue(rx))
    }

    /// `connections` more connections of this node got the event.
    pub fn seen(&self, tenant: TenantId, event_id: &str, connections: u32) {
        let work = Work::Seen(Seen {
            tenant,
            event_id: event_id.to_owned(),
            connections,
        });
        if self.tx.try_send(work).is_err() {
            tracing::warn!("acknowledgement queue full: an event's audience is undercounted");
        }
    }

    /// A connection that received these events acked them.
    pub fn acked(&self, tenant: TenantId, ids: Vec<String>) {
        let n = ids.len() as u64;
        if self.tx.try_send(Work::Acked { tenant, ids }).is_err() {
            self.metrics.acks.with_label_values(&["failed"]).inc_by(n);
            tracing::warn!(acks = n, "acknowledgement queue full: acks dropped");
        }
    }

    /// Acks for events the connection never received.
    pub fn ignored(&self, n: usize) {
        self.metrics
            .acks
            .with_label_values(&["ignored"])
            .inc_by(n as u64);
    }
}

/// Runs until `shutdown`.
pub async fn run(
    broker: Arc<dyn Broker>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    AckQueue(mut rx): AckQueue,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    let mut settled = Settled::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => sweep(&*broker, &hub, &metrics).await,
            n = rx.recv_many(&mut batch, QUEUE) => {
                if n == 0 {
                    return;
                }
                tokio::time::sleep(GATHER).await;
                while let Ok(work) = rx.try_recv() {
                    batch.push(work);
                }
                apply(&*broker, &metrics, &mut settled, std::mem::take(&mut batch)).await;
            }
        }
    }
}

/// The events this node learned are acknowledged, oldest first out.
/// Keyed by tenant, so that a lookup borrows the id.
#[derive(Default)]
struct Settled {
    ids: HashMap<TenantId, std::collections::HashSet<String>>,
    order: std::collections::VecDeque<(TenantId, String)>,
}

impl Settled {
    fn contains(&self, tenant: TenantId, id: &str) -> bool {
        self.ids.get(&tenant).is_some_and(|ids| ids.contains(id))
    }

    fn insert(&mut self, tenant: TenantId, id: String) {
        if self.ids.entry(tenant).or_default().insert(id.clone()) {
            self.order.push_back((tenant, id));
        }
        while self.order.len() > SETTLED {
            let Some((tenant, old)) = self.order.pop_front() else {
                break;
            };
            if let Some(ids) = self.ids.get_mut(&tenant) {
                ids.remove(&old);
                if ids.is_empty() {
                    self.ids.remove(&tenant);
                }
            }
        }
    }
}

/// Tells the broker a batch: receipts (summed per event), then acks, one
/// call per tenant.
async fn apply(broker: &dyn Broker, metrics: &Metrics, settled: &mut Settled, batch: Vec<Work>) {
    let mut seen: HashMap<(TenantId, String), u32> = HashMap::new();
    let mut acked: HashMap<TenantId, Vec<String>> = HashMap::new();
    for work in batch {
        match work {
            Work::Seen(s) => *seen.entry((s.tenant, s.event_id)).or_default() += s.connections,
            Work::Acked { tenant, ids } => acked.entry(tenant).or_default().extend(ids),
        }
    }
    if !seen.is_empty() {
        let seen = seen
            .into_iter()
            .map(|((tenant, event_id), connections)| Seen {
                tenant,
                event_id,
                connections,
            })
            .collect();
        if let Err(e) = broker.seen(seen).await {
            tracing::warn!(error = %e, "could not count an event's audience");
        }
    }
    let count = |outcome: AckOutcome, n: u64| {
        metrics
            .acks
            .with_label_values(&[outcome.as_str()])
            .inc_by(n)
    };
    for (tenant, ids) in acked {
        // Each id once, and not those known acknowledged: the rest of an
        // event's recipients' acks are repeats, counted here.
        let mut asked: Vec<String> = Vec::new();
        let mut repeats: HashMap<String, u64> = HashMap::new();
        for id in ids {
            if settled.contains(tenant, &id) {
                count(AckOutcome::Repeated, 1);
            } else if let Some(n) = repeats.get_mut(&id) {
                *n += 1;
            } else {
                repeats.insert(id.clone(), 0);
                asked.push(id);
            }
        }
        if asked.is_empty() {
            continue;
        }
        let n = asked.len() as u64;
        match broker.ack(tenant, asked.clone()).await {
            Ok(outcomes) => {
                for (id, outcome) in asked.into_iter().zip(outcomes) {
                    count(outcome, 1);
                    let again = repeats.get(&id).copied().unwrap_or(0);
                    if outcome == AckOutcome::Late {
                        count(AckOutcome::Late, again);
                    } else {
                        count(AckOutcome::Repeated, again);
                        settled.insert(tenant, id);
                    }
                }
            }
            Err(e) => {
                let all = n + repeats.values().sum::<u64>();
                metrics.acks.with_label_values(&["failed"]).inc_by(all);
                tracing::warn!(error = %e, acks = all, "could not record acks");
            }
        }
    }
}

async fn sweep(broker: &dyn Broker, hub: &Hub, metrics: &Metrics) {
    let tenants = if broker.sweeps_per_tenant() {
        hub.tenants()
    } else {
        Vec::new()
    };
    let steps = match broker.sweep_acks(tenants).await {
        Ok(steps) => steps,
        Err(e) => {
            tracing::debug!(error = %e, "ack deadlines not swept");
            return;
        }
    };
    for step in steps {
        match step {
            AckStep::Redelivered { tenant, event_id } => {
                metrics.events_redelivered.inc();
                tracing::info!(tenant, %event_id, "event unacknowledged in time: redelivered");
            }
            AckStep::Escalated(e) => {
                metrics
                    .events_unacknowledged
                    .with_label_values(&[e.reason.as_str()])
                    .inc();
                tracing::warn!(
                    tenant = e.tenant,
                    branch = e.branch,
                    event_id = %e.event_id,
                    event_type = %e.event_type,
                    channel = %e.channel,
                    reason = e.reason.as_str(),
                    audience = e.audience,
                    "event unacknowledged: escalated to the branch's admins"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_is_per_tenant_and_forgets_the_oldest_first() {
        let mut settled = Settled::default();
        settled.insert(1, "a".into());
        settled.insert(1, "a".into());
        assert!(settled.contains(1, "a"));
        assert!(!settled.contains(2, "a"));
        for i in 0..SETTLED {
            settled.insert(2, i.to_string());
        }
        assert!(!settled.contains(1, "a"), "the oldest is out");
        assert!(settled.contains(2, "0") && settled.contains(2, &(SETTLED - 1).to_string()));
        assert_eq!(settled.order.len(), SETTLED);
        assert!(
            !settled.ids.contains_key(&1),
            "an emptied tenant is dropped"
        );
    }
}
