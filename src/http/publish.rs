//! `POST /api/publish`: validate a batch completely, then publish it whole
//! through the broker, or answer why not and publish nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::broker::{Broker, BrokerError, Publication, Rules, read_item};
use crate::config::Secret;
use crate::event::unix_ms;
use crate::metrics::Metrics;

/// What the publish API reads.
pub struct PublishState {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    /// `WSGATEWAY_API_KEY`: without it the route is not served.
    pub api_key: Option<Secret>,
    /// `WSGATEWAY_MAX_PUBLISH_BYTES`.
    pub max_bytes: usize,
    /// `WSGATEWAY_MAX_PUBLISH_ITEMS`.
    pub max_items: usize,
    /// `WSGATEWAY_MAX_PUBLISH_CHANNELS`.
    pub max_channels: usize,
    /// `WSGATEWAY_STALE_EVENT_S`.
    pub stale_event: Duration,
}

/// A refusal of the publish API, as `{"error": code, "detail": ...}`.
/// Why `/api/publish` answers 404 (and `serve` warns at start).
pub const PUBLISH_DISABLED: &str =
    "the publish API is off: set WSGATEWAY_API_KEY (--api-key) to enable POST /api/publish";

#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) detail: String,
}

impl ApiError {
    pub(super) fn bad(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            detail: detail.into(),
        }
    }

    /// A request without the API key (publish and presence alike).
    pub(super) fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            detail: "a valid `Authorization: Bearer <key>` header is required".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "detail": self.detail})),
        )
            .into_response()
    }
}

/// `/api/publish` without `WSGATEWAY_API_KEY`, whatever the method: a 404
/// that says why. Not a refusal of the request (not counted): the API is
/// off.
pub async fn disabled() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "publish_disabled",
        detail: PUBLISH_DISABLED.into(),
    }
    .into_response()
}

pub async fn publish(
    State(state): State<Arc<PublishState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match answer(&state, headers, body).await {
        Ok(response) => response,
        Err(e) => {
            if e.status.is_client_error() {
                state
                    .metrics
                    .publish_rejected
                    .with_label_values(&[e.code])
                    .inc();
            }
            e.into_response()
        }
    }
}

/// What a request gets: the broker's answer, or why not.
async fn answer(
    state: &PublishState,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(disabled().await);
    };
    if !bearer_matches(&headers, key.expose()) {
        return Err(ApiError::unauthorized());
    }
    let limit = state.max_bytes;
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "body_too_large",
            detail: format!("the body exceeds {limit} bytes (WSGATEWAY_MAX_PUBLISH_BYTES)"),
        });
    };
    let rules = Rules {
        now_ms: unix_ms(),
        stale_ms: state.stale_event.as_millis() as i64,
        max_items: state.max_items,
        max_channels: state.max_channels,
    };
    let batch = read_batch(&body, &rules)?;
    let n = batch.len() as u64;
    match state.broker.publish(batch).await {
        Ok(published) => {
            let duplicates = published.iter().filter(|p| p.duplicate).count() as u64;
            state.metrics.published(n - duplicates, duplicates);
            let (ids, duplicate): (Vec<String>, Vec<bool>) =
                published.into_iter().map(|p| (p.id, p.duplicate)).unzip();
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"event_ids": ids, "duplicates": duplicate})),
            )
                .into_response())
        }
        Err(BrokerError::Unavailable(why)) => {
            tracing::warn!(reason = %why, "publish refused: nothing was published");
            Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "broker_unavailable",
                detail: "the broker cannot take events now; nothing was published; retry later"
                    .into(),
            })
        }
        Err(BrokerError::OutcomeUnknown(why)) => {
            tracing::warn!(reason = %why, "publish outcome unknown");
            Err(ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                code: "outcome_unknown",
                detail: "the broker did not answer in time: the events may have been published; \
                         retry with the same event_id to publish each at most once"
                    .into(),
            })
        }
    }
}

pub(super) fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(key.as_bytes()).into()
}

/// Reads and validates a whole request body: one item or an array of items.
/// Both bounds are checked before any item is read further, so the work
/// and memory of a refused request stay within the body's size.
fn read_batch(body: &[u8], rules: &Rules) -> Result<Vec<Publication>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("invalid_body", format!("the body is not JSON: {e}")))?;
    let items = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad("invalid_body", "the array is empty"));
        }
        Value::Array(items) if items.len() > rules.max_items => {
            return Err(ApiError::bad(
                "too_many_items",
                format!(
                    "{} items; at most {} per request (WSGATEWAY_MAX_PUBLISH_ITEMS)",
                    items.len(),
                    rules.max_items
                ),
            ));
        }
        Value::Array(items) => items,
        single => vec![single],
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            read_item(item, rules)
                .map_err(|e| ApiError::bad(e.code, format!("item {i}: {}", e.detail)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channel;

    const RULES: Rules = Rules {
        now_ms: 1_000_000,
        stale_ms: 30_000,
        max_items: 3,
        max_channels: 4,
    };

    fn read(body: &str) -> Result<Vec<Publication>, &'static str> {
        read_batch(body.as_bytes(), &RULES).map_err(|e| e.code)
    }

    #[test]
    fn accepts_the_three_shapes() {
        let ev = r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5}"#;
        assert_eq!(
            read(&format!(
                r#"{{"channel":"channel:branch:5:waiters","event":{ev}}}"#
            ))
            .unwrap()
            .len(),
            1
        );
        let many = read(&format!(
            r#"{{"channels":["channel:branch:5:waiters","channel:branch:5:admin"],"event":{ev}}}"#
        ))
        .unwrap();
        assert_eq!(many[0].channels.len(), 2);
        let arr = format!(
            r#"[{{"channel":"channel:branch:5:kitchen","event":{ev}}},{{"channel":"channel:branch:5:admin","event":{ev}}}]"#
        );
        assert_eq!(read(&arr).unwrap().len(), 2);
    }

    #[test]
    fn refuses_bad_bodies_whole() {
        let ev = r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5}"#;
        assert_eq!(read("nope").unwrap_err(), "invalid_body");
        assert_eq!(read("[]").unwrap_err(), "invalid_body");
        assert_eq!(
            read(&format!(r#"{{"event":{ev}}}"#)).unwrap_err(),
            "invalid_body"
        );
        assert_eq!(
            read(&format!(r#"{{"channel":"channel:x","event":{ev}}}"#)).unwrap_err(),
            "unknown_channel"
        );
        assert_eq!(
            read(&format!(
                r#"{{"channel":"channel:branch:6:waiters","event":{ev}}}"#
            ))
            .unwrap_err(),
            "invalid_event"
        );
        assert_eq!(
            read(r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","branch_id":5}}"#)
                .unwrap_err(),
            "invalid_event"
        );
        assert_eq!(read(r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5,"ts":1}}"#).unwrap_err(), "stale_event");
        assert_eq!(
            read(r#"{"channel":"channel:branch:5:waiters","event":{"type":"resync","tenant_id":1,"branch_id":5}}"#)
                .unwrap_err(),
            "reserved_type"
        );
        assert_eq!(
            read(r#"{"channel":"channel:branch:5:waiters","event":[]}"#).unwrap_err(),
            "invalid_event"
        );
        let arr = format!(
            r#"[{{"channel":"channel:branch:5:kitchen","event":{ev}}},{{"channel":"bad","event":{ev}}}]"#
        );
        assert_eq!(read(&arr).unwrap_err(), "unknown_channel");
    }

    #[test]
    fn bounds_items_and_channels() {
        let ev = json!({"type":"ROUND_READY","tenant_id":1,"branch_id":5});
        let item = |channels: Vec<String>| json!({"channels": channels, "event": ev});
        let sessions = |n: usize| (0..n).map(|s| format!("channel:session:{s}")).collect();
        let body = |items: Vec<Value>| Value::Array(items).to_string();
        let full = body(vec![item(sessions(4)); 3]);
        let read_full = read(&full).unwrap();
        assert_eq!(read_full.len(), 3);
        assert_eq!(read_full[2].channels.len(), 4);
        assert_eq!(
            read(&body(vec![item(sessions(1)); 4])).unwrap_err(),
            "too_many_items"
        );
        assert_eq!(
            read(&body(vec![item(sessions(1)), item(sessions(5))])).unwrap_err(),
            "too_many_channels"
        );
        let twice = vec!["channel:session:1".to_owned(); 5];
        assert_eq!(
            read(&item(twice).to_string()).unwrap_err(),
            "too_many_channels",
            "duplicates count"
        );
    }

    #[test]
    fn a_channel_named_twice_is_kept_once_in_its_first_place() {
        let ev = json!({"type":"ROUND_READY","tenant_id":1,"branch_id":5});
        let names = [
            "channel:session:2",
            "channel:session:1",
            "channel:session:2",
        ];
        let read = read(&json!({"channels": names, "event": ev}).to_string()).unwrap();
        assert_eq!(
            read[0].channels,
            vec![Channel::Session(2), Channel::Session(1)]
        );
    }
}
