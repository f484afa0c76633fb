//! Waiters' sector assignments from PostgreSQL (DESIGN.md §1.8).
//!
//! `(tenant, user, branch) → sectors`, read with the configured query through
//! a connection pool, cached with a TTL, and bounded by a timeout. Anything
//! that goes wrong — no database, an error, a slow query — means "unknown",
//! and an unknown waiter hears every sector of its branch (the seed's
//! fallback). Failures are never cached, so the answer recovers by itself
//! when the database does. Lookups are awaited only by the connection being
//! admitted and by the [`sync`] task, never by the dispatcher.

pub mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::join_all;

use crate::auth::{BranchId, SectorId, StaffIdentity, TenantId, UserId};
use crate::hub::SectorScope;
use crate::metrics::Metrics;

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
    /// The outcome of the last database call: `OK` or `DEGRADED`.
    health: AtomicU8,
    metrics: Arc<Metrics>,
}

const OK: u8 = 0;
const DEGRADED: u8 = 1;

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
#[error("invalid setting DATABASE_URL (--database-url): {0}")]
pub struct BadDatabaseUrl(String);

/// Why one lookup gave no answer.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("timed out")]
    Timeout,
    #[error("pool: {0}")]
    Pool(String),
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
        let mut pg: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|_| BadDatabaseUrl("not a PostgreSQL URL".into()))?;
        // The server gives up on a slow query too, so that a connection that
        // timed out on our side is free again soon.
        let ms = settings.timeout.as_millis().max(1);
        pg.options(format!("-c statement_timeout={ms}"));
        pg.connect_timeout(settings.timeout);
        let manager = Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| BadDatabaseUrl(e.to_string()))?;
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
                health: AtomicU8::new(DEGRADED),
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

    /// `disabled`, `ok`, or `degraded` (the last database call failed).
    pub fn status(&self) -> &'static str {
        match &self.backend {
            None => "disabled",
            Some(b) if b.health.load(Ordering::Relaxed) == OK => "ok",
            Some(_) => "degraded",
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
            let client = backend
                .pool
                .get()
                .await
                .map_err(|e| LookupError::Pool(e.to_string()))?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| LookupError::Query(e.to_string()))
        })
        .await;
        let ok = matches!(outcome, Ok(Ok(_)));
        backend
            .health
            .store(if ok { OK } else { DEGRADED }, Ordering::Relaxed);
        ok
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
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| LookupError::Pool(e.to_string()))?;
            let statement = client
                .prepare_cached(&self.query)
                .await
                .map_err(|e| LookupError::Query(e.to_string()))?;
            let rows = client
                .query(&statement, &[&user, &branch, &tenant])
                .await
                .map_err(|e| LookupError::Query(e.to_string()))?;
            rows.iter()
                .map(|row| {
                    row.try_get::<_, i64>(0)
                        .map_err(|e| LookupError::Query(e.to_string()))
                })
                .collect::<Result<Arc<[SectorId]>, _>>()
        })
        .await
        .unwrap_or(Err(LookupError::Timeout));
        let outcome_label = match &outcome {
            Ok(_) => "ok",
            Err(LookupError::Timeout) => "timeout",
            Err(_) => "error",
        };
        self.metrics
            .sector_queries
            .with_label_values(&[outcome_label])
            .inc();
        self.health.store(
            if outcome.is_ok() { OK } else { DEGRADED },
            Ordering::Relaxed,
        );
        outcome
    }
}
