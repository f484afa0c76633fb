//! Token revocation: a Redis set of revoked `jti`s
//! (`WSGATEWAY_REVOKED_JTI_KEY`), checked at connect and at every
//! re-validation pass.
//!
//! When Redis cannot answer, tokens are accepted (fail open) and the failure
//! is logged and counted: losing Redis must not lock every waiter out, and
//! expiry still bounds a token's life.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How many `jti`s one SMISMEMBER asks about.
const CHUNK: usize = 1000;

pub struct Revocations {
    redis: ConnectionManager,
    key: String,
    timeout: Duration,
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
        let client =
            redis::Client::open(url).map_err(|e| format!("not a Redis URL ({:?})", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("{:?}", e.kind()))?;
        Ok(Revocations {
            redis,
            key: key.to_owned(),
            timeout,
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
            let mut conn = self.redis.clone();
            let mut cmd = redis::cmd("SMISMEMBER");
            cmd.arg(&self.key).arg(chunk);
            let query = cmd.query_async::<Vec<bool>>(&mut conn);
            match tokio::time::timeout(self.timeout, query).await {
                Ok(Ok(found)) => answers.extend(found),
                Ok(Err(e)) => return Err(RevocationError::Redis(format!("{:?}", e.kind()))),
                Err(_) => return Err(RevocationError::Timeout),
            }
        }
        Ok(answers)
    }
}
