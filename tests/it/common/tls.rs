//! Certificates for TLS tests, made by the test: a CA, a server
//! certificate for 127.0.0.1 and localhost signed by it, and a client
//! certificate signed by it, as PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::redis_server::ServerTls;

pub struct Pki {
    /// Removed with the value.
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A new CA and its server and client certificates; `name` tells two
    /// CAs apart.
    pub fn generate(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let path = |file: &str| dir.path().join(file);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("wsgateway test CA {name}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "127.0.0.1",
        );
        let (client_cert, client_key) = leaf(
            vec!["wsgateway-test-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "wsgateway-test-client",
        );
        let pki = Pki {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
            dir,
        };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.server_cert, server_cert).unwrap();
        std::fs::write(&pki.server_key, server_key).unwrap();
        std::fs::write(&pki.client_cert, client_cert).unwrap();
        std::fs::write(&pki.client_key, client_key).unwrap();
        pki
    }

    /// A TLS-only server's settings with these certificates.
    pub fn server(&self, auth_clients: &'static str) -> ServerTls {
        ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            ca: self.ca.clone(),
            auth_clients,
            client: (self.client_cert.clone(), self.client_key.clone()),
        }
    }
}
