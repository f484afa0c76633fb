//! `GET /api/presence?tenant_id=&branch_id=`: the open connections of a
//! tenant's branch, on every node (PROTOCOL.md §16). The publish API's key,
//! and its 401 and 404 when no key is configured.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::publish::{ApiError, bearer_matches};
use crate::auth::{BranchId, TenantId};
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::presence::Presence;

/// What the presence API reads.
pub struct PresenceState {
    pub presence: Arc<Presence>,
    pub metrics: Arc<Metrics>,
    /// `WSGATEWAY_API_KEY`: without it the route is not served.
    pub api_key: Option<Secret>,
}

/// Why `/api/presence` answers 404.
pub const PRESENCE_DISABLED: &str =
    "the presence API is off: set WSGATEWAY_API_KEY (--api-key) to enable GET /api/presence";

/// `/api/presence` without `WSGATEWAY_API_KEY`, whatever the method.
pub async fn disabled() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "presence_disabled",
        detail: PRESENCE_DISABLED.into(),
    }
    .into_response()
}

pub async fn presence(
    State(state): State<Arc<PresenceState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(key) = &state.api_key else {
        return disabled().await;
    };
    let counted = |outcome| state.metrics.presence_requested("http", outcome);
    if !bearer_matches(&headers, key.expose()) {
        counted("unauthorized");
        return ApiError::unauthorized().into_response();
    }
    let (tenant, branch) = match read_query(query.as_deref().unwrap_or_default()) {
        Ok(ids) => ids,
        Err(e) => {
            counted("invalid_query");
            return e.into_response();
        }
    };
    match state.presence.list(tenant, &[branch]).await {
        Ok(mut lists) => {
            counted("ok");
            let list = lists.pop().expect("one branch asked, one list");
            (StatusCode::OK, Json(list)).into_response()
        }
        Err(e) => {
            counted("unavailable");
            tracing::warn!(error = %e, "presence unavailable");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "presence_unavailable",
                detail: "presence cannot be read now (Redis); retry later".into(),
            }
            .into_response()
        }
    }
}

/// `tenant_id` and `branch_id`, each an integer (the first of each, if
/// repeated; other parameters are ignored).
fn read_query(query: &str) -> Result<(TenantId, BranchId), ApiError> {
    let mut tenant = None;
    let mut branch = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match name.as_ref() {
            "tenant_id" => &mut tenant,
            "branch_id" => &mut branch,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    let integer = |name: &str, value: Option<String>| match value {
        None => Err(ApiError::bad("invalid_query", format!("{name} is missing"))),
        Some(v) => v.parse::<i64>().map_err(|_| {
            ApiError::bad("invalid_query", format!("{name} is not an integer: {v:?}"))
        }),
    };
    Ok((integer("tenant_id", tenant)?, integer("branch_id", branch)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_needs_two_integers() {
        assert_eq!(read_query("tenant_id=1&branch_id=5").unwrap(), (1, 5));
        assert_eq!(
            read_query("branch_id=5&x=y&tenant_id=2&tenant_id=3").unwrap(),
            (2, 5)
        );
        for bad in [
            "",
            "tenant_id=1",
            "branch_id=5",
            "tenant_id=a&branch_id=5",
            "tenant_id=1&branch_id=5.0",
            "tenant_id=1&branch_id=",
            "tenant_id=99999999999999999999&branch_id=1",
        ] {
            let e = read_query(bad).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "invalid_query"),
                "{bad}"
            );
        }
    }
}
