//! One Redis command connection that notices when it is dead and is
//! replaced.
//!
//! A multiplexed connection is shared by every caller. A call that times out
//! or breaks the connection discards it, so the next call connects afresh:
//! a connection on a silently dead path (no RST, no FIN) is never reused.
//! TCP keepalive and `TCP_USER_TIMEOUT` on the socket catch what the
//! kernel can see; the command deadline catches the rest. A new connection
//! is prepared (version check, function library) before any call uses it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisResult};

/// What a call could not do, and whether it may have happened anyway.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Nothing was sent: no connection could be made.
    #[error("not sent: {0}")]
    NotSent(String),
    /// Sent, but no answer came in time or the connection broke: the
    /// command may or may not have run.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// Redis answered with an error.
    #[error("redis refused: {0}")]
    Refused(String),
    /// The server cannot serve the gateway (too old).
    #[error("{0}")]
    Incompatible(String),
}

/// Runs on every new connection before it is shared.
pub type Prepare =
    Box<dyn Fn(MultiplexedConnection) -> BoxFuture<'static, Result<(), LinkError>> + Send + Sync>;

pub struct RedisLink {
    client: redis::Client,
    timeout: Duration,
    /// The current connection and its generation; held only to copy or
    /// replace it, never across an await.
    slot: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    prepare: Option<Prepare>,
}

/// The socket settings of every Redis connection: keepalive probes after
/// 5 s of silence, every 1 s, 3 of them; and unacknowledged data abandons
/// the connection after `user_timeout`. Together: a dead path the kernel can
/// see is noticed within about 10 s, even on a connection that only listens.
pub fn tcp_settings(user_timeout: Duration) -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(user_timeout)
}

/// A client for `url` whose sockets use [`tcp_settings`]. The error never
/// contains the URL (it may hold a password).
pub fn client(url: &str) -> Result<redis::Client, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("not a Redis URL ({:?})", e.kind()))?
        .set_tcp_settings(tcp_settings(Duration::from_secs(10)));
    redis::Client::open(info).map_err(|e| format!("not a Redis URL ({:?})", e.kind()))
}

impl RedisLink {
    /// No connection is made until the first call.
    pub fn new(client: redis::Client, timeout: Duration, prepare: Option<Prepare>) -> RedisLink {
        RedisLink {
            client,
            timeout,
            slot: Mutex::new(None),
            generations: AtomicU64::new(0),
            prepare,
        }
    }

    /// Runs one command (or script) on the shared connection, within the
    /// command timeout.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, LinkError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.connection().await?;
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if broken(&e) => {
                self.discard(generation);
                Err(LinkError::Unknown(describe(&e)))
            }
            Ok(Err(e)) => Err(LinkError::Refused(describe(&e))),
            Err(_) => {
                self.discard(generation);
                Err(LinkError::Unknown("timed out".into()))
            }
        }
    }

    /// Drops the current connection, so the next call makes a new one.
    pub fn reset(&self) {
        *self.slot.lock() = None;
    }

    async fn connection(&self) -> Result<(u64, MultiplexedConnection), LinkError> {
        if let Some(current) = self.slot.lock().clone() {
            return Ok(current);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connect = async {
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| LinkError::NotSent(describe(&e)))?;
            if let Some(prepare) = &self.prepare {
                prepare(conn.clone()).await?;
            }
            Ok(conn)
        };
        let conn = match tokio::time::timeout(self.timeout * 2, connect).await {
            Ok(result) => result?,
            Err(_) => return Err(LinkError::NotSent("connect timed out".into())),
        };
        let mut slot = self.slot.lock();
        // Another caller may have connected meanwhile: share one connection.
        if let Some(current) = slot.clone() {
            return Ok(current);
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *slot = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }
}

/// Whether an error means the connection cannot be trusted any more.
fn broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// An error's kind and server detail, never the URL.
pub fn describe(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => format!("{:?}", e.kind()),
    }
}
