//! The four WebSocket endpoints: read the upgrade request, hand the socket
//! to [`crate::connection::serve`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, get};

use crate::auth::Endpoint;
use crate::connection::{self, ConnectRequest, Context, OnDecided};
use crate::http::server::PendingSlot;

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
              ws: WebSocketUpgrade| async move { upgrade(endpoint, s, c, q, h, p, ws) },
    )
}

fn upgrade(
    endpoint: Endpoint,
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    pending: Option<Extension<PendingSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
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
    let tasks = ctx.tasks.clone();
    ws
        // A whole message is limited to `max`; a single frame may be larger
        // so that an oversized message is read to its end and answered with
        // 1009 cleanly, but not unboundedly larger.
        .max_message_size(max)
        .max_frame_size(max.saturating_mul(2))
        // Clients send little: a small initial read buffer (it grows for a
        // large message) keeps idle connections small.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| tasks.track_future(connection::serve(socket, ctx, request)))
}
