//! TLS to PostgreSQL: the rustls client configuration for a `DATABASE_URL`'s
//! [`TlsSettings`], with libpq's meaning of each `sslmode`.
//!
//! | mode | without `sslrootcert` | with `sslrootcert` |
//! |---|---|---|
//! | `prefer`, `require` | any certificate | the chain, not the name |
//! | `verify-ca` | (refused at start) | the chain, not the name |
//! | `verify-full` | (refused at start) | the chain and the host name or IP |
//!
//! The crypto provider is rustls's `ring`, named here, so that nothing
//! depends on a process-wide default provider. The certificate files are
//! read once, at start-up: a file that cannot be used stops start-up.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::url::{RootCerts, SslMode, TlsSettings};

/// The TLS connector for `settings`, or `None` for `sslmode=disable`. The
/// error names the parameter whose file could not be used.
pub fn connector(
    settings: &TlsSettings,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
    client_config(settings).map(|c| c.map(tokio_postgres_rustls::MakeRustlsConnect::new))
}

pub fn client_config(settings: &TlsSettings) -> Result<Option<ClientConfig>, String> {
    if settings.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verifier(settings, &provider)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &settings.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let chain = read_certs(&client.cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(&client.key).map_err(|e| {
                format!(
                    "sslkey={} cannot be used: {}",
                    client.key.display(),
                    pem_error(e)
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert and sslkey do not make a client certificate: {e}"))?
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
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let roots = match &settings.root {
        None => None,
        Some(root) => Some(Arc::new(load_roots(root)?)),
    };
    let algorithms = provider.signature_verification_algorithms;
    Ok(match (settings.mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?
        }
        (_, roots) => Arc::new(ChainOnly { roots, algorithms }),
    })
}

fn load_roots(root: &RootCerts) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        RootCerts::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    format!(
                        "sslrootcert={} holds a certificate that cannot be a root: {e}",
                        path.display()
                    )
                })?;
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(format!(
                    "sslrootcert=system: no trusted root certificate found on this system{why}"
                ));
            }
        }
    }
    Ok(store)
}

/// Every PEM certificate in `path`; at least one.
fn read_certs(path: &std::path::Path, param: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let cannot = |why: String| format!("{param}={} cannot be used: {why}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| cannot(pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cannot(pem_error(e)))?;
    if certs.is_empty() {
        return Err(cannot("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not PEM: {other:?}"),
    }
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

/// The rustls error somewhere in `e`'s causes (a failed handshake), if any.
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error's `source` skips the error it wraps.
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
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
        Arc::new(rustls::crypto::ring::default_provider())
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
        .unwrap_err();
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
        .unwrap_err();
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
