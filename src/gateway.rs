//! Lifecycle: build the parts, run them under one cancellation token, and
//! shut down in one written-down sequence.
//!
//! Shutdown: the signal fires → the listeners (public, and metrics when
//! `WSGATEWAY_METRICS_LISTEN` is set) stop accepting → the token is
//! cancelled, so every connection closes with 1001 and the dispatcher and
//! cleanup tasks stop → wait for all of them under the grace timeout.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{KeyError, Verifier};
use crate::broker::{
    BreakerConfig, Broker, EmbeddedBroker, EventQueue, HistoryLimits, RedisBounds, RedisBroker,
    RedisConnector, RedisTiming,
};
use crate::config::{Config, ConfigError};
use crate::dispatcher::Dispatcher;
use crate::drop_rate::DropRate;
use crate::http::server::ServerLimits;
use crate::hub::{Hub, Limits};
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::sectors::sync::{SectorQueue, SectorSync};
use crate::sectors::{BadDatabaseUrl, DEFAULT_QUERY, DatabaseSettings, SectorAssignments};

/// What every request handler and connection task shares.
pub struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    /// The revoked-token set, when `WSGATEWAY_REVOKED_JTI_KEY` is set.
    pub revocations: Option<Revocations>,
    pub hub: Arc<Hub>,
    pub queue: Arc<EventQueue>,
    pub broker: Arc<dyn Broker>,
    pub sectors: Arc<SectorAssignments>,
    /// Requests to the sector sync task (refreshes, assignment changes).
    pub sector_sync: SectorSync,
    /// `WSGATEWAY_RESUME_CONCURRENCY` places for history reads: in a
    /// reconnect storm resumes queue here, rather than sending Redis
    /// thousands of reads whose replies then time out together (dropping
    /// the shared command connection and opening the breaker).
    pub resume_reads: tokio::sync::Semaphore,
    pub metrics: Arc<Metrics>,
    /// Cancelled once, at shutdown: background tasks watch it; connections
    /// are closed through the hub ([`Hub::close_all`]) and check it once
    /// when admitted.
    pub shutdown: CancellationToken,
    /// Every connection and background task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Serve the demo page at `/` (the `dev` command).
    pub demo_page: bool,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Database(#[from] BadDatabaseUrl),
    #[error("{0}")]
    RedisVersion(String),
}

pub struct Gateway {
    shared: Arc<Shared>,
    /// The Redis broker, when configured, for the start-up check.
    redis: Option<Arc<RedisBroker>>,
    sector_commands: SectorQueue,
    /// The metrics listener, when bound before serving (see
    /// [`Gateway::with_metrics_listener`]).
    metrics_listener: Option<TcpListener>,
}

impl Gateway {
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        // Before any TLS client exists (the redis crate takes the default).
        crate::tls::install_crypto_provider();
        let metrics = Arc::new(Metrics::with_drop_rate(DropRate::new(
            config.drop_rate_window_s.0,
            config.drop_rate_alert.0,
            config.drop_rate_alert_cooldown_s.0,
        )));
        let verifier = Verifier::new(&config)?;
        let hub = Arc::new(Hub::new(
            Limits {
                max_total: config.max_connections,
                max_per_user: config.max_connections_per_user,
                max_per_session: config.max_connections_per_session,
            },
            metrics.clone(),
        ));
        let queue = Arc::new(EventQueue::new(config.event_queue_size, metrics.clone()));
        let history = HistoryLimits {
            size: config.history_size,
            ttl: config.history_ttl_s.0,
            max_replay: config.resume_max_events.unwrap_or(config.history_size),
        };
        let mut redis_broker = None;
        let connector = RedisConnector::from_config(&config)?;
        let broker: Arc<dyn Broker> = match &connector {
            None => Arc::new(EmbeddedBroker::new(queue.clone(), history)),
            Some(connector) => {
                let broker = Arc::new(RedisBroker::new(
                    connector.clone(),
                    RedisTiming {
                        timeout: config.redis_timeout_s.0,
                        retry_base: config.redis_retry_base_s.0,
                        retry_max: config.redis_retry_max_s.0,
                        health_check: config.redis_health_check_s.0,
                    },
                    BreakerConfig {
                        failure_threshold: config.breaker_failure_threshold,
                        recovery: config.breaker_recovery_s.0,
                        half_open_calls: config.breaker_half_open_calls,
                        // Trials are single commands: a round not decided
                        // within a few command timeouts has gone wrong.
                        trial_deadline: config.redis_timeout_s.0 * 3,
                    },
                    RedisBounds {
                        history,
                        max_channels: config.max_publish_channels,
                    },
                    queue.clone(),
                    hub.clone(),
                    metrics.clone(),
                ));
                redis_broker = Some(broker.clone());
                broker
            }
        };
        tracing::info!(broker = broker.status().kind, "broker");
        let sectors = Arc::new(match &config.database_url {
            None => SectorAssignments::disabled(),
            Some(url) => SectorAssignments::connect(
                DatabaseSettings {
                    url: url.expose(),
                    query: config.sector_query.as_deref().unwrap_or(DEFAULT_QUERY),
                    cache_ttl: config.sector_cache_ttl_s.0,
                    timeout: config.sector_query_timeout_s.0,
                    pool_size: config.database_pool_size,
                },
                metrics.clone(),
            )?,
        });
        let (sector_sync, sector_commands) = SectorSync::channel(1024, metrics.clone());
        let revocations = match (&config.revoked_jti_key, connector) {
            (Some(key), Some(connector)) => {
                Some(Revocations::new(connector, key, config.redis_timeout_s.0))
            }
            _ => None,
        };
        if config.allowed_origins.is_none() {
            tracing::warn!("ALLOWED_ORIGINS is unset: staff endpoints accept any browser origin");
        }
        let resume_reads = tokio::sync::Semaphore::new(config.resume_concurrency);
        Ok(Gateway {
            shared: Arc::new(Shared {
                config,
                verifier,
                revocations,
                hub,
                queue,
                broker,
                sectors,
                sector_sync,
                resume_reads,
                metrics,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                demo_page: false,
            }),
            sector_commands,
            redis: redis_broker,
            metrics_listener: None,
        })
    }

    /// Checks what can only be checked by connecting: a Redis server too
    /// old for the gateway is refused at start. Redis being unreachable is
    /// not an error (the gateway serves, and keeps trying).
    pub async fn preflight(&self) -> Result<(), StartError> {
        match &self.redis {
            Some(redis) => redis.preflight().await.map_err(StartError::RedisVersion),
            None => Ok(()),
        }
    }

    /// Serves the demo page at `/` as well (for `wsgateway dev`).
    pub fn with_demo_page(mut self) -> Gateway {
        Arc::get_mut(&mut self.shared)
            .expect("not shared before serving")
            .demo_page = true;
        self
    }

    /// Serves `/ws/metrics` on `listener` only (not on the public one), as
    /// `WSGATEWAY_METRICS_LISTEN` does; bound by the caller so that a bad
    /// address stops start-up and tests can use port 0.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> std::io::Result<Gateway> {
        let addr = listener.local_addr()?;
        Arc::get_mut(&mut self.shared)
            .expect("not shared before serving")
            .config
            .metrics_listen = Some(addr);
        self.metrics_listener = Some(listener);
        Ok(self)
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        let config = &shared.config;
        let metrics_listener = match (self.metrics_listener, config.metrics_listen) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await?),
            (None, None) => None,
        };
        let dispatcher = Dispatcher::new(
            shared.hub.clone(),
            shared.queue.clone(),
            shared.metrics.clone(),
            config.stale_event_s.0,
            config.dedup_window_s.0,
        )
        .with_sector_sync(shared.sector_sync.clone());
        shared.tasks.spawn(crate::sectors::sync::run(
            self.sector_commands,
            shared.hub.clone(),
            shared.sectors.clone(),
            config.sector_retry_s.0,
            shared.shutdown.clone(),
        ));
        shared.tasks.spawn(dispatcher.run(shared.shutdown.clone()));
        shared.tasks.spawn(cleanup(shared.clone()));
        shared
            .tasks
            .spawn(shared.broker.clone().run(shared.shutdown.clone()));

        let token = shared.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = signal => tracing::info!("shutting down"),
                _ = token.cancelled() => {}
            }
            token.cancel();
        });
        let limits = ServerLimits {
            max_pending: config.max_pending_connections,
            handshake_timeout: config.handshake_timeout_s.0,
            max_header_bytes: config.max_header_bytes,
        };
        if let Some(listener) = metrics_listener {
            // Its own pending budget: a flood of the public port does not
            // blind monitoring. Stops accepting with the public listener.
            shared.tasks.spawn(crate::http::server::serve(
                listener,
                crate::http::metrics_router(shared.clone()),
                limits,
                shared.metrics.clone(),
                shared.shutdown.clone(),
                shared.tasks.clone(),
            ));
        }
        // Returns once the shutdown token is cancelled: accepting stops.
        crate::http::server::serve(
            listener,
            crate::http::router(shared.clone()),
            limits,
            shared.metrics.clone(),
            shared.shutdown.clone(),
            shared.tasks.clone(),
        )
        .await;
        shared.shutdown.cancel();
        // Connections admitted from here on close themselves on seeing the
        // cancelled token; these are the ones already in the hub.
        shared.hub.close_all(crate::close::GOING_AWAY);
        shared.tasks.close();
        let grace = shared.config.shutdown_grace_s.0;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = shared.hub.counts().total,
                "shutdown grace period over; dropping the remaining connections"
            );
        }
        // The seed's text, for monitors that wait for a clean stop.
        tracing::info!("WebSocket Gateway shutdown complete");
        Ok(())
    }
}

/// The periodic pass: closes connections silent for too long (1001) and,
/// on its own period, those whose token has expired or was revoked (4001).
async fn cleanup(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut heartbeat = tokio::time::interval(config.cleanup_interval_s.0);
    let mut revalidate = tokio::time::interval(config.jwt_revalidate_s.0);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout_ms = config.heartbeat_timeout_s.0.as_millis() as u64;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = heartbeat.tick() => {
                let n = shared.hub.close_silent(timeout_ms);
                if n > 0 {
                    tracing::info!(connections = n, "closing silent connections");
                }
            }
            _ = revalidate.tick() => {
                let n = shared.hub.close_expired(|exp| shared.verifier.still_valid(exp));
                if n > 0 {
                    tracing::info!(connections = n, "closing connections with expired tokens");
                }
                if let Some(revocations) = &shared.revocations {
                    close_revoked(&shared, revocations).await;
                }
            }
        }
    }
}

async fn close_revoked(shared: &Shared, revocations: &Revocations) {
    let open = shared.hub.token_ids();
    if open.is_empty() {
        return;
    }
    let tokens: Vec<_> = open.iter().map(|(_, t, jti)| (*t, &**jti)).collect();
    let checks = &shared.metrics.revocation_checks;
    match revocations.revoked_among(&tokens).await {
        Ok(revoked) => {
            let ids: Vec<_> = open
                .iter()
                .zip(revoked)
                .filter(|(_, r)| *r)
                .map(|((id, _, _), _)| *id)
                .collect();
            checks
                .with_label_values(&["revoked"])
                .inc_by(ids.len() as u64);
            checks
                .with_label_values(&["valid"])
                .inc_by((open.len() - ids.len()) as u64);
            if !ids.is_empty() {
                tracing::info!(
                    connections = ids.len(),
                    "closing connections with revoked tokens"
                );
                shared.hub.close_ids(&ids, crate::close::UNAUTHORIZED);
            }
        }
        Err(e) => {
            checks
                .with_label_values(&["error"])
                .inc_by(open.len() as u64);
            tracing::warn!(error = %e, "revocation check failed; tokens kept until the next pass");
        }
    }
}
