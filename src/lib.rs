//! wsgateway: a multi-tenant, role-routed WebSocket notification gateway.
//!
//! # Layout
//!
//! Data flows one way: broker → dispatcher → hub → connection.
//!
//! - [`config`]: every setting, parsed and validated once.
//! - [`auth`]: staff JWT and table-token verification.
//! - [`channel`], [`event`]: the wire formats, validated at the edge.
//! - [`reply`]: the gateway's own messages to clients, as types.
//! - [`broker`]: where events come from (embedded; the seam for Redis), and
//!   the bounded drop-oldest queue that feeds the dispatcher.
//! - [`dispatcher`]: one task; stale check, de-duplication, fan-out.
//! - [`metrics`], [`drop_rate`], [`unknown_types`]: what is counted, the
//!   drop-rate alert, unknown event types by name.
//! - [`hub`]: the tenant-first index of open connections.
//! - [`revocation`]: the Redis set of revoked tokens (`WSGATEWAY_REVOKED_JTI_KEY`).
//! - [`connection`]: one task per socket, admission to close.
//! - [`http`]: routes, upgrade, health, metrics, publish API.
//! - [`gateway`]: builds the parts, runs them, shuts them down.
//! - [`tls`]: the one TLS crypto provider (ring), installed at start.
//! - [`cli`]: the `serve`, `dev`, `token` and `publish` commands.
//!
//! The load generator behind BENCHMARKS.md is a crate of its own,
//! `wsgateway-bench` (`bench/`), that uses this library only for tokens
//! and setting names.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod close;
pub mod config;
pub mod connection;
pub mod dispatcher;
pub mod drop_rate;
pub mod event;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod reply;
pub mod revocation;
pub mod sectors;
pub mod tls;
pub mod unknown_types;

pub use config::Config;
pub use gateway::Gateway;
