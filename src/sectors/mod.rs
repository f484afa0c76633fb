//! Waiters' sector assignments from PostgreSQL (PROTOCOL.md §13).
//!
//! `(tenant, user, branch) → sectors`, read with the configured query through
//! a connection pool, cached with a TTL, and bounded by a timeout. Anything
//! that goes wrong — no database, an error, a slow query — means "unknown",
//! and an unknown waiter hears every sector of its branch (the seed's
//! fallback). Failures are never cached, so the answer recovers by itself
//! when the database does. Lookups are awaited only by the connection being
//! admitted and by the [`sync`] task, never by the dispatcher.
//!
//! The connection comes from [`crate::postgres`]; the health kept here says
//! why the last call failed, and a change of it is logged once.

pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::future::join_all;
use parking_lot::Mutex;

use crate::auth::{BranchId, SectorId, StaffIdentity, TenantId, UserId};
use crate::hub::SectorScope;
use crate::metrics::{Metrics, SectorQuery};
use crate::postgres::{tls, url};

/// The default `WSGATEWAY_SECTOR_QUERY`: today's rows of the backend's
/// assignment table. Parameters: `$1` user, `$2` branch, `$3` tenant.
pub const DEFAULT_QUERY: &str = "SELECT sector_id FROM waiter_sector_assignment \
     WHERE waiter_id = $1 AND branch_id = $2 AND tenant_id = $3 \
     AND assignment_date = CURRENT_DATE";

type Key = (TenantId, UserId, BranchId);

/// Where waiters' sectors come from.
pub struct SectorAssignments {
    backend: Option<Backend>,
}

struct Backend {
    pool: Pool,
    query: String,
    cache: moka::future::Cache<Key, Arc<[SectorId]>>,
    timeout: Duration,
    /// The outcome of the last database call. A `parking_lot` mutex: held
    /// to compare and store, never across an await.
    health: Mutex<Health>,
    /// `sslmode=…, sslrootcert=…`, for TLS failures' reasons.
    tls: String,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    /// From start until the first call.
    NotChecked,
    Ok,
    /// The last call failed, for this reason (one line, for people).
    Failing(String),
}

/// What `/ws/health/detailed` says of the sector repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorStatus {
    /// No `DATABASE_URL`: waiters are not filtered by sector.
    Disabled,
    Ok,
    /// The last database call failed (or none was made yet).
    Degraded,
}

impl SectorStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SectorStatus::Disabled => "disabled",
            SectorStatus::Ok => "ok",
            SectorStatus::Degraded => "degraded",
        }
    }
}

/// The database settings.
pub struct DatabaseSettings<'a> {
    pub url: &'a str,
    pub query: &'a str,
    pub cache_ttl: Duration,
    pub timeout: Duration,
    pub pool_size: usize,
}

/// A `DATABASE_URL` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BadDatabaseUrl {
    #[error("invalid setting DATABASE_URL (--database-url): {0}")]
    Url(#[from] url::UrlError),
    /// A TLS parameter's file (or the system's roots) cannot be used.
    #[error("invalid setting DATABASE_URL (--database-url): {0}")]
    Tls(#[from] tls::TlsParamError),
    #[error("invalid setting DATABASE_URL (--database-url): {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
}

/// Why one lookup gave no answer (each a one-line reason).
#[derive(Debug, Clone, thiserror::Error)]
enum LookupError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Connect(String),
    #[error("query: {0}")]
    Query(String),
}

impl SectorAssignments {
    /// No database: every lookup answers "unknown".
    pub fn disabled() -> SectorAssignments {
        SectorAssignments { backend: None }
    }

    /// A pool that connects lazily: the gateway starts whether the database
    /// is up or not.
    pub fn connect(
        settings: DatabaseSettings<'_>,
        metrics: Arc<Metrics>,
    ) -> Result<SectorAssignments, BadDatabaseUrl> {
        let url::DatabaseUrl {
            config: mut pg,
            tls,
        } = url::parse(settings.url)?;
        // The server gives up on a slow query too, so that a connection that
        // timed out on our side is free again soon. Added to the URL's own
        // `options`, if any.
        let ms = settings.timeout.as_millis().max(1);
        crate::postgres::add_options(&mut pg, &format!("-c statement_timeout={ms}"));
        pg.connect_timeout(settings.timeout);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls::connector(&tls)? {
            None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            Some(connector) => Manager::from_config(pg, connector, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .runtime(Runtime::Tokio1)
            .build()?;
        let cache = moka::future::Cache::builder()
            .time_to_live(settings.cache_ttl)
            .max_capacity(1_000_000)
            .support_invalidation_closures()
            .build();
        Ok(SectorAssignments {
            backend: Some(Backend {
                pool,
                query: settings.query.to_owned(),
                cache,
                timeout: settings.timeout,
                // Unknown until the first call: the sync task probes at once.
                health: Mutex::new(Health::NotChecked),
                tls: tls.describe(),
                metrics,
            }),
        })
    }

    /// The sectors a WAITER token hears, branch by branch (looked up
    /// concurrently; each branch unknown on its own failure).
    pub async fn scope_for(&self, id: &StaffIdentity) -> SectorScope {
        self.scope(id.tenant_id, id.user_id, &id.branch_ids).await
    }

    pub async fn scope(
        &self,
        tenant: TenantId,
        user: UserId,
        branches: &[BranchId],
    ) -> SectorScope {
        let lookups = branches
            .iter()
            .map(|b| async move { (*b, self.sectors(tenant, user, *b).await) });
        SectorScope::ByBranch(join_all(lookups).await)
    }

    /// The sectors of `user` in `branch` today, or `None` when unknown.
    async fn sectors(
        &self,
        tenant: TenantId,
        user: UserId,
        branch: BranchId,
    ) -> Option<Vec<SectorId>> {
        let backend = self.backend.as_ref()?;
        // One query for concurrent lookups of the same key; errors are
        // returned to every waiter of that query and not cached.
        match backend
            .cache
            .try_get_with((tenant, user, branch), backend.query(tenant, user, branch))
            .await
        {
            Ok(sectors) => Some(sectors.to_vec()),
            Err(e) => {
                tracing::warn!(user, branch, error = %e, "sector lookup failed; the waiter hears every sector");
                None
            }
        }
    }

    /// Forgets the cached sectors of one waiter in `branch`, or of every
    /// waiter of the branch.
    pub async fn invalidate(&self, tenant: TenantId, branch: BranchId, user: Option<UserId>) {
        let Some(backend) = &self.backend else {
            return;
        };
        match user {
            Some(user) => backend.cache.invalidate(&(tenant, user, branch)).await,
            None => {
                let _ = backend
                    .cache
                    .invalidate_entries_if(move |(t, _, b), _| *t == tenant && *b == branch);
            }
        }
    }

    pub fn status(&self) -> SectorStatus {
        self.health().0
    }

    /// The status, and while degraded why, in words.
    pub fn health(&self) -> (SectorStatus, Option<String>) {
        match &self.backend {
            None => (SectorStatus::Disabled, None),
            Some(b) => match &*b.health.lock() {
                Health::Ok => (SectorStatus::Ok, None),
                Health::NotChecked => (SectorStatus::Degraded, Some("not reached yet".into())),
                Health::Failing(reason) => (SectorStatus::Degraded, Some(reason.clone())),
            },
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.backend.is_some()
    }

    /// Checks the database with a trivial query; true when it answered.
    pub async fn probe(&self) -> bool {
        let Some(backend) = &self.backend else {
            return false;
        };
        let outcome = tokio::time::timeout(backend.timeout, async {
            let client = backend.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| LookupError::Query(backend.describe(&e)))
        })
        .await
        .unwrap_or(Err(LookupError::Timeout(backend.timeout)));
        backend.record(outcome.as_ref().map(|_| ()).map_err(Clone::clone));
        outcome.is_ok()
    }
}

impl Backend {
    async fn query(
        &self,
        tenant: TenantId,
        user: UserId,
        branch: BranchId,
    ) -> Result<Arc<[SectorId]>, LookupError> {
        let outcome = tokio::time::timeout(self.timeout, async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&self.query)
                .await
                .map_err(|e| LookupError::Query(self.describe(&e)))?;
            let rows = client
                .query(&statement, &[&user, &branch, &tenant])
                .await
                .map_err(|e| LookupError::Query(self.describe(&e)))?;
            rows.iter()
                .map(|row| {
                    row.try_get::<_, i64>(0)
                        .map_err(|e| LookupError::Query(self.describe(&e)))
                })
                .collect::<Result<Arc<[SectorId]>, _>>()
        })
        .await
        .unwrap_or(Err(LookupError::Timeout(self.timeout)));
        self.metrics.sector_queried(match &outcome {
            Ok(_) => SectorQuery::Ok,
            Err(LookupError::Timeout(_)) => SectorQuery::Timeout,
            Err(_) => SectorQuery::Error,
        });
        self.record(outcome.as_ref().map(|_| ()).map_err(Clone::clone));
        outcome
    }

    /// A pooled connection (opened now if need be).
    async fn client(&self) -> Result<deadpool_postgres::Object, LookupError> {
        self.pool.get().await.map_err(|e| {
            LookupError::Connect(match e {
                PoolError::Backend(e) => format!("connecting: {}", self.describe(&e)),
                PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                    "every pooled connection stayed busy for the whole timeout".into()
                }
                PoolError::Timeout(_) => "connecting timed out".into(),
                other => format!("pool: {other}"),
            })
        })
    }

    /// One line for people: a TLS failure says so, with the TLS settings;
    /// the server's refusals come with its message.
    fn describe(&self, e: &tokio_postgres::Error) -> String {
        let text = match (crate::tls::rustls_error(e), e.as_db_error()) {
            (Some(rustls::Error::InvalidCertificate(why)), _) => {
                let hint = match why {
                    rustls::CertificateError::UnknownIssuer => {
                        " (its chain does not lead to a CA of sslrootcert)"
                    }
                    _ => "",
                };
                format!(
                    "TLS ({}): the server's certificate was not accepted: {why}{hint}",
                    self.tls
                )
            }
            (Some(other), _) => format!("TLS ({}): handshake failed: {other}", self.tls),
            (None, Some(db)) => format!(
                "PostgreSQL refused: {}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            ),
            // A handshake that failed below rustls (cut mid-way): told by
            // the connector's marker. tokio-postgres's own refusal ("server
            // does not support TLS") carries no type to tell it by, and
            // says TLS in its words.
            (None, None) if tls::is_handshake_failure(e) => {
                format!("{} ({})", url::chain(e), self.tls)
            }
            (None, None) => url::chain(e),
        };
        text.replace('\n', " ")
    }

    /// Stores the outcome of a call; a change is logged, once.
    fn record(&self, outcome: Result<(), LookupError>) {
        let new = match outcome {
            Ok(()) => Health::Ok,
            Err(e) => Health::Failing(e.to_string()),
        };
        let old = std::mem::replace(&mut *self.health.lock(), new.clone());
        if old == new {
            return;
        }
        match (&old, &new) {
            (_, Health::Failing(reason)) => tracing::warn!(
                "sector repository degraded: {reason}; waiters whose sectors are looked up now hear every sector"
            ),
            (Health::Failing(_), Health::Ok) => {
                tracing::info!("sector repository ok: PostgreSQL answers again")
            }
            _ => tracing::info!("sector repository ok"),
        }
    }
}
