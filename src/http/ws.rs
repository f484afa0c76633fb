//! The four WebSocket endpoints: check the upgrade request, answer 101,
//! and hand the TCP socket itself to [`crate::connection::serve`].
//!
//! The upgrade is ours rather than axum's `WebSocketUpgrade`, which gives
//! hyper's boxed stream: the connection needs the socket, which its hub
//! handle writes to from the fan-out (`connection/wire.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::auth::Endpoint;
use crate::connection::{self, ConnectRequest, Context, OnDecided, Wire};
use crate::http::server::{HeadWatch, PendingSlot};
use crate::metrics::Rejection;

/// Initial read buffer of a WebSocket (tungstenite allocates it up front).
const READ_BUFFER_BYTES: usize = 512;

/// Bytes of frames tungstenite buffers before writing them to the socket
/// (default 128 KiB). Its buffer keeps the capacity it once grew to, so
/// this bounds what a connection keeps after a burst; measured (bench
/// burst): 9 KiB per connection kept at the default, 4.9 at 4 KiB with the
/// same CPU per delivery, 2.8 at 2 KiB but 50 % more CPU.
const WRITE_BUFFER_BYTES: usize = 4096;

/// The route of one endpoint: every endpoint is the same handler, told
/// which endpoint it serves.
pub fn route(endpoint: Endpoint) -> MethodRouter<super::HttpState> {
    get(
        move |s: State<Arc<Context>>,
              c: ConnectInfo<SocketAddr>,
              q: RawQuery,
              h: HeaderMap,
              p: Option<Extension<PendingSlot>>,
              ws: Upgrade| async move { upgrade(endpoint, s, c, q, h, p, ws) },
    )
}

fn upgrade(
    endpoint: Endpoint,
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    pending: Option<Extension<PendingSlot>>,
    ws: Upgrade,
) -> Response {
    if ctx.draining.is_cancelled() {
        // Before the 101: the client tries another node (or this one
        // again, after its restart) rather than being closed at once.
        ctx.metrics.rejected(Rejection::Draining);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            axum::Json(serde_json::json!({"error": "draining"})),
        )
            .into_response();
    }
    let param = endpoint.token_param();
    let query_param = |name: &str| {
        query.as_deref().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    let token = query_param(param);
    let last_event_id = query_param("last_event_id");
    let origin = headers
        .get(axum::http::header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let request = ConnectRequest {
        on_decided: pending
            .map(|Extension(slot)| -> OnDecided { Box::new(move || slot.release()) }),
        endpoint,
        token,
        last_event_id,
        origin,
        peer,
    };
    let max = ctx.settings.max_message_bytes;
    let config = WebSocketConfig::default()
        // A whole message is limited to `max`; a single frame may be larger
        // so that an oversized message is read to its end and answered with
        // 1009 cleanly, but not unboundedly larger.
        .max_message_size(Some(max))
        .max_frame_size(Some(max.saturating_mul(2)))
        // Clients send little: a small initial read buffer (it grows for a
        // large message) keeps idle connections small.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    let tasks = ctx.tasks.clone();
    let accept = tungstenite::handshake::derive_accept_key(ws.key.as_bytes());
    let on_upgrade = ws.on_upgrade;
    tokio::spawn(tasks.track_future(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
        };
        // The server serves every connection as `TokioIo<HeadWatch>`.
        let Ok(parts) = upgraded.downcast::<TokioIo<HeadWatch>>() else {
            return tracing::error!("upgraded connection is not a TCP stream");
        };
        // A copy: `read_buf` is a view of hyper's whole read buffer (8 KiB),
        // which it would keep for the connection's life.
        let wire = Wire::new(
            parts.io.into_inner().into_inner(),
            bytes::Bytes::copy_from_slice(&parts.read_buf),
        );
        let socket = WebSocketStream::from_raw_socket(wire, Role::Server, Some(config)).await;
        connection::serve(socket, ctx, request).await;
    }));
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
        ],
        [(header::SEC_WEBSOCKET_ACCEPT, accept)],
    )
        .into_response()
}

/// A WebSocket upgrade request (RFC 6455 §4.2.1), checked as axum's own
/// extractor checks it, with its answers: 400 for a header that is not
/// right, 426 for a connection hyper cannot upgrade.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let bad = |why| Err((StatusCode::BAD_REQUEST, why));
        let headers = &parts.headers;
        if !header_has_token(headers, header::CONNECTION, "upgrade") {
            return bad("Connection header did not include 'upgrade'");
        }
        if !header_is(headers, header::UPGRADE, "websocket") {
            return bad("`Upgrade` header did not include 'websocket'");
        }
        if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return bad("`Sec-WebSocket-Version` header did not include '13'");
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return bad("`Sec-WebSocket-Key` header missing");
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Upgrade { key, on_upgrade })
    }
}

fn header_is(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether a comma-separated header lists `token` (any case).
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}
