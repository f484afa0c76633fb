//! `/ws/health`, `/ws/health/live`, `/ws/health/detailed` and `/ws/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::Endpoint;
use crate::broker::{Broker, EventQueue};
use crate::hub::Hub;
use crate::metrics::{Drop, Metrics};
use crate::outbox::Outbox;
use crate::sectors::{SectorAssignments, SectorStatus};
use crate::unknown_types::MAX_TRACKED_TYPES;

/// What the health and metrics routes read: no I/O, only these.
pub struct HealthState {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub queue: Arc<EventQueue>,
    pub sectors: Arc<SectorAssignments>,
    pub metrics: Arc<Metrics>,
    /// `WSGATEWAY_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `WSGATEWAY_RATE_LIMIT_PER_S`.
    pub rate_limit_per_s: u32,
    /// `WSGATEWAY_DROP_RATE_WINDOW_S`.
    pub drop_rate_window: Duration,
    /// Cancelled at the first SIGTERM or SIGINT: readiness is off.
    pub draining: CancellationToken,
    /// The outbox consumer, with `WSGATEWAY_OUTBOX_TABLE`.
    pub outbox: Option<Arc<Outbox>>,
}

fn connections(state: &HealthState) -> Value {
    let counts = state.hub.counts();
    let by_endpoint: serde_json::Map<String, Value> = Endpoint::ALL
        .iter()
        .map(|e| (e.as_str().to_owned(), json!(counts.by_endpoint[e.index()])))
        .collect();
    json!({"total": counts.total, "by_endpoint": by_endpoint})
}

/// Fast readiness: no I/O, one short read of the hub's counters; 503
/// `draining` from the first SIGTERM on, so that load balancers and
/// Kubernetes send no new client here.
pub async fn health(State(state): State<Arc<HealthState>>) -> Response {
    if state.draining.is_cancelled() {
        let body = json!({"status": "draining", "connections": connections(&state)});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({"status": "healthy", "connections": connections(&state)})).into_response()
}

/// Liveness: 200 while the process serves HTTP, draining or not (a
/// liveness probe must not restart a node in the middle of its drain).
pub async fn live() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// Readiness: whether the gateway can deliver, with the seed's keys.
pub async fn detailed(State(state): State<Arc<HealthState>>) -> Response {
    let broker = state.broker.status();
    let m = &state.metrics;
    let processed = m.events_processed.get();
    let dropped: u64 = Drop::ALL.iter().map(|d| m.dropped_count(*d)).sum();
    let breakers = match broker.breaker {
        Some((state, failures)) => {
            json!({"redis": {"state": state.as_str(), "failures": failures}})
        }
        None => json!({}),
    };
    let (sectors, sectors_reason) = state.sectors.health();
    // Unhealthy when events cannot reach this node's connections; degraded
    // when they can but publishing or sector lookups cannot work now.
    let (outbox, outbox_degraded) = outbox(state.outbox.as_deref());
    let status = if state.draining.is_cancelled() {
        Readiness::Draining
    } else if !broker.connected {
        Readiness::Unhealthy
    } else if sectors == SectorStatus::Degraded || !broker.publishing || outbox_degraded {
        Readiness::Degraded
    } else {
        Readiness::Healthy
    };
    let mut broker_json = json!({
        "kind": broker.kind,
        "status": if broker.connected { "connected" } else { "disconnected" },
        "publishing": broker.publishing,
    });
    if let Some(reason) = &broker.reason {
        broker_json["reason"] = reason.as_str().into();
    }
    if let Some(master) = &broker.master {
        broker_json["master"] = master.as_str().into();
    }
    let mut sector_json = json!({"status": sectors.as_str()});
    if let Some(reason) = sectors_reason {
        sector_json["reason"] = reason.into();
    }
    let body = json!({
        "status": status.as_str(),
        "broker": broker_json,
        "circuit_breaker": breakers,
        "connections": connections(&state),
        // Every open connection has a bucket of its own: the seed's tracked
        // connections and their capacity (the most connections, each tracked).
        "rate_limiter": {
            "tracked_connections": state.hub.counts().total,
            "capacity": state.max_connections,
            "per_connection_per_s": state.rate_limit_per_s,
        },
        "event_processing": {
            "queue_size": state.queue.len(),
            "queue_capacity": state.queue.capacity(),
            "processed": processed,
            "dropped": dropped,
            "drop_rate": m.drop_rate(),
            "drop_rate_window_s": state.drop_rate_window.as_secs().max(1),
            "drop_rate_alerts": m.drop_rate_alerts.get(),
        },
        "unknown_events": unknown_events(m),
        "sector_repository": sector_json,
        "outbox": outbox,
    });
    let code = if matches!(status, Readiness::Unhealthy | Readiness::Draining) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// The outbox's part of the detailed check, and whether it is degraded
/// (not connected to its database, or its last pass failed).
fn outbox(outbox: Option<&Outbox>) -> (Value, bool) {
    let Some(outbox) = outbox else {
        return (json!({"status": "disabled"}), false);
    };
    let h = outbox.health();
    let degraded = !h.connected || h.reason.is_some();
    let mut body = json!({
        "status": if degraded { "degraded" } else { "ok" },
        "table": h.table,
        "consuming": h.consuming,
        "lag_s": h.lag_s,
        "rows_per_s": h.rows_per_s,
        "rows_published": h.published,
        "dead_letters": h.dead_letters,
    });
    if let Some(reason) = h.reason {
        body["reason"] = reason.into();
    }
    (body, degraded)
}

/// The detailed check's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Healthy,
    /// Events reach this node's connections, but publishing or sector
    /// lookups cannot work now.
    Degraded,
    /// Events cannot reach this node's connections (503).
    Unhealthy,
    /// The node is closing its connections before it exits (503).
    Draining,
}

impl Readiness {
    fn as_str(self) -> &'static str {
        match self {
            Readiness::Healthy => "healthy",
            Readiness::Degraded => "degraded",
            Readiness::Unhealthy => "unhealthy",
            Readiness::Draining => "draining",
        }
    }
}

/// The seed's `get_unknown_event_metrics`, plus the count under `other`.
fn unknown_events(m: &Metrics) -> Value {
    let seen = m.unknown_types.snapshot();
    let type_counts: serde_json::Map<String, Value> = seen
        .types
        .iter()
        .map(|(t, n)| (t.to_string(), json!(n)))
        .collect();
    json!({
        "unknown_event_types_count": seen.total(),
        "unknown_event_types_seen": seen.types.iter().map(|(t, _)| &**t).collect::<Vec<_>>(),
        "unique_types_count": seen.types.len(),
        "max_tracked_types": MAX_TRACKED_TYPES,
        "type_counts": type_counts,
        "other_count": seen.other,
    })
}

pub async fn metrics(State(state): State<Arc<HealthState>>) -> Response {
    // Gauges derived from state are refreshed at scrape time.
    let m = &state.metrics;
    m.event_drop_rate.set(m.drop_rate());
    let sizes = state.hub.index_sizes();
    let entries = &m.hub_index_entries;
    for (index, n) in [
        ("tenant", sizes.tenants),
        ("branch", sizes.branches),
        ("session", sizes.sessions),
        ("user", sizes.users),
    ] {
        entries.with_label_values(&[index]).set(n as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}
