//! Token revocation: a Redis set of revoked `jti`s
//! (`WSGATEWAY_REVOKED_JTI_KEY`), checked at connect and at every
//! re-validation pass.
//!
//! When Redis cannot answer, tokens are accepted (fail open) and the failure
//! is logged and counted: losing Redis must not lock every waiter out, and
//! expiry still bounds a token's life.

use std::time::Duration;

use crate::broker::{LinkError, RedisLink};

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
    /// Connects lazily: the gateway starts without Redis.
    pub fn new(url: &str, key: &str, timeout: Duration) -> Result<Revocations, String> {
        let client = crate::broker::redis_client(url)?;
        Ok(Revocations {
            redis: RedisLink::new(client, timeout, None),
            key: key.to_owned(),
        })
    }

    /// Whether `jti` is in the revoked set.
    pub async fn is_revoked(&self, jti: &str) -> Result<bool, RevocationError> {
        Ok(self.revoked_among(&[jti]).await?[0])
    }

    /// For each `jti`, whether it is revoked.
    pub async fn revoked_among(&self, jtis: &[&str]) -> Result<Vec<bool>, RevocationError> {
        let mut answers = Vec::with_capacity(jtis.len());
        for chunk in jtis.chunks(CHUNK) {
            let mut cmd = redis::cmd("SMISMEMBER");
            cmd.arg(&self.key).arg(chunk);
            let query = |mut c: redis::aio::MultiplexedConnection| async move {
                cmd.query_async::<Vec<bool>>(&mut c).await
            };
            match self.redis.call(query).await {
                Ok(found) => answers.extend(found),
                Err(LinkError::Unknown(why)) if why == "timed out" => {
                    return Err(RevocationError::Timeout);
                }
                Err(e) => return Err(RevocationError::Redis(e.to_string())),
            }
        }
        Ok(answers)
    }
}
