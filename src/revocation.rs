//! Token revocation: a Redis set of revoked tokens
//! (`WSGATEWAY_REVOKED_JTI_KEY`), checked at connect and at every
//! re-validation pass.
//!
//! A member is `{tenant_id}:{jti}`: a `jti` is the issuer's and may repeat
//! across tenants, so revoking one tenant's token must not revoke another's.
//!
//! When Redis cannot answer, tokens are accepted (fail open) and the failure
//! is logged and counted: losing Redis must not lock every waiter out, and
//! expiry still bounds a token's life.

use std::time::Duration;

use crate::auth::TenantId;
use crate::broker::{LinkError, RedisConnector, RedisLink};

/// How many `jti`s one SMISMEMBER asks about.
const CHUNK: usize = 1000;

pub struct Revocations {
    /// Its own connection, replaced when found dead like the broker's.
    redis: RedisLink,
    key: String,
}

/// Why a revocation check gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("timed out")]
    Timeout,
}

impl Revocations {
    /// Connects lazily: the gateway starts without Redis. `connector` is
    /// the broker's (the same server, or the same master).
    pub fn new(connector: RedisConnector, key: &str, timeout: Duration) -> Revocations {
        Revocations {
            redis: RedisLink::new(connector, timeout, None),
            key: key.to_owned(),
        }
    }

    /// Whether the token `jti` of `tenant` is in the revoked set.
    pub async fn is_revoked(&self, tenant: TenantId, jti: &str) -> Result<bool, RevocationError> {
        Ok(self.revoked_among(&[(tenant, jti)]).await?[0])
    }

    /// For each (tenant, `jti`), whether it is revoked.
    pub async fn revoked_among(
        &self,
        tokens: &[(TenantId, &str)],
    ) -> Result<Vec<bool>, RevocationError> {
        let mut answers = Vec::with_capacity(tokens.len());
        for chunk in tokens.chunks(CHUNK) {
            let members: Vec<String> = chunk.iter().map(|&(t, jti)| member(t, jti)).collect();
            let mut cmd = redis::cmd("SMISMEMBER");
            cmd.arg(&self.key).arg(members);
            let query = |mut c: crate::broker::RedisConn| async move {
                cmd.query_async::<Vec<bool>>(&mut c).await
            };
            match self.redis.call(query).await {
                Ok(found) => answers.extend(found),
                Err(LinkError::TimedOut) => {
                    return Err(RevocationError::Timeout);
                }
                Err(e) => return Err(RevocationError::Redis(e.to_string())),
            }
        }
        Ok(answers)
    }
}

/// The set member that revokes token `jti` of `tenant`.
pub fn member(tenant: TenantId, jti: &str) -> String {
    format!("{tenant}:{jti}")
}
