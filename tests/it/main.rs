//! The integration tests: one test binary, one module per subject (select a
//! group with `cargo test --test it chaos::`). One binary links the crate
//! once instead of once per file; see docs/TESTING.md for what shares the
//! process.

mod common;

mod acks;
mod audience;
mod bad_input;
mod binary;
mod chaos;
mod close_codes;
mod continuity;
mod doc_paths;
mod drain;
mod handshake_flood;
mod import_graph;
mod observability;
mod one_validation;
mod outbox;
mod packaging;
mod postgres_tls;
mod presence;
mod property_routing;
mod protocol;
mod proxy_selftest;
mod publish_limits;
mod redis_broker;
mod redis_cluster;
mod redis_faults;
mod redis_outcomes;
mod redis_sentinel;
mod redis_tls;
mod resume;
mod revocation;
mod routing;
mod sectors;
mod slow_consumer;
mod token_refresh;
