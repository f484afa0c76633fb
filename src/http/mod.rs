//! The HTTP edge: routes, the WebSocket upgrade, health, metrics and the
//! publish API. Handlers translate between HTTP and the domain; they hold
//! no state of their own.

mod demo;
mod health;
mod pending;
mod presence;
mod publish;
pub mod server;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{any, get, post};

pub use demo::{DemoPage, DevSession, DevToken};
pub use health::HealthState;
pub use presence::PresenceState;
pub use publish::{PUBLISH_DISABLED, PublishState};

use crate::auth::Endpoint;
use crate::connection;

/// What the routes share: each route takes its own part.
#[derive(Clone)]
pub struct HttpState {
    /// The WebSocket endpoints hand each socket to a connection task.
    pub connections: Arc<connection::Context>,
    /// `/ws/health`, `/ws/health/live`, `/ws/health/detailed` and `/ws/metrics`.
    pub health: Arc<HealthState>,
    /// `/api/publish`.
    pub publish: Arc<PublishState>,
    /// `/api/presence`.
    pub presence: Arc<PresenceState>,
}

impl FromRef<HttpState> for Arc<connection::Context> {
    fn from_ref(state: &HttpState) -> Self {
        state.connections.clone()
    }
}

impl FromRef<HttpState> for Arc<HealthState> {
    fn from_ref(state: &HttpState) -> Self {
        state.health.clone()
    }
}

impl FromRef<HttpState> for Arc<PresenceState> {
    fn from_ref(state: &HttpState) -> Self {
        state.presence.clone()
    }
}

impl FromRef<HttpState> for Arc<PublishState> {
    fn from_ref(state: &HttpState) -> Self {
        state.publish.clone()
    }
}

/// Which of the optional routes the public router serves.
#[derive(Clone)]
pub struct Routes {
    /// `/ws/metrics`: not when `WSGATEWAY_METRICS_LISTEN` serves it, so
    /// that the platform's counts (tenants, branches, sessions) are not
    /// told to anyone who can reach the public port.
    pub metrics: bool,
    /// `/api/publish` and `/api/presence`: only with `WSGATEWAY_API_KEY`
    /// (otherwise a 404 that says so).
    pub publish: bool,
    /// The demo page at `/` (always under `dev`; `WSGATEWAY_DEMO_PAGE`).
    pub demo_page: Option<DemoPage>,
}

pub fn router(state: HttpState, routes: Routes) -> Router {
    let mut router = Router::new()
        .route("/ws/waiter", ws::route(Endpoint::Waiter))
        .route("/ws/kitchen", ws::route(Endpoint::Kitchen))
        .route("/ws/admin", ws::route(Endpoint::Admin))
        .route("/ws/diner", ws::route(Endpoint::Diner))
        .route("/ws/health", get(health::health))
        .route("/ws/health/live", get(health::live))
        .route("/ws/health/detailed", get(health::detailed));
    if routes.metrics {
        router = router.route("/ws/metrics", get(health::metrics));
    }
    if routes.publish {
        // The handler reads the body itself, after checking the key, with
        // its own limit; axum's default limit is off for this route.
        router = router.route(
            "/api/publish",
            post(publish::publish).layer(DefaultBodyLimit::disable()),
        );
    } else {
        router = router.route("/api/publish", any(publish::disabled));
    }
    if routes.publish {
        router = router.route("/api/presence", get(presence::presence));
    } else {
        router = router.route("/api/presence", any(presence::disabled));
    }
    if let Some(page) = routes.demo_page {
        router = router.merge(page.routes());
    }
    router.with_state(state)
}

/// The routes of the metrics listener (`WSGATEWAY_METRICS_LISTEN`): only
/// `/ws/metrics`.
pub fn metrics_router(health: Arc<HealthState>) -> Router {
    Router::new()
        .route("/ws/metrics", get(health::metrics))
        .with_state(health)
}
