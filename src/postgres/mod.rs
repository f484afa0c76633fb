//! Reaching PostgreSQL, for whoever reads it (sector assignments, the
//! outbox): [`url`] reads a `DATABASE_URL` with libpq's TLS parameters and
//! [`tls`] builds the rustls connector for it.

pub mod tls;
pub mod url;
