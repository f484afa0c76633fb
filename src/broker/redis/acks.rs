//! The Redis broker's acknowledgements: thin calls of the function
//! library's `wsgateway_ack`, `wsgateway_ack_seen` and
//! `wsgateway_ack_sweep`, which keep each event's state in Redis so that
//! any node may take its acks and its deadline (`lua/wsgateway.lua`).

use std::collections::BTreeMap;

use super::RedisBroker;
use crate::auth::TenantId;
use crate::broker::BrokerError;
use crate::broker::acks::{AckOutcome, AckStep, Escalation, Seen, Unacknowledged};

impl RedisBroker {
    /// The key of a tenant's ack deadlines: it routes a call to the
    /// tenant's shard.
    fn deadlines(&self, tenant: TenantId) -> String {
        self.names.key(&format!("wsgateway:{{{tenant}}}:acks"))
    }

    pub(super) async fn ack_ids(
        &self,
        tenant: TenantId,
        ids: Vec<String>,
    ) -> Result<Vec<AckOutcome>, BrokerError> {
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg(self.names.function("wsgateway_ack"))
            .arg(1)
            .arg(self.deadlines(tenant))
            .arg(tenant)
            .arg(&ids);
        let answers = self
            .call(|mut c| {
                let fcall = fcall.clone();
                async move { fcall.query_async::<Vec<String>>(&mut c).await }
            })
            .await?;
        Ok(answers.iter().map(|a| AckOutcome::parse(a)).collect())
    }

    /// One call per tenant (its shard's), all at once.
    pub(super) async fn note_seen(&self, seen: Vec<Seen>) -> Result<(), BrokerError> {
        let mut by_tenant: BTreeMap<TenantId, Vec<Seen>> = BTreeMap::new();
        for s in seen {
            by_tenant.entry(s.tenant).or_default().push(s);
        }
        let calls = by_tenant.into_iter().map(|(tenant, seen)| {
            let mut fcall = redis::cmd("FCALL");
            fcall
                .arg(self.names.function("wsgateway_ack_seen"))
                .arg(1)
                .arg(self.deadlines(tenant))
                .arg(tenant);
            for s in &seen {
                fcall.arg(&s.event_id).arg(s.connections);
            }
            async move {
                self.call(|mut c| {
                    let fcall = fcall.clone();
                    async move { fcall.query_async::<()>(&mut c).await }
                })
                .await
            }
        });
        for answer in futures_util::future::join_all(calls).await {
            answer?;
        }
        Ok(())
    }

    /// Standalone and Sentinel: one call finds every tenant with deadlines.
    /// A cluster: the tenants the registry names (the gateway's own
    /// publications write it) and this node's, one call each.
    pub(super) async fn sweep(&self, tenants: Vec<TenantId>) -> Result<Vec<AckStep>, BrokerError> {
        let size = self.history.size;
        let ttl_ms = self.history.ttl.as_millis() as u64;
        let function = self.names.function("wsgateway_ack_sweep");
        if !self.link.connector().is_cluster() {
            let mut fcall = redis::cmd("FCALL");
            fcall.arg(&function).arg(0).arg("").arg(size).arg(ttl_ms);
            return Ok(steps(self.sweep_call(fcall).await?));
        }
        let registry = self.names.key("wsgateway:ack-tenants");
        let mut all: Vec<TenantId> = self
            .call(|mut c| {
                let registry = registry.clone();
                async move {
                    let now = crate::event::unix_ms();
                    // Those past their time first (the function does it
                    // outside a cluster).
                    let (tenants,): (Vec<TenantId>,) = redis::pipe()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&registry)
                        .arg("-inf")
                        .arg(now - 1)
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&registry)
                        .arg(now)
                        .arg("+inf")
                        .arg("BYSCORE")
                        .query_async(&mut c)
                        .await?;
                    Ok(tenants)
                }
            })
            .await?;
        all.extend(tenants);
        all.sort_unstable();
        all.dedup();
        let calls = all.into_iter().map(|tenant| {
            let mut fcall = redis::cmd("FCALL");
            fcall
                .arg(&function)
                .arg(1)
                .arg(self.deadlines(tenant))
                .arg(tenant)
                .arg(size)
                .arg(ttl_ms);
            self.sweep_call(fcall)
        });
        let mut out = Vec::new();
        for answer in futures_util::future::join_all(calls).await {
            out.extend(steps(answer?));
        }
        Ok(out)
    }

    /// Registers a cluster tenant's publication that asked for an ack
    /// (outside the tenant's slot, so not in the function's call).
    pub(super) async fn register_ack_tenants(
        &self,
        until: Vec<(TenantId, i64)>,
    ) -> Result<(), BrokerError> {
        let registry = self.names.key("wsgateway:ack-tenants");
        self.call(|mut c| {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&registry).arg("GT");
            for (tenant, until) in &until {
                zadd.arg(until).arg(tenant);
            }
            async move { zadd.query_async::<()>(&mut c).await }
        })
        .await
    }

    async fn sweep_call(&self, fcall: redis::Cmd) -> Result<Vec<Vec<String>>, BrokerError> {
        self.call(|mut c| {
            let fcall = fcall.clone();
            async move { fcall.query_async::<Vec<Vec<String>>>(&mut c).await }
        })
        .await
    }
}

/// Reads the function's steps: `{"redelivered", tenant, id}` or
/// `{"escalated", tenant, id, reason, audience, type, branch, channel}`.
fn steps(raw: Vec<Vec<String>>) -> Vec<AckStep> {
    raw.into_iter()
        .filter_map(|step| {
            let tenant = step.get(1)?.parse().ok()?;
            let event_id = step.get(2)?.clone();
            match step.first()?.as_str() {
                "redelivered" => Some(AckStep::Redelivered { tenant, event_id }),
                "escalated" => Some(AckStep::Escalated(Escalation {
                    tenant,
                    event_id,
                    reason: if step.get(3)? == "no_ack" {
                        Unacknowledged::NoAck
                    } else {
                        Unacknowledged::NoAudience
                    },
                    audience: step.get(4)?.parse().ok()?,
                    event_type: step.get(5)?.clone(),
                    branch: step.get(6)?.parse().ok()?,
                    channel: step.get(7)?.clone(),
                })),
                _ => None,
            }
        })
        .collect()
}
