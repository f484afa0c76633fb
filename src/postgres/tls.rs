//! TLS to PostgreSQL: the rustls client configuration for a `DATABASE_URL`'s
//! [`TlsSettings`], with libpq's meaning of each `sslmode`.
//!
//! | mode | without `sslrootcert` | with `sslrootcert` |
//! |---|---|---|
//! | `prefer`, `require` | any certificate | the chain, not the name |
//! | `verify-ca` | (refused at start) | the chain, not the name |
//! | `verify-full` | (refused at start) | the chain and the host name or IP |
//!
//! The provider, the roots and the PEM files come from [`crate::tls`],
//! as for Redis; the provider is passed explicitly, so that nothing
//! depends on a process-wide default. The certificate files are read once,
//! at start-up: a file that cannot be used stops start-up.

use std::sync::Arc;

use futures_util::TryFutureExt;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use super::url::{RootCerts, SslMode, TlsSettings};
use crate::tls::{PemFile, TlsError};

/// A TLS parameter of `DATABASE_URL` that cannot be used, worded with the
/// parameter's name.
#[derive(Debug, thiserror::Error)]
pub struct TlsParamError {
    /// `sslrootcert`, `sslcert` or `sslkey`.
    param: &'static str,
    #[source]
    error: TlsError,
}

impl std::fmt::Display for TlsParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let param = self.param;
        match &self.error {
            TlsError::File { path, problem } => {
                write!(f, "{param}={} cannot be used: {problem}", path.display())
            }
            TlsError::NoSystemRoots { .. } => write!(f, "{param}=system: {}", self.error),
            TlsError::NotAPair(e) => {
                write!(
                    f,
                    "sslcert and sslkey do not make a client certificate: {e}"
                )
            }
            TlsError::Verifier(e) => write!(f, "{param}: {e}"),
            TlsError::Rustls(e) => write!(f, "TLS: {e}"),
        }
    }
}

fn param(param: &'static str) -> impl Fn(TlsError) -> TlsParamError {
    move |error| TlsParamError { param, error }
}

/// The TLS connector for `settings`, or `None` for `sslmode=disable`. The
/// error names the parameter whose file could not be used.
pub fn connector(settings: &TlsSettings) -> Result<Option<MakeConnect>, TlsParamError> {
    let config = client_config(settings)?;
    Ok(config.map(|c| MakeConnect(tokio_postgres_rustls::MakeRustlsConnect::new(c))))
}

pub fn client_config(settings: &TlsSettings) -> Result<Option<ClientConfig>, TlsParamError> {
    if settings.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = crate::tls::provider();
    let verifier = verifier(settings, &provider)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| param("sslmode")(TlsError::Rustls(e)))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &settings.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let chain = PemFile::read(&client.cert)
                .and_then(|f| f.certificates())
                .map_err(param("sslcert"))?;
            let key = PemFile::read(&client.key)
                .and_then(|f| f.private_key())
                .map_err(param("sslkey"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| param("sslkey")(TlsError::NotAPair(e)))?
        }
    };
    // What libpq sends (PostgreSQL 17 requires it with sslnegotiation=direct;
    // older servers ignore it).
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(config))
}

/// The server certificate check for `settings` (a TLS mode).
fn verifier(
    settings: &TlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsParamError> {
    let roots = match &settings.root {
        None => None,
        Some(RootCerts::File(path)) => Some(PemFile::read(path).and_then(|f| f.roots())),
        Some(RootCerts::System) => Some(crate::tls::system_roots()),
    };
    let roots = roots
        .transpose()
        .map_err(param("sslrootcert"))?
        .map(Arc::new);
    let algorithms = provider.signature_verification_algorithms;
    Ok(match (settings.mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| param("sslrootcert")(TlsError::Verifier(e)))?
        }
        (_, roots) => Arc::new(ChainOnly { roots, algorithms }),
    })
}

/// The connector given to tokio-postgres: rustls's, with its failures
/// marked as [`HandshakeFailed`], so that a failed connection says whether
/// TLS failed without reading its text.
#[derive(Clone)]
pub struct MakeConnect(tokio_postgres_rustls::MakeRustlsConnect);

/// A TLS handshake (or its set-up) that failed: the error is the one
/// tokio-postgres-rustls gave, unchanged in words.
#[derive(Debug)]
pub struct HandshakeFailed(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HandshakeFailed {
    /// The error itself, not its source: its words are this one's, so a
    /// chain of causes does not repeat them, and the rustls error inside
    /// stays reachable.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

fn handshake_failed<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> HandshakeFailed {
    HandshakeFailed(e.into())
}

impl<S> MakeTlsConnect<S> for MakeConnect
where
    tokio_postgres_rustls::MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect =
        Connect<<tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = HandshakeFailed;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, HandshakeFailed> {
        MakeTlsConnect::<S>::make_tls_connect(&mut self.0, domain)
            .map(Connect)
            .map_err(handshake_failed)
    }
}

/// One handshake, its failure marked (see [`MakeConnect`]).
pub struct Connect<T>(T);

impl<S, T: TlsConnect<S>> TlsConnect<S> for Connect<T> {
    type Stream = T::Stream;
    type Error = HandshakeFailed;
    type Future = futures_util::future::MapErr<T::Future, fn(T::Error) -> HandshakeFailed>;

    fn connect(self, stream: S) -> Self::Future {
        self.0
            .connect(stream)
            .map_err(handshake_failed::<T::Error> as fn(T::Error) -> HandshakeFailed)
    }
}

/// Whether `e` (or a cause of it) is a failed TLS handshake.
pub fn is_handshake_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<HandshakeFailed>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// `verify-ca` (and `prefer`/`require` with `sslrootcert`): the chain must
/// lead to one of `roots`, with the same check as [`WebPkiServerVerifier`]
/// (rustls's own `verify_server_cert_signed_by_trust_anchor`: signatures,
/// validity dates, key usage), and the name is not looked at. Built from
/// that function rather than by filtering the full verifier's errors, so
/// that no other failure can be mistaken for a name mismatch.
///
/// Without roots, `prefer` and `require` without `sslrootcert` (libpq's
/// meaning): any certificate is accepted, so the connection is encrypted
/// but not authenticated. Either way the handshake's signatures are checked
/// against the certificate the server sent.
#[derive(Debug)]
struct ChainOnly {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    type Ca = rcgen::CertifiedIssuer<'static, KeyPair>;

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(ca: &Ca, names: &[&str]) -> CertificateDer<'static> {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, ca).unwrap().der().clone()
    }

    fn roots(ca: &Ca) -> Arc<RootCertStore> {
        let mut store = RootCertStore::empty();
        store.add(ca.der().clone()).unwrap();
        Arc::new(store)
    }

    fn provider() -> Arc<CryptoProvider> {
        crate::tls::provider()
    }

    #[test]
    fn a_failed_handshake_is_marked_and_reads_as_before() {
        let io = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )
        };
        let marked = handshake_failed(io());
        assert!(is_handshake_failure(&marked));
        assert!(!is_handshake_failure(&io()));
        assert_eq!(crate::postgres::url::chain(&marked), io().to_string());
        assert!(crate::tls::rustls_error(&marked).is_some());
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_owned()).unwrap()
    }

    #[test]
    fn chain_only_ignores_the_name_but_not_the_issuer() {
        let ours = ca("ours");
        let theirs = ca("theirs");
        let verifier = ChainOnly {
            roots: Some(roots(&ours)),
            algorithms: provider().signature_verification_algorithms,
        };
        let now = UnixTime::now();
        let good = leaf(&ours, &["db.example.com"]);
        verifier
            .verify_server_cert(&good, &[], &name("other.example.com"), &[], now)
            .expect("another name is fine for verify-ca");
        let foreign = leaf(&theirs, &["other.example.com"]);
        let e = verifier
            .verify_server_cert(&foreign, &[], &name("other.example.com"), &[], now)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );
        // Signed by the right CA, but expired: refused.
        let mut params = CertificateParams::new(vec!["db.example.com".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let expired = params
            .signed_by(&KeyPair::generate().unwrap(), &ours)
            .unwrap()
            .der()
            .clone();
        let e = verifier
            .verify_server_cert(&expired, &[], &name("db.example.com"), &[], now)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{e:?}"
        );
    }

    #[test]
    fn verify_full_checks_the_name_and_verify_ca_does_not() {
        let ours = ca("ours");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, ours.pem()).unwrap();
        let now = UnixTime::now();
        let server = leaf(&ours, &["localhost", "127.0.0.1"]);
        for (mode, other_name_ok) in [(SslMode::VerifyFull, false), (SslMode::VerifyCa, true)] {
            let settings = TlsSettings {
                mode,
                root: Some(RootCerts::File(file.clone())),
                client: None,
            };
            let verifier = verifier(&settings, &provider()).unwrap();
            for n in ["localhost", "127.0.0.1"] {
                verifier
                    .verify_server_cert(&server, &[], &name(n), &[], now)
                    .unwrap();
            }
            let other = verifier.verify_server_cert(&server, &[], &name("127.0.0.2"), &[], now);
            assert_eq!(other.is_ok(), other_name_ok, "{mode:?}: {other:?}");
        }
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(&TlsSettings {
            mode: SslMode::VerifyFull,
            root: Some(RootCerts::File(missing.clone())),
            client: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("sslrootcert=") && e.contains(missing.to_str().unwrap()),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = client_config(&TlsSettings {
            mode: SslMode::Require,
            root: Some(RootCerts::File(junk)),
            client: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("sslrootcert") && e.contains("no PEM"), "{e}");
        assert!(
            client_config(&TlsSettings {
                mode: SslMode::Disable,
                root: Some(RootCerts::File(missing)),
                client: None,
            })
            .unwrap()
            .is_none(),
            "disable reads nothing"
        );
    }
}
