//! Lifecycle: build the parts, run them, and stop in one written-down
//! sequence.
//!
//! Stopping: the first signal (SIGTERM or SIGINT) starts the drain: the
//! `draining` token is cancelled, so readiness answers 503 `draining` and
//! WebSocket upgrades are refused, while events still flow; the open
//! connections are closed with 1012 spread over `WSGATEWAY_DRAIN_S`
//! ([`crate::drain`]); a second signal closes the rest at once. Then the
//! `shutdown` token is cancelled: the listeners (public, and metrics when
//! `WSGATEWAY_METRICS_LISTEN` is set) stop accepting, the dispatcher,
//! broker and cleanup tasks stop, and every task gets up to
//! `WSGATEWAY_SHUTDOWN_GRACE_S` to finish.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::{AckQueue, Acks};
use crate::auth::{KeyError, Verifier};
use crate::broker::{
    BreakerConfig, Broker, EmbeddedBroker, EventQueue, HistoryLimits, RedisBounds, RedisBroker,
    RedisChannelKey, RedisConnector, RedisNames, RedisTiming, UnsupportedRedis,
};
use crate::close::Close;
use crate::config::{Config, ConfigError};
use crate::connection;
use crate::dispatcher::Dispatcher;
use crate::drop_rate::DropRate;
use crate::http::server::ServerLimits;
use crate::http::{DemoPage, HealthState, HttpState, PresenceState, PublishState, Routes};
use crate::hub::{Hub, Limits};
use crate::metrics::{Metrics, RevocationCheck};
use crate::outbox::{BadOutboxUrl, Outbox, OutboxSettings};
use crate::presence::{Mirror, NodeId, Presence};
use crate::revocation::Revocations;
use crate::sectors::sync::{SectorQueue, SectorSync};
use crate::sectors::{BadDatabaseUrl, DEFAULT_QUERY, DatabaseSettings, SectorAssignments};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Database(#[from] BadDatabaseUrl),
    #[error(transparent)]
    RedisVersion(#[from] UnsupportedRedis),
    #[error(transparent)]
    Outbox(#[from] BadOutboxUrl),
}

pub struct Gateway {
    config: Config,
    parts: Parts,
    /// The Redis broker, when configured, for the start-up check.
    redis: Option<Arc<RedisBroker>>,
    sector_commands: SectorQueue,
    /// The acks task's end of its queue.
    ack_queue: AckQueue,
    /// The metrics listener, when bound before serving (see
    /// [`Gateway::with_metrics_listener`]).
    metrics_listener: Option<TcpListener>,
    /// The demo page at `/`: `WSGATEWAY_DEMO_PAGE`, or `dev`'s.
    demo_page: Option<DemoPage>,
    /// The outbox consumer's settings, with `WSGATEWAY_OUTBOX_TABLE`.
    outbox: Option<OutboxSettings>,
    /// Where presence's own Redis connection goes (`REDIS_URL`).
    connector: Option<RedisConnector>,
}

/// The long-lived parts, built by [`Gateway::new`] and handed out by
/// [`Gateway::serve`] to the tasks and routes that use them.
struct Parts {
    verifier: Verifier,
    revocations: Option<Revocations>,
    shared: Shared,
}

/// The parts several tasks and routes hold, each a handle.
struct Shared {
    hub: Arc<Hub>,
    queue: Arc<EventQueue>,
    broker: Arc<dyn Broker>,
    sectors: Arc<SectorAssignments>,
    sector_sync: SectorSync,
    acks: Acks,
    metrics: Arc<Metrics>,
    /// The outbox consumer's state, with `WSGATEWAY_OUTBOX_TABLE`.
    outbox: Option<Arc<Outbox>>,
}

impl Gateway {
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        // Before any TLS client exists (the redis crate takes the default).
        crate::tls::install_crypto_provider();
        let metrics = build_metrics(&config);
        let verifier = Verifier::new(&config)?;
        let hub = build_hub(&config, &metrics);
        let queue = Arc::new(EventQueue::new(config.event_queue_size, metrics.clone()));
        let connector = RedisConnector::from_config(&config)?;
        let (broker, redis) = build_broker(&config, connector.as_ref(), &queue, &hub, &metrics);
        tracing::info!(broker = broker.status().kind, "broker");
        let sectors = build_sectors(&config, &metrics)?;
        let (sector_sync, sector_commands) = SectorSync::channel(1024, metrics.clone());
        let revocations = build_revocations(&config, connector.clone());
        let (acks, ack_queue) = Acks::new(metrics.clone());
        if config.allowed_origins.is_none() {
            tracing::warn!("ALLOWED_ORIGINS is unset: staff endpoints accept any browser origin");
        }
        let demo_page = config.demo_page.then(DemoPage::default);
        let outbox_settings = OutboxSettings::from_config(&config)?;
        let outbox = outbox_settings
            .as_ref()
            .map(|o| Arc::new(Outbox::new(&o.table, metrics.clone())));
        Ok(Gateway {
            config,
            parts: Parts {
                verifier,
                revocations,
                shared: Shared {
                    hub,
                    queue,
                    broker,
                    sectors,
                    sector_sync,
                    acks,
                    metrics,
                    outbox,
                },
            },
            redis,
            sector_commands,
            ack_queue,
            metrics_listener: None,
            demo_page,
            outbox: outbox_settings,
            connector,
        })
    }

    /// Checks what can only be checked by connecting: a Redis server too
    /// old for the gateway is refused at start. Redis being unreachable is
    /// not an error (the gateway serves, and keeps trying).
    pub async fn preflight(&self) -> Result<(), StartError> {
        match &self.redis {
            Some(redis) => redis.preflight().await.map_err(StartError::from),
            None => Ok(()),
        }
    }

    /// Serves this demo page at `/` (`wsgateway dev`, with its tokens),
    /// whatever `WSGATEWAY_DEMO_PAGE` says.
    pub fn with_demo_page(mut self, page: DemoPage) -> Gateway {
        self.demo_page = Some(page);
        self
    }

    /// Serves `/ws/metrics` on `listener` only (not on the public one), as
    /// `WSGATEWAY_METRICS_LISTEN` does; bound by the caller so that a bad
    /// address stops start-up and tests can use port 0.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> std::io::Result<Gateway> {
        self.config.metrics_listen = Some(listener.local_addr()?);
        self.metrics_listener = Some(listener);
        Ok(self)
    }

    /// Serves until the first item of `signals` (a SIGTERM or SIGINT),
    /// then drains and stops; a second item cuts the drain short.
    pub async fn serve(
        self,
        listener: TcpListener,
        signals: impl Stream<Item = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Gateway {
            config,
            parts,
            sector_commands,
            ack_queue,
            metrics_listener,
            demo_page,
            outbox,
            redis: _,
            connector,
        } = self;
        let metrics_listener = match (metrics_listener, config.metrics_listen) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await?),
            (None, None) => None,
        };
        let stop = Stop::default();
        let shutdown = stop.shutdown.clone();
        let tasks = TaskTracker::new();
        let Parts {
            verifier,
            revocations,
            shared,
        } = parts;
        let node = NodeId::new(&match &config.node_name {
            Some(name) => name.clone(),
            None => crate::presence::default_node_name(listener.local_addr()?.port()),
        });
        let (presence, mirror) = shared.presence(&config, node, connector);
        if let Some(mirror) = mirror {
            shared.hub.watch(mirror.watcher());
            tasks.spawn(mirror.run(shutdown.clone()));
        }
        let connections = shared.connections(
            &config,
            verifier,
            revocations,
            presence.clone(),
            &stop,
            &tasks,
        );
        let http = HttpState {
            health: Arc::new(shared.health(&config, &stop)),
            publish: Arc::new(shared.publish(&config)),
            presence: Arc::new(PresenceState {
                presence,
                metrics: shared.metrics.clone(),
                api_key: config.api_key.clone(),
            }),
            connections: Arc::new(connections),
        };
        shared.spawn_workers(
            &config,
            sector_commands,
            ack_queue,
            &http.connections,
            &tasks,
        );
        if let (Some(state), Some(settings)) = (&shared.outbox, outbox) {
            // Until the drain starts: the lock then passes to a node that
            // stays.
            tasks.spawn(crate::outbox::consumer::run(
                state.clone(),
                settings,
                shared.broker.clone(),
                shared.queue.clone(),
                stop.draining.clone(),
            ));
        }
        stop.follow(signals);
        let limits = ServerLimits {
            max_pending: config.max_pending_connections,
            handshake_timeout: config.handshake_timeout_s.0,
            max_header_bytes: config.max_header_bytes,
        };
        if let Some(listener) = metrics_listener {
            // Its own pending budget: a flood of the public port does not
            // blind monitoring. Stops accepting with the public listener.
            tasks.spawn(crate::http::server::serve(
                listener,
                crate::http::metrics_router(http.health.clone()),
                limits,
                shared.metrics.clone(),
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        let routes = Routes {
            metrics: config.metrics_listen.is_none(),
            publish: config.api_key.is_some(),
            demo_page,
        };
        // Returns once the shutdown token is cancelled: accepting stops.
        let server = crate::http::server::serve(
            listener,
            crate::http::router(http, routes),
            limits,
            shared.metrics.clone(),
            shutdown.clone(),
            tasks.clone(),
        );
        let drain = async {
            stop.draining.cancelled().await;
            shared.metrics.draining.set(1);
            crate::drain::close_spread(&shared.hub, config.drain_s.0, &stop.hurry).await;
            shutdown.cancel();
        };
        tokio::join!(server, drain);
        shut_down(&shared.hub, &tasks, config.shutdown_grace_s.0).await;
        tracing::info!("WebSocket Gateway shutdown complete");
        Ok(())
    }
}

impl Shared {
    fn health(&self, config: &Config, stop: &Stop) -> HealthState {
        HealthState {
            hub: self.hub.clone(),
            broker: self.broker.clone(),
            queue: self.queue.clone(),
            sectors: self.sectors.clone(),
            metrics: self.metrics.clone(),
            max_connections: config.max_connections,
            rate_limit_per_s: config.rate_limit_per_s,
            drop_rate_window: config.drop_rate_window_s.0,
            draining: stop.draining.clone(),
            outbox: self.outbox.clone(),
        }
    }

    fn publish(&self, config: &Config) -> PublishState {
        PublishState {
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            api_key: config.api_key.clone(),
            max_bytes: config.max_publish_bytes,
            max_items: config.max_publish_items,
            max_channels: config.max_publish_channels,
            stale_event: config.stale_event_s.0,
        }
    }

    /// Presence: the hub's alone (embedded), or with Redis the reader and
    /// the mirror task that writes this node's connections there.
    fn presence(
        &self,
        config: &Config,
        node: NodeId,
        connector: Option<RedisConnector>,
    ) -> (Arc<Presence>, Option<Mirror>) {
        tracing::info!(node = %node.name, "presence");
        let Some(connector) = connector else {
            return (Arc::new(Presence::embedded(self.hub.clone(), node)), None);
        };
        let (presence, mirror) = Presence::redis(
            self.hub.clone(),
            node,
            connector,
            RedisNames::new(config.redis_prefix.as_ref()),
            config.redis_timeout_s.0,
            Duration::from_secs(config.presence_ttl_s.into()),
            self.metrics.clone(),
        );
        (Arc::new(presence), Some(mirror))
    }

    /// What every connection task is given; the verifier and the revoked
    /// set are the connections' alone.
    fn connections(
        &self,
        config: &Config,
        verifier: Verifier,
        revocations: Option<Revocations>,
        presence: Arc<Presence>,
        stop: &Stop,
        tasks: &TaskTracker,
    ) -> connection::Context {
        connection::Context {
            settings: connection::Settings::from_config(config),
            verifier,
            revocations,
            hub: self.hub.clone(),
            broker: self.broker.clone(),
            sectors: self.sectors.clone(),
            presence,
            sector_sync: self.sector_sync.clone(),
            acks: self.acks.clone(),
            resume_reads: tokio::sync::Semaphore::new(config.resume_concurrency),
            metrics: self.metrics.clone(),
            draining: stop.draining.clone(),
            shutdown: stop.shutdown.clone(),
            tasks: tasks.clone(),
        }
    }

    /// The tasks behind the routes: sector sync, dispatcher, cleanup and
    /// broker, each stopped by the connections' shutdown token.
    fn spawn_workers(
        &self,
        config: &Config,
        sector_commands: SectorQueue,
        ack_queue: AckQueue,
        connections: &Arc<connection::Context>,
        tasks: &TaskTracker,
    ) {
        let shutdown = &connections.shutdown;
        let dispatcher = Dispatcher::new(
            self.hub.clone(),
            self.queue.clone(),
            self.metrics.clone(),
            config.stale_event_s.0,
            config.dedup_window_s.0,
        )
        // A quarter of a connection's queue: a burst never fills it alone.
        .coalescing(config.send_queue_size / 4)
        .with_sector_sync(self.sector_sync.clone())
        .with_acks(self.acks.clone());
        tasks.spawn(crate::sectors::sync::run(
            sector_commands,
            self.hub.clone(),
            self.sectors.clone(),
            config.sector_retry_s.0,
            shutdown.clone(),
        ));
        tasks.spawn(dispatcher.run(shutdown.clone()));
        tasks.spawn(cleanup(connections.clone(), Cleanup::from_config(config)));
        tasks.spawn(self.broker.clone().run(shutdown.clone()));
        tasks.spawn(crate::acks::run(
            self.broker.clone(),
            self.hub.clone(),
            self.metrics.clone(),
            ack_queue,
            shutdown.clone(),
        ));
    }
}

/// The three moments of stopping, each a token.
#[derive(Default)]
struct Stop {
    /// The first signal: readiness off, upgrades refused, the drain starts.
    draining: CancellationToken,
    /// A second signal: the drain closes the rest at once.
    hurry: CancellationToken,
    /// The drain is over: listeners and workers stop.
    shutdown: CancellationToken,
}

impl Stop {
    /// Cancels `draining` at the first of `signals`, `hurry` at the second.
    fn follow(&self, signals: impl Stream<Item = ()> + Send + 'static) {
        let (draining, hurry, shutdown) = (
            self.draining.clone(),
            self.hurry.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut signals = std::pin::pin!(signals);
            for (token, what) in [
                (
                    draining,
                    "draining; a second SIGTERM or SIGINT closes the connections at once",
                ),
                (
                    hurry,
                    "second signal: closing the remaining connections at once",
                ),
            ] {
                tokio::select! {
                    signal = signals.next() => match signal {
                        Some(()) => {
                            tracing::info!("{what}");
                            token.cancel();
                        }
                        None => return,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
}

/// After the drain: closes any connection still open (1012) and waits for
/// the tasks, at most `grace`.
async fn shut_down(hub: &Hub, tasks: &TaskTracker, grace: Duration) {
    // Connections admitted from the drain on close themselves on seeing
    // the cancelled token; these are the ones the drain may have missed.
    hub.close_all(Close::Shutdown);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            remaining = hub.counts().total,
            "shutdown grace period over; dropping the remaining connections"
        );
    }
}

fn build_metrics(config: &Config) -> Arc<Metrics> {
    Arc::new(Metrics::with_drop_rate(DropRate::new(
        config.drop_rate_window_s.0,
        config.drop_rate_alert.0,
        config.drop_rate_alert_cooldown_s.0,
    )))
}

fn build_hub(config: &Config, metrics: &Arc<Metrics>) -> Arc<Hub> {
    Arc::new(Hub::new(
        Limits {
            max_total: config.max_connections,
            max_per_user: config.max_connections_per_user,
            max_per_session: config.max_connections_per_session,
        },
        metrics.clone(),
    ))
}

/// The Redis broker when there is a connector (`REDIS_URL`), else the
/// embedded one; the Redis broker also on its own, for the preflight.
fn build_broker(
    config: &Config,
    connector: Option<&RedisConnector>,
    queue: &Arc<EventQueue>,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
) -> (Arc<dyn Broker>, Option<Arc<RedisBroker>>) {
    let history = HistoryLimits {
        size: config.history_size,
        ttl: config.history_ttl_s.0,
        max_replay: config.resume_max_events.unwrap_or(config.history_size),
    };
    let Some(connector) = connector else {
        return (Arc::new(EmbeddedBroker::new(queue.clone(), history)), None);
    };
    let names = RedisNames::new(config.redis_prefix.as_ref());
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
            names: names.clone(),
            signing: RedisChannelKey::derive(
                config
                    .table_token_secret
                    .as_ref()
                    .map(|s| s.expose())
                    .unwrap_or_default(),
                names.key_prefix(),
            ),
            stale_event: config.stale_event_s.0,
        },
        queue.clone(),
        hub.clone(),
        metrics.clone(),
    ));
    (broker.clone(), Some(broker))
}

fn build_sectors(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Arc<SectorAssignments>, StartError> {
    Ok(Arc::new(match &config.database_url {
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
    }))
}

/// The revoked-token set, with both `WSGATEWAY_REVOKED_JTI_KEY` and Redis.
fn build_revocations(config: &Config, connector: Option<RedisConnector>) -> Option<Revocations> {
    match (&config.revoked_jti_key, connector) {
        (Some(key), Some(connector)) => {
            let key = RedisNames::new(config.redis_prefix.as_ref()).key(key);
            Some(Revocations::new(connector, &key, config.redis_timeout_s.0))
        }
        _ => None,
    }
}

/// The cleanup task's periods.
struct Cleanup {
    /// `WSGATEWAY_CLEANUP_INTERVAL_S`.
    heartbeat: Duration,
    /// `WSGATEWAY_JWT_REVALIDATE_S`.
    revalidate: Duration,
    /// `WSGATEWAY_HEARTBEAT_TIMEOUT_S`.
    heartbeat_timeout: Duration,
}

impl Cleanup {
    fn from_config(config: &Config) -> Cleanup {
        Cleanup {
            heartbeat: config.cleanup_interval_s.0,
            revalidate: config.jwt_revalidate_s.0,
            heartbeat_timeout: config.heartbeat_timeout_s.0,
        }
    }
}

/// The periodic pass: closes connections silent for too long (1001) and,
/// on its own period, those whose token has expired or was revoked (4001).
async fn cleanup(conns: Arc<connection::Context>, periods: Cleanup) {
    let mut heartbeat = tokio::time::interval(periods.heartbeat);
    let mut revalidate = tokio::time::interval(periods.revalidate);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout_ms = periods.heartbeat_timeout.as_millis() as u64;
    loop {
        tokio::select! {
            _ = conns.shutdown.cancelled() => return,
            _ = heartbeat.tick() => {
                let n = conns.hub.close_silent(timeout_ms);
                if n > 0 {
                    tracing::info!(connections = n, "closing silent connections");
                }
            }
            _ = revalidate.tick() => {
                let n = conns.hub.close_expired(|exp| conns.verifier.still_valid(exp));
                if n > 0 {
                    tracing::info!(connections = n, "closing connections with expired tokens");
                }
                if let Some(revocations) = &conns.revocations {
                    close_revoked(&conns, revocations).await;
                }
            }
        }
    }
}

async fn close_revoked(conns: &connection::Context, revocations: &Revocations) {
    let open = conns.hub.token_ids();
    if open.is_empty() {
        return;
    }
    let tokens: Vec<_> = open.iter().map(|(_, t, jti)| (*t, &**jti)).collect();
    let m = &conns.metrics;
    match revocations.revoked_among(&tokens).await {
        Ok(revoked) => {
            let ids: Vec<_> = open
                .iter()
                .zip(revoked)
                .filter(|(_, r)| *r)
                .map(|((id, _, _), _)| *id)
                .collect();
            m.revocation_checked(RevocationCheck::Revoked, ids.len() as u64);
            m.revocation_checked(RevocationCheck::Valid, (open.len() - ids.len()) as u64);
            if !ids.is_empty() {
                tracing::info!(
                    connections = ids.len(),
                    "closing connections with revoked tokens"
                );
                conns.hub.close_ids(&ids, Close::Unauthorized);
            }
        }
        Err(e) => {
            m.revocation_checked(RevocationCheck::Error, open.len() as u64);
            tracing::warn!(error = %e, "revocation check failed; tokens kept until the next pass");
        }
    }
}
