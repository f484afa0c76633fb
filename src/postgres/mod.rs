//! Reaching PostgreSQL, for whoever reads it (sector assignments, the
//! outbox): [`url`] reads a `DATABASE_URL` with libpq's TLS parameters and
//! [`tls`] builds the rustls connector for it.

pub mod tls;
pub mod url;

/// Adds server settings (`-c name=value …`) to the connection's startup
/// `options`, after the URL's own, which they do not replace.
pub fn add_options(config: &mut tokio_postgres::Config, settings: &str) {
    let options = match config.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{own} {settings}"),
        _ => settings.to_owned(),
    };
    config.options(options);
}
