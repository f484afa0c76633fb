//! TLS for every connection the gateway makes (Redis and PostgreSQL): the
//! one crypto provider, the trusted roots (the system's, or a PEM file's),
//! reading PEM certificates and keys, and the errors of all that.
//!
//! The gateway compiles one rustls provider, `ring` (aws-lc-rs is never
//! built). The redis crate builds its rustls configurations with
//! `ClientConfig::builder()`, which takes the process-default provider, so
//! that default is installed here, once, before any Redis client exists
//! ([`crate::Gateway::new`] calls it). Code that builds its own rustls
//! configuration passes the provider explicitly
//! (`ClientConfig::builder_with_provider(provider())`) rather than rely on
//! the default.
//!
//! What a failure means to an operator depends on the setting that named
//! the file, which only the caller knows: [`TlsError`] says what is wrong,
//! and each caller words it with its setting's name.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

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

/// Why TLS cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file that cannot be used.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    /// No usable root certificate among the system's (the first error
    /// met while loading them, if any).
    #[error("no trusted root certificate found on this system{}", first_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NoSystemRoots { first_error: Option<String> },
    /// The private key does not go with the certificate chain (or cannot
    /// sign).
    #[error("the key is not the certificate's ({0})")]
    NotAPair(rustls::Error),
    /// The roots cannot make a verifier.
    #[error("{0}")]
    Verifier(rustls::client::VerifierBuilderError),
    /// rustls refused the configuration itself.
    #[error("{0}")]
    Rustls(rustls::Error),
}

/// What is wrong with one PEM file.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    /// The operating system's words: missing, not allowed, ...
    #[error("{0}")]
    Unreadable(std::io::Error),
    #[error("not PEM ({0})")]
    NotPem(rustls::pki_types::pem::Error),
    #[error("no PEM certificate in it")]
    NoCertificate,
    #[error("no PEM private key in it")]
    NoKey,
    #[error("not a CA certificate ({0})")]
    NotRoot(rustls::Error),
}

/// A PEM file, read once (at start: a certificate that changes on disk is
/// read at the next start).
pub struct PemFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl PemFile {
    pub fn read(path: &Path) -> Result<PemFile, TlsError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(PemFile {
                path: path.to_owned(),
                bytes,
            }),
            Err(e) => Err(file_error(path, FileProblem::Unreadable(e))),
        }
    }

    /// The file's bytes, for libraries that parse the PEM themselves.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Every certificate in the file: at least one, all well-formed.
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(FileProblem::NotPem(e)))?;
        if certs.is_empty() {
            return Err(self.error(FileProblem::NoCertificate));
        }
        Ok(certs)
    }

    /// The file's certificates as trusted roots: each must be one.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        for cert in self.certificates()? {
            store
                .add(cert)
                .map_err(|e| self.error(FileProblem::NotRoot(e)))?;
        }
        Ok(store)
    }

    /// The file's private key (PKCS#8, PKCS#1 or SEC1; unencrypted).
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.bytes).map_err(|e| {
            self.error(match e {
                rustls::pki_types::pem::Error::NoItemsFound => FileProblem::NoKey,
                other => FileProblem::NotPem(other),
            })
        })
    }

    fn error(&self, problem: FileProblem) -> TlsError {
        file_error(&self.path, problem)
    }
}

fn file_error(path: &Path, problem: FileProblem) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        problem,
    }
}

/// The system's trusted roots (`/etc/ssl/certs`, as OpenSSL finds them):
/// at least one.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::NoSystemRoots {
            first_error: found.errors.first().map(ToString::to_string),
        });
    }
    Ok(store)
}

/// Checks that `key` is the private key of `chain`, and usable, without
/// building a connection.
pub fn check_pair(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::NotAPair)?;
    Ok(())
}

/// The rustls error somewhere in `e`'s causes (a failed handshake), if any.
pub fn rustls_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            // An io::Error's `source` skips the error it wraps.
            Some(inner)
        } else if let Some(inner) = e.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
            // So does an `Arc`'s (the redis crate shares its I/O errors).
            Some(&**inner)
        } else {
            e.source()
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown_issuer() -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    }

    #[test]
    fn finds_the_rustls_error_inside_io_and_arc() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown_issuer());
        assert_eq!(rustls_error(&io), Some(&unknown_issuer()));
        let redis = redis::RedisError::from(io);
        assert_eq!(rustls_error(&redis), Some(&unknown_issuer()));
        let shared: Arc<dyn Error + Send + Sync> = Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            unknown_issuer(),
        ));
        let wrapped = std::io::Error::other(shared);
        assert_eq!(rustls_error(&wrapped), Some(&unknown_issuer()));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(rustls_error(&refused), None);
    }

    #[test]
    fn files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = PemFile::read(&missing).err().unwrap();
        assert!(
            matches!(&e, TlsError::File { path, problem: FileProblem::Unreadable(_) } if *path == missing),
            "{e:?}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = PemFile::read(&junk).unwrap();
        let e = junk.certificates().unwrap_err();
        assert!(
            e.to_string()
                .ends_with("junk.pem: no PEM certificate in it"),
            "{e}"
        );
        let e = junk.private_key().unwrap_err();
        assert!(
            e.to_string()
                .ends_with("junk.pem: no PEM private key in it"),
            "{e}"
        );
    }
}
