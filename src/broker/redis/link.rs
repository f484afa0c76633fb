//! One Redis command connection that notices when it is dead and is
//! replaced.
//!
//! A multiplexed connection is shared by every caller. A call that times out
//! or breaks the connection discards it, so the next call connects afresh:
//! a connection on a silently dead path (no RST, no FIN) is never reused.
//! TCP keepalive and `TCP_USER_TIMEOUT` on the socket catch what the
//! kernel can see; the command deadline catches the rest. A new connection
//! goes where the [`Connector`] says (in sentinel mode: the master the
//! sentinels name, confirmed by `ROLE`; in cluster mode, the redis crate's
//! cluster connection, which routes each command to its slot's primary),
//! and is prepared (version check, function library) before any call uses
//! it. A connection to a server that
//! is no longer the master (a `READONLY` refusal, a `ROLE` that says
//! replica, or another master found meanwhile) is discarded like a dead
//! one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::connector::{Connector, EndpointError, Failure, RoleError};

/// What a call could not do, and whether it may have happened anyway.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Nothing was sent: no connection could be made.
    #[error("not sent: {0}")]
    NotSent(Unsent),
    /// Sent, but the connection broke: the command may or may not have
    /// run.
    #[error("outcome unknown: {0}")]
    Unknown(Failure),
    /// Sent, but no answer came within the timeout: the command may or
    /// may not have run.
    #[error("outcome unknown: timed out")]
    TimedOut,
    /// Redis answered with an error.
    #[error("redis refused: {0}")]
    Refused(String),
    /// The server cannot serve the gateway (too old).
    #[error(transparent)]
    Incompatible(#[from] UnsupportedRedis),
    /// The server is not (or no longer) the master: nothing was done, and
    /// the connection was discarded, so the next call finds the master.
    #[error("not the master: {0}")]
    NotMaster(String),
}

impl LinkError {
    /// Whether the connection failed for TLS: a setting or a certificate
    /// to fix, which retrying does not (logged as an error).
    pub fn is_tls(&self) -> bool {
        match self {
            LinkError::NotSent(Unsent::NoEndpoint(e)) => e.is_tls(),
            LinkError::NotSent(Unsent::Connect(f)) | LinkError::Unknown(f) => f.is_tls(),
            _ => false,
        }
    }
}

/// Why no connection was there to send on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unsent {
    /// No server to connect to (no sentinel named the master).
    #[error(transparent)]
    NoEndpoint(#[from] EndpointError),
    #[error(transparent)]
    Connect(Failure),
    /// The new connection could not be prepared (the server's refusal, or
    /// the connection's failure, in words).
    #[error("{0}")]
    Prepare(String),
    #[error("connect timed out")]
    TimedOut,
}

/// A server older than the gateway needs (`redis_version` from `INFO`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Redis {version} is not supported: wsgateway needs Redis 7.0 or later (or Valkey 7.2 or later)"
)]
pub struct UnsupportedRedis {
    pub version: String,
}

/// A command connection: to one server, or to a cluster (routed per
/// command by its keys, or to every primary for `FUNCTION LOAD` and
/// `PING`).
#[derive(Clone)]
pub enum Conn {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs on every new connection before it is shared.
pub type Prepare = Box<dyn Fn(Conn) -> BoxFuture<'static, Result<(), LinkError>> + Send + Sync>;

pub struct RedisLink {
    connector: Connector,
    timeout: Duration,
    /// The current connection; held only to copy or replace it, never
    /// across an await.
    slot: Mutex<Option<Current>>,
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

/// The shared connection, its generation, and the server it reached.
#[derive(Clone)]
struct Current {
    generation: u64,
    conn: Conn,
    addr: String,
}

impl RedisLink {
    /// No connection is made until the first call.
    pub fn new(connector: Connector, timeout: Duration, prepare: Option<Prepare>) -> RedisLink {
        RedisLink {
            connector,
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
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let current = self.connection().await?;
        let generation = current.generation;
        match tokio::time::timeout(self.timeout, op(current.conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if broken(&e) => {
                self.discard(generation);
                Err(LinkError::Unknown(self.connector.describe(&e)))
            }
            Ok(Err(e)) if e.code() == Some("READONLY") => {
                self.discard(generation);
                Err(LinkError::NotMaster(format!(
                    "{} is read-only (a replica)",
                    current.addr
                )))
            }
            Ok(Err(e)) => Err(LinkError::Refused(describe_plain(&e))),
            Err(_) => {
                self.discard(generation);
                Err(LinkError::TimedOut)
            }
        }
    }

    /// Checks the connection: a `PING`; in sentinel mode, asks the
    /// sentinels where the master is, then a `ROLE`, so that a failover is
    /// followed, and a master demoted to replica left, even when nothing is
    /// written.
    pub async fn check(&self) -> Result<(), LinkError> {
        if !self.connector.is_sentinel() {
            // (In a cluster, every primary answers.)
            let ping =
                |mut c: Conn| async move { redis::cmd("PING").query_async::<Value>(&mut c).await };
            return self.call(ping).await.map(drop);
        }
        // Where the sentinels say the master is now: a connection to
        // another address is replaced by `connection`.
        self.connector.refresh().await;
        let current = self.connection().await?;
        let Conn::One(mut conn) = current.conn.clone() else {
            return Ok(());
        };
        let checked = tokio::time::timeout(
            self.timeout,
            self.connector.check_master(&mut conn, &current.addr),
        )
        .await;
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(RoleError::NotMaster(why))) => {
                self.discard(current.generation);
                Err(LinkError::NotMaster(why))
            }
            Ok(Err(RoleError::Failed(e))) if broken(&e) => {
                self.discard(current.generation);
                Err(LinkError::Unknown(self.connector.describe(&e)))
            }
            Ok(Err(RoleError::Failed(e))) => Err(LinkError::Refused(describe_plain(&e))),
            Err(_) => {
                self.discard(current.generation);
                Err(LinkError::TimedOut)
            }
        }
    }

    /// Drops the current connection, so the next call makes a new one.
    pub fn reset(&self) {
        *self.slot.lock() = None;
    }

    /// Where this link's connections go.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    async fn connection(&self) -> Result<Current, LinkError> {
        {
            let mut slot = self.slot.lock();
            match slot.as_ref() {
                Some(current) if self.connector.is_current(&current.addr) => {
                    return Ok(current.clone());
                }
                // Another master was found meanwhile (by the subscriber, or
                // the revocation link): this one is stale.
                Some(_) => *slot = None,
                None => {}
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connect = async {
            let not_sent = |e: redis::RedisError| {
                LinkError::NotSent(Unsent::Connect(self.connector.describe(&e)))
            };
            if let Some(client) = self.connector.cluster_client(None) {
                let client = client.map_err(|f| LinkError::NotSent(Unsent::Connect(f)))?;
                let conn = Conn::Cluster(client.get_async_connection().await.map_err(not_sent)?);
                if let Some(prepare) = &self.prepare {
                    prepare(conn.clone()).await?;
                }
                let addr = self.connector.seeds().unwrap_or_default().to_owned();
                return Ok((conn, addr));
            }
            let endpoint = self
                .connector
                .endpoint()
                .await
                .map_err(|e| LinkError::NotSent(e.into()))?;
            let mut conn = endpoint
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(not_sent)?;
            match self.connector.check_master(&mut conn, &endpoint.addr).await {
                Ok(()) => {}
                Err(RoleError::NotMaster(why)) => return Err(LinkError::NotMaster(why)),
                Err(RoleError::Failed(e)) => return Err(not_sent(e)),
            }
            let conn = Conn::One(conn);
            if let Some(prepare) = &self.prepare {
                prepare(conn.clone()).await?;
            }
            Ok((conn, endpoint.addr))
        };
        let (conn, addr) = match tokio::time::timeout(self.timeout * 2, connect).await {
            Ok(result) => result?,
            Err(_) => return Err(LinkError::NotSent(Unsent::TimedOut)),
        };
        let mut slot = self.slot.lock();
        // Another caller may have connected meanwhile: share one connection.
        if let Some(current) = slot.clone()
            && self.connector.is_current(&current.addr)
        {
            return Ok(current);
        }
        let current = Current {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            conn,
            addr,
        };
        *slot = Some(current.clone());
        Ok(current)
    }

    fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock();
        if slot.as_ref().is_some_and(|c| c.generation == generation) {
            *slot = None;
        }
    }
}

/// Whether an error means the connection cannot be trusted any more.
fn broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// An error's kind and server detail (or the operating system's words for
/// an I/O error), never the URL. [`Connector::describe`] adds what a TLS
/// failure means.
pub fn describe_plain(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ if e.is_io_error() => e.to_string(),
        _ => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::connector::SentinelFailure;

    #[test]
    fn a_tls_failure_is_told_by_its_variant_and_reads_as_before() {
        let sentinels = EndpointError::NoSentinel(vec![
            SentinelFailure::TimedOut,
            SentinelFailure::Failed(Failure::Tls("certificate not trusted (X)".into())),
            SentinelFailure::UnknownMaster("mymaster".into()),
        ]);
        let e = LinkError::NotSent(sentinels.into());
        assert!(e.is_tls());
        assert_eq!(
            e.to_string(),
            "not sent: no sentinel named the master: timed out; TLS: certificate not trusted (X); does not know master \"mymaster\""
        );
        let plain = LinkError::Unknown(Failure::Other("connection reset (TLS: no)".into()));
        assert!(!plain.is_tls());
        assert!(LinkError::Unknown(Failure::Tls("x".into())).is_tls());
        assert_eq!(
            LinkError::NotSent(Unsent::TimedOut).to_string(),
            "not sent: connect timed out"
        );
    }
}
