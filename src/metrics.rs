//! Prometheus metrics, one registry per gateway.
//!
//! A registry per gateway (not a process-global recorder) lets several
//! gateways run in one test process with exact, independent counts. Names
//! and labels are the seed's `wsgateway_*` ones, plus latency histograms.
//! Each metric is declared once, in the `metrics!` table below.

use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::Collector;
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
    /// A WebSocket upgrade while the node drains (503).
    Draining,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Auth,
        Rejection::Forbidden,
        Rejection::Origin,
        Rejection::MaxTotal,
        Rejection::MaxPerUser,
        Rejection::MaxPerSession,
        Rejection::RateLimit,
        Rejection::HandshakeLimit,
        Rejection::Draining,
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
            Rejection::Draining => "draining",
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

/// What kind of series a metric exports (its `# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One row of the `metrics!` table: a metric as exported.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Label names; empty for a single series.
    pub labels: &'static [&'static str],
    /// Bucket upper bounds; histograms only.
    pub buckets: &'static [f64],
}

/// A type the table can declare a metric of: built from its row, then
/// registered through its collector.
trait Family: Sized {
    const KIND: Kind;
    fn build(info: &MetricInfo) -> prometheus::Result<Self>;
    fn collector(&self) -> Box<dyn Collector>;
}

/// A row with labels or buckets its type cannot have is a mistake in the
/// table, refused when the registry is built (by any test).
fn refuse(info: &MetricInfo, what: &str) -> prometheus::Error {
    prometheus::Error::Msg(format!("{}: {what}", info.name))
}

fn opts(info: &MetricInfo) -> Opts {
    Opts::new(info.name, info.help)
}

macro_rules! single_series {
    ($($ty:ty: $kind:expr;)*) => {$(
        impl Family for $ty {
            const KIND: Kind = $kind;
            fn build(info: &MetricInfo) -> prometheus::Result<Self> {
                if !info.labels.is_empty() || !info.buckets.is_empty() {
                    return Err(refuse(info, "a single series has no labels or buckets"));
                }
                <$ty>::with_opts(opts(info))
            }
            fn collector(&self) -> Box<dyn Collector> {
                Box::new(self.clone())
            }
        }
    )*};
}

macro_rules! labelled {
    ($($ty:ty: $kind:expr;)*) => {$(
        impl Family for $ty {
            const KIND: Kind = $kind;
            fn build(info: &MetricInfo) -> prometheus::Result<Self> {
                if info.labels.is_empty() || !info.buckets.is_empty() {
                    return Err(refuse(info, "a labelled family needs labels, no buckets"));
                }
                <$ty>::new(opts(info), info.labels)
            }
            fn collector(&self) -> Box<dyn Collector> {
                Box::new(self.clone())
            }
        }
    )*};
}

single_series! {
    IntCounter: Kind::Counter;
    IntGauge: Kind::Gauge;
    Gauge: Kind::Gauge;
}

labelled! {
    IntCounterVec: Kind::Counter;
    IntGaugeVec: Kind::Gauge;
}

impl Family for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn build(info: &MetricInfo) -> prometheus::Result<Self> {
        if !info.labels.is_empty() || info.buckets.is_empty() {
            return Err(refuse(info, "a histogram needs buckets, no labels"));
        }
        Histogram::with_opts(
            HistogramOpts::new(info.name, info.help).buckets(info.buckets.to_vec()),
        )
    }
    fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }
}

/// The unknown-type counters, with the types seen (see `unknown_types`).
impl Family for UnknownTypes {
    const KIND: Kind = Kind::Counter;
    fn build(info: &MetricInfo) -> prometheus::Result<Self> {
        IntCounterVec::build(info).map(UnknownTypes::new)
    }
    fn collector(&self) -> Box<dyn Collector> {
        Box::new(UnknownTypes::collector(self))
    }
}

/// Builds the metric of `info` and registers it.
fn declare<F: Family>(registry: &Registry, info: &MetricInfo) -> F {
    let family = F::build(info).unwrap_or_else(|e| panic!("metric table: {e}"));
    registry
        .register(family.collector())
        .unwrap_or_else(|e| panic!("metric {}: {e}", info.name));
    family
}

/// Each metric is one row: its field, its type, its exported name and help,
/// then its label names or its histogram buckets. From the rows come the
/// fields of [`Metrics`] (direct handles, no lookup by name per event),
/// their construction and registration, and [`METRICS`], which tests check
/// the docs against. A macro, like `settings!` in `config.rs`, because a
/// field per row can only be written by one.
macro_rules! metrics {
    (@row $ty:ty, $name:literal, $help:literal, [$($label:literal),*], [$($bucket:literal),*]) => {
        MetricInfo {
            name: $name,
            help: $help,
            kind: <$ty as Family>::KIND,
            labels: &[$($label),*],
            buckets: &[$($bucket),*],
        }
    };
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $name:literal, $help:literal
            $(, labels = [$($label:literal),+])?
            $(, buckets = [$($bucket:literal),+])?;
    )*) => {
        /// Every metric of the gateway, in the order of the table.
        pub const METRICS: &[MetricInfo] = &[$(
            metrics!(@row $ty, $name, $help, [$($($label),+)?], [$($($bucket),+)?]),
        )*];

        pub struct Metrics {
            registry: Registry,
            $( $(#[doc = $doc])* pub $field: $ty, )*
            drop_rate: Mutex<DropRate>,
        }

        impl Metrics {
            /// Every metric of the table, built and registered, none set.
            fn declared(drop_rate: DropRate) -> Metrics {
                let registry = Registry::new();
                Metrics {
                    $( $field: declare(
                        &registry,
                        &metrics!(@row $ty, $name, $help, [$($($label),+)?], [$($($bucket),+)?]),
                    ), )*
                    registry,
                    drop_rate: Mutex::new(drop_rate),
                }
            }
        }
    };
}

metrics! {
    /// Open connections (the seed's meaning: a gauge despite `_total`).
    connections_total: IntGauge = "wsgateway_connections_total", "Open WebSocket connections";
    connections_by_endpoint: IntGaugeVec = "wsgateway_connections_by_endpoint",
        "Open WebSocket connections by endpoint", labels = ["endpoint"];
    connections_rejected: IntCounterVec = "wsgateway_connections_rejected_total",
        "Connections refused or closed for breaking a rule, by reason", labels = ["reason"];
    /// Connections still sending their request head, closed unanswered to
    /// give their place in a full pending budget to a new connection.
    handshakes_evicted: IntCounter = "wsgateway_handshakes_evicted_total",
        "Connections still sending their request head, closed unanswered to make room for a new one while the pending budget was full";
    /// 1 from the first SIGTERM or SIGINT on: the node is draining.
    draining: IntGauge = "wsgateway_draining",
        "1 while the node drains its connections before exiting, else 0";
    disconnects: IntCounterVec = "wsgateway_disconnects_total",
        "Open connections closed by the gateway, by reason", labels = ["reason"];
    /// Event frames queued to connections.
    broadcasts_total: IntCounter = "wsgateway_broadcasts_total", "Event frames queued to connections";
    /// Event frames not delivered to a chosen recipient, by [`Undelivered`].
    broadcasts_failed: IntCounterVec = "wsgateway_broadcasts_failed_total",
        "Event frames not delivered to a chosen recipient, by reason", labels = ["reason"];
    events_processed: IntCounter = "wsgateway_events_processed_total",
        "Events dispatched to their audience";
    events_dropped: IntCounterVec = "wsgateway_events_dropped_total",
        "Events not dispatched, by reason", labels = ["reason"];
    /// `wsgateway_events_unknown_type_total{type}`, and the types seen.
    unknown_types: UnknownTypes = "wsgateway_events_unknown_type_total",
        "Events of a type the gateway does not know (still delivered), by type; \
         types beyond the first 100 are counted as \"other\"", labels = ["type"];
    events_deduplicated: IntCounter = "wsgateway_events_deduplicated_total",
        "Repeated arrivals of an event within the de-duplication window";
    events_published: IntCounter = "wsgateway_events_published_total",
        "Events accepted by the publish API";
    /// Publish API items whose caller `event_id` was used already: nothing
    /// was published again.
    publish_duplicates: IntCounter = "wsgateway_publish_duplicates_total",
        "Publish API items not published again: their tenant had used their event_id within the history window";
    /// Publish API requests refused (4xx), by error code.
    publish_rejected: IntCounterVec = "wsgateway_publish_rejected_total",
        "Publish API requests refused (4xx), by error code", labels = ["reason"];
    /// Event received → last recipient queued, seconds.
    dispatch_seconds: Histogram = "wsgateway_dispatch_seconds",
        "Time from an event's arrival to its last recipient queued",
        buckets = [0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];
    /// Recipients per dispatched event.
    fanout_size: Histogram = "wsgateway_fanout_size", "Recipients per dispatched event",
        buckets = [0.0, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0];
    /// The event's `ts` → recipients queued, seconds.
    publish_to_queue_seconds: Histogram = "wsgateway_publish_to_queue_seconds",
        "Time from an event's ts to its recipients queued",
        buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
    /// The event's `ts` → written to the client (once per written batch,
    /// for its newest frame), seconds.
    publish_to_client_seconds: Histogram = "wsgateway_publish_to_client_seconds",
        "Time from an event's ts to its frame written to a client",
        buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
    /// Sizes of the hub's indices: the replacement of the seed's
    /// `wsgateway_locks_*` (a sharded lock per branch and per user).
    hub_index_entries: IntGaugeVec = "wsgateway_hub_index_entries",
        "Keys in each hub index (replaces the seed's wsgateway_locks_*)", labels = ["index"];
    event_drop_rate: Gauge = "wsgateway_event_drop_rate",
        "Dropped / (processed + dropped) events over the drop-rate window";
    /// Drop-rate alerts logged (`High drop rate detected: X%`).
    drop_rate_alerts: IntCounter = "wsgateway_drop_rate_alerts_total",
        "Drop-rate alerts logged (High drop rate detected)";
    /// Resumes (`last_event_id`), by whether history covered the gap.
    resumes: IntCounterVec = "wsgateway_resumes_total",
        "Connections that asked to resume, by whether they were recovered", labels = ["recovered"];
    /// Events replayed to resuming clients.
    replayed_events: IntCounter = "wsgateway_replayed_events_total",
        "Events replayed to resuming connections";
    /// Revocation checks, by outcome (`revoked`, `valid`, `error`).
    revocation_checks: IntCounterVec = "wsgateway_revocation_checks_total",
        "Token ids checked against the revoked set, by outcome", labels = ["outcome"];
    /// `refresh_token` messages, by outcome (`accepted`, `rejected`).
    token_refreshes: IntCounterVec = "wsgateway_token_refreshes_total",
        "refresh_token messages, by outcome", labels = ["outcome"];
    /// Sector lookups that reached the database, by outcome.
    sector_queries: IntCounterVec = "wsgateway_sector_queries_total",
        "Sector assignment queries sent to PostgreSQL, by outcome", labels = ["outcome"];
    /// `refresh_sectors` that joined one already pending for the connection.
    sector_refreshes_coalesced: IntCounter = "wsgateway_sector_refreshes_coalesced_total",
        "refresh_sectors messages answered by a refresh already pending for the connection";
    /// `SECTOR_ASSIGNMENT_CHANGED` re-reads dropped on a full queue.
    sector_changes_dropped: IntCounter = "wsgateway_sector_changes_dropped_total",
        "Sector assignment changes not re-read because the sync queue was full";
    /// 0 closed, 1 open, 2 half-open.
    circuit_breaker_state: IntGaugeVec = "wsgateway_circuit_breaker_state",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open", labels = ["name"];
    circuit_breaker_failures: IntGaugeVec = "wsgateway_circuit_breaker_failures",
        "Consecutive failures seen by the circuit breaker", labels = ["name"];
    circuit_breaker_transitions: IntCounterVec = "wsgateway_circuit_breaker_transitions_total",
        "Circuit breaker state changes, by the state entered", labels = ["name", "to"];
    /// Gaps in the broker subscription, by outcome (`filled`, `lost`).
    subscription_gaps: IntCounterVec = "wsgateway_subscription_gaps_total",
        "Gaps in the broker subscription, by whether history filled them", labels = ["outcome"];
    /// Events read from history to fill subscription gaps.
    gap_filled_events: IntCounter = "wsgateway_gap_filled_events_total",
        "Events read from history to fill subscription gaps";
    /// Connections told to reload their state after a gap (`resync`).
    resync_notices: IntCounter = "wsgateway_resync_notices_total",
        "Connections told to reload their state after an unrecoverable gap";
    /// Redis connections found dead or lost and replaced, by connection.
    redis_reconnects: IntCounterVec = "wsgateway_redis_connections_lost_total",
        "Redis connections found dead or closed and replaced, by connection", labels = ["connection"];
    /// Scope channels this node is subscribed to now (they follow its
    /// connections' scopes).
    redis_subscribed_scopes: IntGauge = "wsgateway_redis_subscribed_scopes",
        "Scope channels this node is subscribed to, following its connections";
    /// Age of the oldest row of the outbox, as last read (any node).
    outbox_lag: Gauge = "wsgateway_outbox_lag_seconds",
        "Age of the oldest row of the transactional outbox, in seconds, as last read";
    /// Outbox rows handled by this node, by outcome.
    outbox_rows: IntCounterVec = "wsgateway_outbox_rows_total",
        "Outbox rows taken by this node, by outcome: published, duplicate (published before), dead_letter", labels = ["outcome"];
    /// 1 while this node holds the outbox's lock (it is the one consuming).
    outbox_consuming: IntGauge = "wsgateway_outbox_consuming",
        "1 while this node holds the outbox table's lock and publishes its rows";
    /// Outbox passes that failed, by what failed.
    outbox_errors: IntCounterVec = "wsgateway_outbox_errors_total",
        "Outbox passes that failed, by what failed: database, broker", labels = ["kind"];
    /// Escalations of events that asked for an ack and got none, taken by
    /// this node (each event escalates once, on one node).
    events_unacknowledged: IntCounterVec = "wsgateway_events_unacknowledged_total",
        "Events that asked for an acknowledgement and got none, escalated to their branch's admins by this node, by reason: no_ack, no_audience", labels = ["reason"];
    /// Redeliveries of unacknowledged events this node took.
    events_redelivered: IntCounter = "wsgateway_events_redelivered_total",
        "Events that asked for an acknowledgement, got none in time, and were sent once more to their audience by this node";
    /// Acks from this node's clients, by what they did.
    acks: IntCounterVec = "wsgateway_acks_total",
        "Event ids acknowledged by this node's clients, by outcome: acknowledged, repeated, late, ignored (not from a connection that received the event), failed (the broker could not be told)", labels = ["outcome"];
    /// `GET /api/presence` and admins' `presence` messages, by way in
    /// (`http`, `websocket`) and outcome.
    presence_requests: IntCounterVec = "wsgateway_presence_requests_total",
        "Presence requests (GET /api/presence, admins' presence messages), by way in and outcome", labels = ["via", "outcome"];
    /// Full rewrites of this node's presence entries in Redis.
    presence_rewrites: IntCounter = "wsgateway_presence_rewrites_total",
        "Times this node rewrote all its presence entries in Redis (at start, after a lost change, a Redis failure or a lapsed heartbeat)";
    /// Subscription commands sent as the audience changed, by command.
    redis_subscription_commands: IntCounterVec = "wsgateway_redis_subscription_commands_total",
        "Subscribe and unsubscribe commands sent as this node's audience changed", labels = ["command"];
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
        let m = Metrics::declared(drop_rate);
        m.export_at_zero();
        m
    }

    /// Creates the series known in advance, at 0, so that they exist
    /// before their first count: alert rules on their rate see a series
    /// before the first failure (docs/prometheus/alerts.yml).
    fn export_at_zero(&self) {
        for e in Endpoint::ALL {
            self.connections_by_endpoint
                .with_label_values(&[e.as_str()])
                .set(0);
        }
        let zero = |family: &IntCounterVec, label: &str| {
            family.with_label_values(&[label]).inc_by(0);
        };
        for r in Rejection::ALL {
            zero(&self.connections_rejected, r.as_str());
        }
        for outcome in ["published", "duplicate", "dead_letter"] {
            zero(&self.outbox_rows, outcome);
        }
        for kind in ["database", "broker"] {
            zero(&self.outbox_errors, kind);
        }
        for reason in ["no_ack", "no_audience"] {
            zero(&self.events_unacknowledged, reason);
        }
        for outcome in ["acknowledged", "repeated", "late", "ignored", "failed"] {
            zero(&self.acks, outcome);
        }
        for d in Disconnect::ALL {
            zero(&self.disconnects, d.as_str());
        }
        for u in Undelivered::ALL {
            zero(&self.broadcasts_failed, u.as_str());
        }
        for t in [
            TokenRefresh::Accepted,
            TokenRefresh::Rejected,
            TokenRefresh::Busy,
        ] {
            zero(&self.token_refreshes, t.as_str());
        }
        for c in [
            RevocationCheck::Valid,
            RevocationCheck::Revoked,
            RevocationCheck::Error,
        ] {
            zero(&self.revocation_checks, c.as_str());
        }
        for q in [SectorQuery::Ok, SectorQuery::Timeout, SectorQuery::Error] {
            zero(&self.sector_queries, q.as_str());
        }
        for recovered in ["true", "false"] {
            zero(&self.resumes, recovered);
        }
        // Every reason but `gap` is exported from start, at 0.
        for d in Drop::ALL.into_iter().filter(|d| *d != Drop::Gap) {
            zero(&self.events_dropped, d.as_str());
        }
    }

    /// Publications the broker took, whoever brought them (the publish
    /// API, the outbox): new ones, and repeats of a caller id it had.
    pub fn published(&self, new: u64, duplicates: u64) {
        self.events_published.inc_by(new);
        self.publish_duplicates.inc_by(duplicates);
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

    /// A presence request answered: `via` `http` or `websocket`;
    /// `outcome` `ok`, `unauthorized`, `invalid_query`,
    /// `forbidden_branch`, `unavailable` or `busy`.
    pub fn presence_requested(&self, via: &'static str, outcome: &'static str) {
        self.presence_requests
            .with_label_values(&[via, outcome])
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

    /// The rows of the metrics table of PROTOCOL.md (`GET /ws/metrics`):
    /// name, type column, labels column.
    fn documented_metrics() -> Vec<(&'static str, &'static str, &'static str)> {
        let protocol = include_str!("../docs/PROTOCOL.md");
        let section = protocol
            .split("### `GET /ws/metrics`")
            .nth(1)
            .expect("PROTOCOL.md has a `GET /ws/metrics` section");
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|row| {
                let cells: Vec<&str> = row.split(" | ").collect();
                let name = cells[0].trim_start_matches("| ").trim_matches('`');
                let labels = cells.get(2).map_or("", |l| l.trim_end_matches('|').trim());
                (name, cells[1], labels)
            })
            .collect()
    }

    /// PROTOCOL.md lists every metric of the table once, with its type and
    /// label names, and no metric that is not in it.
    #[test]
    fn the_protocol_documents_every_metric() {
        let documented = documented_metrics();
        for m in METRICS {
            let rows: Vec<_> = documented.iter().filter(|d| d.0 == m.name).collect();
            assert_eq!(rows.len(), 1, "PROTOCOL.md rows of {}", m.name);
            let (_, kind, labels) = rows[0];
            assert!(
                kind.starts_with(m.kind.as_str()),
                "type of {}: {kind}",
                m.name
            );
            assert_eq!(
                labels.is_empty(),
                m.labels.is_empty(),
                "labels of {}",
                m.name
            );
            for label in m.labels {
                assert!(
                    labels.contains(&format!("`{label}`")),
                    "{} lacks `{label}`",
                    m.name
                );
            }
        }
        for (name, _, _) in &documented {
            assert!(
                METRICS.iter().any(|m| m.name == *name),
                "{name} is not a metric"
            );
        }
        assert_eq!(documented.len(), METRICS.len());
    }

    /// USAGE.md and OPERATING.md name only metrics of the table.
    #[test]
    fn the_guides_name_only_metrics_of_the_table() {
        for text in [
            include_str!("../docs/USAGE.md"),
            include_str!("../docs/OPERATING.md"),
        ] {
            for (i, _) in text.match_indices("wsgateway_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // A name ending in `_` is a prefix (`wsgateway_*`).
                assert!(
                    name.ends_with('_') || METRICS.iter().any(|m| m.name == name),
                    "{name} is not a metric"
                );
            }
        }
    }
}
