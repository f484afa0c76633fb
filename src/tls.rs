//! The process's one TLS crypto provider.
//!
//! The gateway compiles one rustls provider, `ring` (aws-lc-rs is never
//! built). The redis crate builds its rustls configurations with
//! `ClientConfig::builder()`, which takes the process-default provider, so
//! that default is installed here, once, before any Redis client exists
//! ([`crate::Gateway::new`] calls it). Code that builds its own rustls
//! configuration should pass the provider explicitly
//! (`ClientConfig::builder_with_provider(provider())`) rather than rely on
//! the default.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The provider every TLS connection of the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default. Idempotent: a second call
/// (a second gateway in one process, as in the tests) finds it installed.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile; either will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
