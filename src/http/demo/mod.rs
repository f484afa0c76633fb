//! The demo page: a browser client on the TypeScript SDK, to connect with
//! a printed URL or token and watch events, reconnections and resumes.
//!
//! `dev` always serves it, with its development tokens; `serve` only with
//! `WSGATEWAY_DEMO_PAGE=true`, and then without tokens (the page asks for
//! one). The SDK's browser bundle is a committed copy of
//! `clients/typescript/dist/browser/wsgateway-client.js`, so that the
//! gateway builds without Node; `scripts/demo_bundle.sh check` keeps the
//! two in step.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::Serialize;

use crate::auth::Endpoint;

const PAGE: &str = include_str!("page.html");
const CLIENT: &str = include_str!("wsgateway-client.js");

/// A development token, as `dev` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DevToken {
    #[serde(serialize_with = "endpoint_name")]
    pub endpoint: Endpoint,
    /// Who the token is, for the page's buttons (`waiter 7, WAITER`).
    pub label: String,
    pub token: String,
}

impl DevToken {
    pub fn new(endpoint: Endpoint, label: impl Into<String>, token: String) -> DevToken {
        DevToken {
            endpoint,
            label: label.into(),
            token,
        }
    }
}

fn endpoint_name<S: serde::Serializer>(e: &Endpoint, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.as_str())
}

/// What `dev` tells the page: tokens (minted on each request, so a page
/// loaded a day later still gets valid ones) and the publish API key.
/// Loopback-only development secrets: public by design, never logged.
pub struct DevSession {
    pub api_key: String,
    pub mint: Box<dyn Fn() -> Vec<DevToken> + Send + Sync>,
}

/// The demo page's routes, with or without `dev`'s session.
#[derive(Clone, Default)]
pub struct DemoPage {
    dev: Option<Arc<DevSession>>,
}

impl DemoPage {
    /// The page as `dev` serves it: with its tokens and key.
    pub fn dev(session: DevSession) -> DemoPage {
        DemoPage {
            dev: Some(Arc::new(session)),
        }
    }

    /// `/`, `/client.js` and `/demo/session.json`.
    pub fn routes<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let dev = self.dev;
        Router::new()
            .route("/", get(page))
            .route("/client.js", get(client))
            .route("/demo/session.json", get(move || session(dev.clone())))
    }
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

async fn client() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT,
    )
}

#[derive(Serialize)]
struct Session {
    /// `false` under `serve`: the page then asks for a token.
    dev: bool,
    api_key: Option<String>,
    tokens: Vec<DevToken>,
}

/// Always answers 200 (a 404 would be a console error on the page).
async fn session(dev: Option<Arc<DevSession>>) -> impl IntoResponse {
    let body = match dev {
        Some(dev) => Session {
            dev: true,
            api_key: Some(dev.api_key.clone()),
            tokens: (dev.mint)(),
        },
        None => Session {
            dev: false,
            api_key: None,
            tokens: Vec::new(),
        },
    };
    ([(header::CACHE_CONTROL, "no-store")], Json(body))
}
