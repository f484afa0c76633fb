//! wsgateway: a multi-tenant, role-routed WebSocket notification gateway.
//!
//! # Layout
//!
//! Data flows one way: broker → dispatcher → hub → connection. Modules,
//! from the top layer down (each imports only from below it; checked by
//! `tests/it/import_graph.rs`):
//!
//! - [`cli`]: the `serve`, `dev`, `token` and `publish` commands.
//! - [`gateway`]: builds the parts, runs them, shuts them down.
//! - [`http`]: the accept loop, routes, upgrade, health, metrics, publish
//!   API, the demo page.
//! - [`connection`]: one task per socket, admission to close.
//! - [`dispatcher`]: one task; stale check, de-duplication, fan-out.
//! - [`sectors`]: waiters' sector assignments from PostgreSQL, cached, and
//!   the task that applies their changes.
//! - [`acks`]: the node's side of acknowledgements: receipts and acks told
//!   to the broker, deadlines swept (redelivery, escalation).
//! - [`revocation`]: the Redis set of revoked tokens (`WSGATEWAY_REVOKED_JTI_KEY`).
//! - [`presence`]: who is connected to a branch, on every node (the hub,
//!   and in Redis mode each node's mirror of its connections).
//! - [`hub`]: the tenant-first index of open connections and the routing
//!   rule ([`hub::audience`]).
//! - [`broker`]: where events come from (the embedded broker, or Redis),
//!   their history, and the bounded drop-oldest queue that feeds the
//!   dispatcher.
//! - [`auth`]: staff JWT and table-token verification.
//! - [`channel`], [`event`]: the wire formats, validated at the edge.
//! - [`reply`]: the gateway's own messages to clients, as types;
//!   [`close`]: the close codes.
//! - [`metrics`], [`drop_rate`], [`unknown_types`]: what is counted, the
//!   drop-rate alert, unknown event types by name.
//! - [`config`]: every setting, parsed and validated once.
//! - [`tls`]: TLS for Redis and PostgreSQL (the crypto provider, roots,
//!   certificate files).
//!
//! The load generator behind BENCHMARKS.md is a crate of its own,
//! `wsgateway-bench` (`bench/`), that uses this library only for tokens
//! and setting names.
//!
//! # Terms
//!
//! *The seed* is the original design of this gateway, a Python
//! implementation written before this one. Its channel names
//! (`channel:branch:{b}:waiters` and the others: "the seed's channels"),
//! metric names, log texts, limits and numbers are kept so that backends,
//! dashboards and alerts written for it work unchanged; a comment saying
//! "the seed's" marks one of them. docs/ARCHITECTURE.md lists the other
//! terms the code uses (scope, cursor, epoch, gap, floor).

pub mod acks;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod close;
pub mod config;
pub mod connection;
pub mod dispatcher;
pub mod drain;
pub mod drop_rate;
pub mod event;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod postgres;
pub mod presence;
pub mod reply;
pub mod revocation;
pub mod sectors;
pub mod tls;
pub mod unknown_types;

pub use config::Config;
pub use gateway::Gateway;
