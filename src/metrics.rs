//! Prometheus metrics, one registry per gateway.
//!
//! A registry per gateway (not a process-global recorder) lets several
//! gateways run in one test process with exact, independent counts. Names
//! and labels are the seed's `wsgateway_*` ones, plus latency histograms.

use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::auth::Endpoint;
use crate::drop_rate::DropRate;
use crate::event::Refusal;
use crate::unknown_types::UnknownTypes;

/// Why a connection was refused (`wsgateway_connections_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Auth,
    Forbidden,
    Origin,
    MaxTotal,
    MaxPerUser,
    /// Diner connections per table session (`WSGATEWAY_MAX_CONNECTIONS_PER_SESSION`).
    MaxPerSession,
    RateLimit,
    /// Too many connections still handshaking (`WSGATEWAY_MAX_PENDING_CONNECTIONS`),
    /// each past its request head, so that none could be evicted.
    HandshakeLimit,
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::Auth,
        Rejection::Forbidden,
        Rejection::Origin,
        Rejection::MaxTotal,
        Rejection::MaxPerUser,
        Rejection::MaxPerSession,
        Rejection::RateLimit,
        Rejection::HandshakeLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::Forbidden => "forbidden",
            Rejection::Origin => "origin",
            Rejection::MaxTotal => "max_total",
            Rejection::MaxPerUser => "max_per_user",
            Rejection::MaxPerSession => "max_per_session",
            Rejection::RateLimit => "rate_limit",
            Rejection::HandshakeLimit => "handshake_limit",
        }
    }
}

/// Why an open connection was closed by the gateway
/// (`wsgateway_disconnects_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    SlowConsumer,
    Heartbeat,
    Binary,
    TooLarge,
    InvalidUtf8,
    ProtocolError,
    /// Expired or revoked, found by a re-validation pass.
    TokenInvalid,
    Shutdown,
    Internal,
}

impl Disconnect {
    pub const ALL: [Disconnect; 9] = [
        Disconnect::SlowConsumer,
        Disconnect::Heartbeat,
        Disconnect::Binary,
        Disconnect::TooLarge,
        Disconnect::InvalidUtf8,
        Disconnect::ProtocolError,
        Disconnect::TokenInvalid,
        Disconnect::Shutdown,
        Disconnect::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::Heartbeat => "heartbeat",
            Disconnect::Binary => "binary",
            Disconnect::TooLarge => "too_large",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::TokenInvalid => "token_invalid",
            Disconnect::Shutdown => "shutdown",
            Disconnect::Internal => "internal",
        }
    }
}

/// Why an event was not dispatched (`wsgateway_events_dropped_total{reason}`).
/// The first four are the refusals of [`Refusal`], one each, the reason a
/// publish API request or a function call is refused with (PROTOCOL.md §5,
/// "Refusals").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Malformed, or inconsistent with its channel (`invalid_event`); also
    /// a malformed message on a gateway scope channel.
    Invalid,
    /// Of a type reserved for the gateway's own frames (`reserved_type`).
    ReservedType,
    /// Older than the stale limit at dispatch (`stale_event`).
    Stale,
    /// On a channel that matches a subscribed pattern but is not a valid
    /// channel name (`unknown_channel`).
    UnknownChannel,
    /// The event queue was full and this was its oldest event.
    QueueFull,
    /// Published while this node was not subscribed, and gone from history
    /// before the node could fill the gap (a lower bound: one per scope
    /// whose history was trimmed past the gap's start).
    Gap,
    /// A numbered message whose signature is not the function library's
    /// (see `broker/redis/signing.rs`): published by someone else.
    Unsigned,
    /// A signed message whose number is beyond anything Redis can have
    /// given yet.
    UntrustedNumber,
}

impl From<Refusal> for Drop {
    fn from(refusal: Refusal) -> Drop {
        match refusal {
            Refusal::InvalidEvent => Drop::Invalid,
            Refusal::ReservedType => Drop::ReservedType,
            Refusal::StaleEvent => Drop::Stale,
            Refusal::UnknownChannel => Drop::UnknownChannel,
        }
    }
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::Invalid,
        Drop::ReservedType,
        Drop::Stale,
        Drop::UnknownChannel,
        Drop::QueueFull,
        Drop::Gap,
        Drop::Unsigned,
        Drop::UntrustedNumber,
    ];

    /// Whether this loss is the backpressure or outage kind that the
    /// drop-rate alert watches. Invalid and stale events are the
    /// publisher's fault, counted but not alerted on.
    pub fn is_loss(self) -> bool {
        matches!(self, Drop::QueueFull | Drop::Gap)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Invalid => "invalid",
            Drop::ReservedType => "reserved_type",
            Drop::Stale => "stale",
            Drop::UnknownChannel => "unknown_channel",
            Drop::QueueFull => "queue_full",
            Drop::Gap => "gap",
            Drop::Unsigned => "unsigned",
            Drop::UntrustedNumber => "untrusted_number",
        }
    }
}

/// Why an event frame bound for a chosen recipient was not delivered
/// (`wsgateway_broadcasts_failed_total{reason}`). Each frame counts once:
/// a frame queued (`wsgateway_broadcasts_total`) is then either written, or
/// counted here as `write_failed` or `connection_closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// The connection's queue was full: the frame was not queued, and the
    /// connection is closing with 1008.
    SlowConsumer,
    /// Taken from the queue, but the write or flush of its batch failed
    /// (the client's TCP connection broke), or the connection ended before
    /// a frame handed to the socket could be sent.
    WriteFailed,
    /// Still queued when the connection ended, whatever ended it (the
    /// client closed or vanished, or the gateway closed it), or aimed at a
    /// connection already gone.
    ConnectionClosed,
}

impl Undelivered {
    pub const ALL: [Undelivered; 3] = [
        Undelivered::SlowConsumer,
        Undelivered::WriteFailed,
        Undelivered::ConnectionClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Undelivered::SlowConsumer => "slow_consumer",
            Undelivered::WriteFailed => "write_failed",
            Undelivered::ConnectionClosed => "connection_closed",
        }
    }
}

/// The outcome of checking one token id against the revoked set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationCheck {
    Valid,
    Revoked,
    /// Redis gave no answer: the token is kept (fail open).
    Error,
}

impl RevocationCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationCheck::Valid => "valid",
            RevocationCheck::Revoked => "revoked",
            RevocationCheck::Error => "error",
        }
    }
}

/// The outcome of one `refresh_token` message
/// (`wsgateway_token_refreshes_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefresh {
    Accepted,
    Rejected,
    /// Refused unchecked: the connection's previous `refresh_token` was
    /// still being checked (answered `refresh_in_progress`).
    Busy,
}

impl TokenRefresh {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefresh::Accepted => "accepted",
            TokenRefresh::Rejected => "rejected",
            TokenRefresh::Busy => "busy",
        }
    }
}

/// The outcome of one sector lookup sent to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorQuery {
    Ok,
    Timeout,
    Error,
}

impl SectorQuery {
    pub fn as_str(self) -> &'static str {
        match self {
            SectorQuery::Ok => "ok",
            SectorQuery::Timeout => "timeout",
            SectorQuery::Error => "error",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Open connections (the seed's meaning: a gauge despite `_total`).
    pub connections_total: IntGauge,
    pub connections_by_endpoint: IntGaugeVec,
    pub connections_rejected: IntCounterVec,
    /// Connections still sending their request head, closed unanswered to
    /// give their place in a full pending budget to a new connection.
    pub handshakes_evicted: IntCounter,
    pub disconnects: IntCounterVec,
    /// Event frames queued to connections.
    pub broadcasts_total: IntCounter,
    /// Event frames not delivered to a chosen recipient, by [`Undelivered`].
    pub broadcasts_failed: IntCounterVec,
    pub events_processed: IntCounter,
    pub events_dropped: IntCounterVec,
    /// `wsgateway_events_unknown_type_total{type}`, and the types seen.
    pub unknown_types: UnknownTypes,
    pub events_deduplicated: IntCounter,
    pub events_published: IntCounter,
    /// Publish API items whose caller `event_id` was used already: nothing
    /// was published again.
    pub publish_duplicates: IntCounter,
    /// Publish API requests refused (4xx), by error code.
    pub publish_rejected: IntCounterVec,
    /// Event received → last recipient queued, seconds.
    pub dispatch_seconds: Histogram,
    /// Recipients per dispatched event.
    pub fanout_size: Histogram,
    /// The event's `ts` → recipients queued, seconds.
    pub publish_to_queue_seconds: Histogram,
    /// The event's `ts` → written to the client (once per written batch,
    /// for its newest frame), seconds.
    pub publish_to_client_seconds: Histogram,
    /// Sizes of the hub's indices: the replacement of the seed's
    /// `wsgateway_locks_*` (a sharded lock per branch and per user).
    pub hub_index_entries: IntGaugeVec,
    pub event_drop_rate: Gauge,
    /// Drop-rate alerts logged (`High drop rate detected: X%`).
    pub drop_rate_alerts: IntCounter,
    /// Resumes (`last_event_id`), by whether history covered the gap.
    pub resumes: IntCounterVec,
    /// Events replayed to resuming clients.
    pub replayed_events: IntCounter,
    /// Revocation checks, by outcome (`revoked`, `valid`, `error`).
    pub revocation_checks: IntCounterVec,
    /// `refresh_token` messages, by outcome (`accepted`, `rejected`).
    pub token_refreshes: IntCounterVec,
    /// Sector lookups that reached the database, by outcome.
    pub sector_queries: IntCounterVec,
    /// `refresh_sectors` that joined one already pending for the connection.
    pub sector_refreshes_coalesced: IntCounter,
    /// `SECTOR_ASSIGNMENT_CHANGED` re-reads dropped on a full queue.
    pub sector_changes_dropped: IntCounter,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_breaker_state: IntGaugeVec,
    pub circuit_breaker_failures: IntGaugeVec,
    pub circuit_breaker_transitions: IntCounterVec,
    /// Gaps in the broker subscription, by outcome (`filled`, `lost`).
    pub subscription_gaps: IntCounterVec,
    /// Events read from history to fill subscription gaps.
    pub gap_filled_events: IntCounter,
    /// Connections told to reload their state after a gap (`resync`).
    pub resync_notices: IntCounter,
    /// Redis connections found dead or lost and replaced, by connection.
    pub redis_reconnects: IntCounterVec,
    drop_rate: Mutex<DropRate>,
}

impl Metrics {
    /// Metrics with the seed's drop-rate alert: over 5 % in 60 s, at most
    /// once per 5 min.
    pub fn new() -> Metrics {
        Self::with_drop_rate(DropRate::new(
            Duration::from_secs(60),
            0.05,
            Duration::from_secs(300),
        ))
    }

    pub fn with_drop_rate(drop_rate: DropRate) -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            connections_total: IntGauge::new(
                "wsgateway_connections_total",
                "Open WebSocket connections",
            )
            .unwrap(),
            connections_by_endpoint: IntGaugeVec::new(
                Opts::new(
                    "wsgateway_connections_by_endpoint",
                    "Open WebSocket connections by endpoint",
                ),
                &["endpoint"],
            )
            .unwrap(),
            connections_rejected: IntCounterVec::new(
                Opts::new(
                    "wsgateway_connections_rejected_total",
                    "Connections refused or closed for breaking a rule, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            handshakes_evicted: IntCounter::new(
                "wsgateway_handshakes_evicted_total",
                "Connections still sending their request head, closed unanswered to make room for a new one while the pending budget was full",
            )
            .unwrap(),
            disconnects: IntCounterVec::new(
                Opts::new(
                    "wsgateway_disconnects_total",
                    "Open connections closed by the gateway, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            broadcasts_total: IntCounter::new(
                "wsgateway_broadcasts_total",
                "Event frames queued to connections",
            )
            .unwrap(),
            broadcasts_failed: IntCounterVec::new(
                Opts::new(
                    "wsgateway_broadcasts_failed_total",
                    "Event frames not delivered to a chosen recipient, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            events_processed: IntCounter::new(
                "wsgateway_events_processed_total",
                "Events dispatched to their audience",
            )
            .unwrap(),
            events_dropped: IntCounterVec::new(
                Opts::new(
                    "wsgateway_events_dropped_total",
                    "Events not dispatched, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            unknown_types: UnknownTypes::new(),
            events_deduplicated: IntCounter::new(
                "wsgateway_events_deduplicated_total",
                "Repeated arrivals of an event within the de-duplication window",
            )
            .unwrap(),
            events_published: IntCounter::new(
                "wsgateway_events_published_total",
                "Events accepted by the publish API",
            )
            .unwrap(),
            publish_duplicates: IntCounter::new(
                "wsgateway_publish_duplicates_total",
                "Publish API items not published again: their tenant had used their event_id within the history window",
            )
            .unwrap(),
            publish_rejected: IntCounterVec::new(
                Opts::new(
                    "wsgateway_publish_rejected_total",
                    "Publish API requests refused (4xx), by error code",
                ),
                &["reason"],
            )
            .unwrap(),
            dispatch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgateway_dispatch_seconds",
                    "Time from an event's arrival to its last recipient queued",
                )
                .buckets(vec![
                    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.5,
                ]),
            )
            .unwrap(),
            fanout_size: Histogram::with_opts(
                HistogramOpts::new("wsgateway_fanout_size", "Recipients per dispatched event")
                    .buckets(vec![
                        0.0, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0,
                    ]),
            )
            .unwrap(),
            publish_to_queue_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgateway_publish_to_queue_seconds",
                    "Time from an event's ts to its recipients queued",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
            )
            .unwrap(),
            publish_to_client_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgateway_publish_to_client_seconds",
                    "Time from an event's ts to its frame written to a client",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
            )
            .unwrap(),
            hub_index_entries: IntGaugeVec::new(
                Opts::new(
                    "wsgateway_hub_index_entries",
                    "Keys in each hub index (replaces the seed's wsgateway_locks_*)",
                ),
                &["index"],
            )
            .unwrap(),
            resumes: IntCounterVec::new(
                Opts::new(
                    "wsgateway_resumes_total",
                    "Connections that asked to resume, by whether they were recovered",
                ),
                &["recovered"],
            )
            .unwrap(),
            replayed_events: IntCounter::new(
                "wsgateway_replayed_events_total",
                "Events replayed to resuming connections",
            )
            .unwrap(),
            revocation_checks: IntCounterVec::new(
                Opts::new(
                    "wsgateway_revocation_checks_total",
                    "Token ids checked against the revoked set, by outcome",
                ),
                &["outcome"],
            )
            .unwrap(),
            token_refreshes: IntCounterVec::new(
                Opts::new(
                    "wsgateway_token_refreshes_total",
                    "refresh_token messages, by outcome",
                ),
                &["outcome"],
            )
            .unwrap(),
            sector_queries: IntCounterVec::new(
                Opts::new(
                    "wsgateway_sector_queries_total",
                    "Sector assignment queries sent to PostgreSQL, by outcome",
                ),
                &["outcome"],
            )
            .unwrap(),
            sector_refreshes_coalesced: IntCounter::new(
                "wsgateway_sector_refreshes_coalesced_total",
                "refresh_sectors messages answered by a refresh already pending for the connection",
            )
            .unwrap(),
            sector_changes_dropped: IntCounter::new(
                "wsgateway_sector_changes_dropped_total",
                "Sector assignment changes not re-read because the sync queue was full",
            )
            .unwrap(),
            event_drop_rate: Gauge::new(
                "wsgateway_event_drop_rate",
                "Dropped / (processed + dropped) events over the drop-rate window",
            )
            .unwrap(),
            drop_rate_alerts: IntCounter::new(
                "wsgateway_drop_rate_alerts_total",
                "Drop-rate alerts logged (High drop rate detected)",
            )
            .unwrap(),
            circuit_breaker_state: IntGaugeVec::new(
                Opts::new(
                    "wsgateway_circuit_breaker_state",
                    "Circuit breaker state: 0 closed, 1 open, 2 half-open",
                ),
                &["name"],
            )
            .unwrap(),
            circuit_breaker_failures: IntGaugeVec::new(
                Opts::new(
                    "wsgateway_circuit_breaker_failures",
                    "Consecutive failures seen by the circuit breaker",
                ),
                &["name"],
            )
            .unwrap(),
            circuit_breaker_transitions: IntCounterVec::new(
                Opts::new(
                    "wsgateway_circuit_breaker_transitions_total",
                    "Circuit breaker state changes, by the state entered",
                ),
                &["name", "to"],
            )
            .unwrap(),
            subscription_gaps: IntCounterVec::new(
                Opts::new(
                    "wsgateway_subscription_gaps_total",
                    "Gaps in the broker subscription, by whether history filled them",
                ),
                &["outcome"],
            )
            .unwrap(),
            gap_filled_events: IntCounter::new(
                "wsgateway_gap_filled_events_total",
                "Events read from history to fill subscription gaps",
            )
            .unwrap(),
            resync_notices: IntCounter::new(
                "wsgateway_resync_notices_total",
                "Connections told to reload their state after an unrecoverable gap",
            )
            .unwrap(),
            redis_reconnects: IntCounterVec::new(
                Opts::new(
                    "wsgateway_redis_connections_lost_total",
                    "Redis connections found dead or closed and replaced, by connection",
                ),
                &["connection"],
            )
            .unwrap(),
            drop_rate: Mutex::new(drop_rate),
            registry,
        };
        m.register_all();
        for e in Endpoint::ALL {
            m.connections_by_endpoint
                .with_label_values(&[e.as_str()])
                .set(0);
        }
        for r in Rejection::ALL {
            m.connections_rejected
                .with_label_values(&[r.as_str()])
                .inc_by(0);
        }
        for d in Disconnect::ALL {
            m.disconnects.with_label_values(&[d.as_str()]).inc_by(0);
        }
        for u in Undelivered::ALL {
            m.broadcasts_failed
                .with_label_values(&[u.as_str()])
                .inc_by(0);
        }
        for t in [
            TokenRefresh::Accepted,
            TokenRefresh::Rejected,
            TokenRefresh::Busy,
        ] {
            m.token_refreshes.with_label_values(&[t.as_str()]).inc_by(0);
        }
        // Exported at 0, so that alert rules on their rate see a series
        // before the first failure (docs/prometheus/alerts.yml).
        for c in [
            RevocationCheck::Valid,
            RevocationCheck::Revoked,
            RevocationCheck::Error,
        ] {
            m.revocation_checks
                .with_label_values(&[c.as_str()])
                .inc_by(0);
        }
        for q in [SectorQuery::Ok, SectorQuery::Timeout, SectorQuery::Error] {
            m.sector_queries.with_label_values(&[q.as_str()]).inc_by(0);
        }
        for recovered in ["true", "false"] {
            m.resumes.with_label_values(&[recovered]).inc_by(0);
        }
        // Every reason but `gap` is exported from start, at 0.
        for d in Drop::ALL.into_iter().filter(|d| *d != Drop::Gap) {
            m.events_dropped.with_label_values(&[d.as_str()]).inc_by(0);
        }
        m
    }

    fn register_all(&self) {
        let r = &self.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.connections_total.clone()),
            Box::new(self.connections_by_endpoint.clone()),
            Box::new(self.connections_rejected.clone()),
            Box::new(self.handshakes_evicted.clone()),
            Box::new(self.disconnects.clone()),
            Box::new(self.broadcasts_total.clone()),
            Box::new(self.broadcasts_failed.clone()),
            Box::new(self.events_processed.clone()),
            Box::new(self.events_dropped.clone()),
            Box::new(self.unknown_types.collector()),
            Box::new(self.events_deduplicated.clone()),
            Box::new(self.events_published.clone()),
            Box::new(self.publish_duplicates.clone()),
            Box::new(self.publish_rejected.clone()),
            Box::new(self.dispatch_seconds.clone()),
            Box::new(self.fanout_size.clone()),
            Box::new(self.publish_to_queue_seconds.clone()),
            Box::new(self.publish_to_client_seconds.clone()),
            Box::new(self.hub_index_entries.clone()),
            Box::new(self.event_drop_rate.clone()),
            Box::new(self.drop_rate_alerts.clone()),
            Box::new(self.sector_queries.clone()),
            Box::new(self.sector_refreshes_coalesced.clone()),
            Box::new(self.sector_changes_dropped.clone()),
            Box::new(self.revocation_checks.clone()),
            Box::new(self.token_refreshes.clone()),
            Box::new(self.resumes.clone()),
            Box::new(self.replayed_events.clone()),
            Box::new(self.circuit_breaker_state.clone()),
            Box::new(self.circuit_breaker_failures.clone()),
            Box::new(self.circuit_breaker_transitions.clone()),
            Box::new(self.subscription_gaps.clone()),
            Box::new(self.gap_filled_events.clone()),
            Box::new(self.resync_notices.clone()),
            Box::new(self.redis_reconnects.clone()),
        ];
        for c in collectors {
            r.register(c).expect("metric names are unique");
        }
    }

    pub fn rejected(&self, why: Rejection) {
        self.connections_rejected
            .with_label_values(&[why.as_str()])
            .inc();
    }

    pub fn disconnected(&self, why: Disconnect) {
        self.disconnects.with_label_values(&[why.as_str()]).inc();
    }

    /// Counts `n` event frames not delivered to chosen recipients.
    pub fn revocation_checked(&self, outcome: RevocationCheck, n: u64) {
        self.revocation_checks
            .with_label_values(&[outcome.as_str()])
            .inc_by(n);
    }

    pub fn token_refreshed(&self, outcome: TokenRefresh) {
        self.token_refreshes
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    pub fn sector_queried(&self, outcome: SectorQuery) {
        self.sector_queries
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// A resume, by whether every missed event was replayed.
    pub fn resumed(&self, recovered: bool) {
        let label = if recovered { "true" } else { "false" };
        self.resumes.with_label_values(&[label]).inc();
    }

    pub fn undelivered(&self, why: Undelivered, n: u64) {
        if n > 0 {
            self.broadcasts_failed
                .with_label_values(&[why.as_str()])
                .inc_by(n);
        }
    }

    pub fn undelivered_count(&self, why: Undelivered) -> u64 {
        self.broadcasts_failed
            .with_label_values(&[why.as_str()])
            .get()
    }

    pub fn dropped(&self, why: Drop) {
        self.dropped_n(why, 1);
    }

    /// Counts `n` events not delivered; losses (see [`Drop::is_loss`]) feed
    /// the drop-rate tracker and its alert.
    pub fn dropped_n(&self, why: Drop, n: u64) {
        if n == 0 {
            return;
        }
        self.events_dropped
            .with_label_values(&[why.as_str()])
            .inc_by(n);
        if !why.is_loss() {
            return;
        }
        let mut tracker = self.drop_rate.lock();
        let alert = tracker.dropped(n);
        self.event_drop_rate.set(tracker.rate());
        drop(tracker);
        if let Some(alert) = alert {
            self.drop_rate_alerts.inc();
            let percent = alert.percent();
            // The seed's text, for alerts that match on it; the rate is in
            // the message and, as numbers, in the fields.
            tracing::warn!(
                drop_rate = alert.rate,
                drop_rate_percent = (alert.rate * 10_000.0).round() / 100.0,
                threshold_percent = alert.threshold * 100.0,
                window_dropped = alert.dropped,
                window_processed = alert.processed,
                window_s = alert.window_s,
                alert_count = self.drop_rate_alerts.get(),
                "High drop rate detected: {percent}%"
            );
        }
    }

    /// Counts an event dispatched to its audience.
    pub fn processed(&self) {
        self.events_processed.inc();
        let mut tracker = self.drop_rate.lock();
        tracker.processed();
        self.event_drop_rate.set(tracker.rate());
    }

    /// The drop rate over the window.
    pub fn drop_rate(&self) -> f64 {
        self.drop_rate.lock().rate()
    }

    pub fn dropped_count(&self, why: Drop) -> u64 {
        self.events_dropped.with_label_values(&[why.as_str()]).get()
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md §5, "Refusals": one drop reason per refusal, each
    /// exported from start.
    #[test]
    fn each_refusal_has_a_drop_reason_of_its_own() {
        let reasons: std::collections::BTreeSet<&str> = Refusal::ALL
            .into_iter()
            .map(|r| Drop::from(r).as_str())
            .collect();
        assert_eq!(reasons.len(), Refusal::ALL.len());
        let text = Metrics::new().render();
        for reason in reasons {
            let sample = format!("wsgateway_events_dropped_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&sample), "{sample}");
        }
    }
}
