//! The HTTP edge: routes, the WebSocket upgrade, health, metrics and the
//! publish API. Handlers translate between HTTP and the domain; they hold
//! no state of their own.

mod demo;
mod health;
mod pending;
mod publish;
pub mod server;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::auth::Endpoint;
use crate::gateway::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new()
        .route("/ws/waiter", ws::route(Endpoint::Waiter))
        .route("/ws/kitchen", ws::route(Endpoint::Kitchen))
        .route("/ws/admin", ws::route(Endpoint::Admin))
        .route("/ws/diner", ws::route(Endpoint::Diner))
        .route("/ws/health", get(health::health))
        .route("/ws/health/detailed", get(health::detailed));
    // With a metrics address, the platform's counts (tenants, branches,
    // sessions) are not told to anyone who can reach the public port.
    if shared.config.metrics_listen.is_none() {
        router = router.route("/ws/metrics", get(health::metrics));
    }
    // Without a key the publish API does not exist (404).
    if shared.config.api_key.is_some() {
        // The handler reads the body itself, after checking the key, with
        // its own limit; axum's default limit is off for this route.
        router = router.route(
            "/api/publish",
            post(publish::publish).layer(DefaultBodyLimit::disable()),
        );
    }
    if shared.demo_page {
        router = router.route("/", get(demo::page));
    }
    router.with_state(shared)
}

/// The routes of the metrics listener (`WSGATEWAY_METRICS_LISTEN`): only
/// `/ws/metrics`.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/ws/metrics", get(health::metrics))
        .with_state(shared)
}
