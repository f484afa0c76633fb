//! What `DATABASE_URL` says: tokio-postgres's connection settings, plus the
//! TLS parameters that tokio-postgres does not know (`sslmode` beyond
//! `disable`/`prefer`/`require`, `sslrootcert`, `sslcert`, `sslkey`).
//!
//! This is the one place that reads the URL's TLS parameters: they are
//! taken out of its query, and the rest goes to tokio-postgres unchanged
//! (byte for byte, so its own percent-decoding applies). Errors name the
//! parameter, never a value that could be the password.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;

/// libpq's `sslmode`, less `allow` (plain first, TLS on failure), which
/// tokio-postgres cannot express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What the server's certificate chain is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// `sslrootcert=<file>`: PEM certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the system's trusted roots.
    System,
}

/// `sslcert` and `sslkey`: a client certificate chain and its key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS half of a `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// When set, the chain is verified, whatever the (TLS) mode: as libpq
    /// does for `prefer` and `require` when it has a root certificate.
    pub root: Option<RootCerts>,
    pub client: Option<ClientCert>,
}

impl TlsSettings {
    /// The mode and root, for messages: `sslmode=verify-full, sslrootcert=/x.pem`.
    pub fn describe(&self) -> String {
        match &self.root {
            None => format!("sslmode={}", self.mode.as_str()),
            Some(RootCerts::System) => {
                format!("sslmode={}, sslrootcert=system", self.mode.as_str())
            }
            Some(RootCerts::File(f)) => {
                format!(
                    "sslmode={}, sslrootcert={}",
                    self.mode.as_str(),
                    f.display()
                )
            }
        }
    }
}

/// A parsed `DATABASE_URL`.
#[derive(Debug)]
pub struct DatabaseUrl {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// Why a `DATABASE_URL` cannot be used: a message to follow "invalid
/// setting DATABASE_URL: ", naming parameters, never a value that could be
/// the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// tokio-postgres refused the `key=value` form (its words).
    #[error(
        "{0} (sslrootcert, sslcert, sslkey and sslmode=verify-ca or verify-full are read \
         from the postgres:// URL form only)"
    )]
    KeyValue(String),
    /// tokio-postgres refused the URL (its words, which name options,
    /// never their values).
    #[error("{0}")]
    Refused(String),
    #[error("{0} is not UTF-8 once percent-decoded")]
    NotUtf8(&'static str),
    #[error("sslmode=allow is not supported (plain first, TLS on failure): use prefer or disable")]
    Allow,
    #[error("sslmode `{0}` is not one of disable, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    #[error(
        "sslmode={} needs sslrootcert: the CA certificate file that signed the \
         server's certificate, or `system` (with verify-full) for the system's roots",
        .0.as_str()
    )]
    NeedsRoot(SslMode),
    #[error("sslrootcert=system needs sslmode=verify-full, not {} (as in libpq)", .0.as_str())]
    SystemNeedsVerifyFull(SslMode),
    #[error("sslcert is given without sslkey")]
    CertWithoutKey,
    #[error("sslkey is given without sslcert")]
    KeyWithoutCert,
}

/// Parses `url`.
pub fn parse(url: &str) -> Result<DatabaseUrl, UrlError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url {
        return parse_key_value(url);
    }
    let (rest, params) = TlsParams::take(url)?;
    let mut config: tokio_postgres::Config =
        rest.parse().map_err(|e| UrlError::Refused(chain(&e)))?;
    let root = match params.root.as_deref() {
        None | Some("") => None,
        Some("system") => Some(RootCerts::System),
        Some(file) => Some(RootCerts::File(PathBuf::from(file))),
    };
    let mode = read_mode(params.mode.as_deref(), root.as_ref())?;
    check_root(mode, root.as_ref())?;
    let client = client_cert(params.cert, params.key)?;
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok(DatabaseUrl {
        config,
        tls: TlsSettings { mode, root, client },
    })
}

/// The `key=value` form goes to tokio-postgres as it is; it knows only
/// disable, prefer and require.
fn parse_key_value(url: &str) -> Result<DatabaseUrl, UrlError> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| UrlError::KeyValue(chain(&e)))?;
    let mode = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => SslMode::Disable,
        tokio_postgres::config::SslMode::Require => SslMode::Require,
        _ => SslMode::Prefer,
    };
    Ok(DatabaseUrl {
        config,
        tls: TlsSettings {
            mode,
            root: None,
            client: None,
        },
    })
}

/// The TLS parameters of a URL's query, percent-decoded.
#[derive(Default)]
struct TlsParams {
    mode: Option<String>,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsParams {
    /// Takes the TLS parameters out of `url`'s query; returns the rest of
    /// the URL, byte for byte, and them.
    fn take(url: &str) -> Result<(String, TlsParams), UrlError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept: Vec<&str> = Vec::new();
        let mut params = TlsParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(k, "a parameter name")?;
            // As in libpq, the last of repeated parameters counts.
            match name.as_str() {
                "sslmode" => params.mode = Some(decode(v, "sslmode")?),
                "sslrootcert" => params.root = Some(decode(v, "sslrootcert")?),
                "sslcert" => params.cert = Some(decode(v, "sslcert")?),
                "sslkey" => params.key = Some(decode(v, "sslkey")?),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((rest, params))
    }
}

fn read_mode(mode: Option<&str>, root: Option<&RootCerts>) -> Result<SslMode, UrlError> {
    Ok(match mode {
        // libpq 16: sslrootcert=system makes verify-full the default.
        None | Some("") if root == Some(&RootCerts::System) => SslMode::VerifyFull,
        // libpq's default.
        None | Some("") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("prefer") => SslMode::Prefer,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some("allow") => return Err(UrlError::Allow),
        Some(other) => return Err(UrlError::UnknownMode(other.to_owned())),
    })
}

/// The verifying modes need a root; the system's roots go with
/// verify-full only (as in libpq).
fn check_root(mode: SslMode, root: Option<&RootCerts>) -> Result<(), UrlError> {
    match (root, mode) {
        (_, SslMode::Disable) => Ok(()),
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => Err(UrlError::NeedsRoot(mode)),
        (Some(RootCerts::System), m) if m != SslMode::VerifyFull => {
            Err(UrlError::SystemNeedsVerifyFull(m))
        }
        _ => Ok(()),
    }
}

fn client_cert(cert: Option<String>, key: Option<String>) -> Result<Option<ClientCert>, UrlError> {
    match (
        cert.filter(|c| !c.is_empty()),
        key.filter(|k| !k.is_empty()),
    ) {
        (Some(cert), Some(key)) => Ok(Some(ClientCert {
            cert: cert.into(),
            key: key.into(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(UrlError::CertWithoutKey),
        (None, Some(_)) => Err(UrlError::KeyWithoutCert),
    }
}

fn decode(s: &str, what: &'static str) -> Result<String, UrlError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| UrlError::NotUtf8(what))
}

/// An error and its causes, `: `-separated (tokio-postgres's `Display`
/// leaves the cause out). tokio-postgres's parse errors name options,
/// never their values.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> TlsSettings {
        parse(url).unwrap().tls
    }

    fn err(url: &str) -> String {
        parse(url).unwrap_err().to_string()
    }

    #[test]
    fn the_default_is_libpq_prefer() {
        let t = tls("postgres://u:p@db/app");
        assert_eq!(t.mode, SslMode::Prefer);
        assert_eq!(t.root, None);
        let parsed = parse("postgres://u:p@db/app").unwrap();
        assert_eq!(
            parsed.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
    }

    #[test]
    fn every_mode_and_what_tokio_postgres_is_told() {
        use tokio_postgres::config::SslMode as Pg;
        for (mode, ours, theirs) in [
            ("disable", SslMode::Disable, Pg::Disable),
            ("prefer", SslMode::Prefer, Pg::Prefer),
            ("require", SslMode::Require, Pg::Require),
            ("verify-ca", SslMode::VerifyCa, Pg::Require),
            ("verify-full", SslMode::VerifyFull, Pg::Require),
        ] {
            let p = parse(&format!(
                "postgres://u@db/app?sslmode={mode}&sslrootcert=/ca.pem"
            ))
            .unwrap();
            assert_eq!(p.tls.mode, ours);
            assert_eq!(p.config.get_ssl_mode(), theirs);
            assert_eq!(p.tls.root, Some(RootCerts::File("/ca.pem".into())));
        }
    }

    #[test]
    fn the_rest_of_the_url_reaches_tokio_postgres_unchanged() {
        let p = parse(
            "postgresql://us%40r:p%26ss@db.example.com:6543/app?application_name=a+b&sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fdb%20ca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(p.config.get_user(), Some("us@r"));
        assert_eq!(p.config.get_password(), Some(&b"p&ss"[..]));
        assert_eq!(p.config.get_dbname(), Some("app"));
        assert_eq!(p.config.get_ports(), &[6543]);
        // tokio-postgres does not decode `+`; neither did we re-encode it.
        assert_eq!(p.config.get_application_name(), Some("a+b"));
        assert_eq!(
            p.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(
            p.tls.root,
            Some(RootCerts::File("/etc/ssl/db ca.pem".into()))
        );
    }

    #[test]
    fn the_last_of_repeated_parameters_counts() {
        assert_eq!(
            tls("postgres://u@db/app?sslmode=disable&sslmode=require").mode,
            SslMode::Require
        );
    }

    #[test]
    fn system_roots_are_for_verify_full_which_they_make_the_default() {
        let t = tls("postgres://u@db/app?sslrootcert=system");
        assert_eq!(
            (t.mode, t.root),
            (SslMode::VerifyFull, Some(RootCerts::System))
        );
        for weak in ["prefer", "require", "verify-ca"] {
            let e = err(&format!(
                "postgres://u@db/app?sslrootcert=system&sslmode={weak}"
            ));
            assert!(e.contains("sslrootcert=system") && e.contains(weak), "{e}");
        }
    }

    #[test]
    fn verifying_modes_need_a_root() {
        for mode in ["verify-ca", "verify-full"] {
            let e = err(&format!("postgres://u@db/app?sslmode={mode}"));
            assert!(e.contains("sslrootcert") && e.contains(mode), "{e}");
        }
        // A root makes require and prefer verify the chain (libpq).
        assert!(
            tls("postgres://u@db/app?sslmode=require&sslrootcert=/ca.pem")
                .root
                .is_some()
        );
    }

    #[test]
    fn client_certificates_come_in_pairs() {
        let t = tls("postgres://u@db/app?sslmode=require&sslcert=/c.pem&sslkey=/k.pem");
        assert_eq!(
            t.client,
            Some(ClientCert {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        assert!(err("postgres://u@db/app?sslcert=/c.pem").contains("sslkey"));
        assert!(err("postgres://u@db/app?sslkey=/k.pem").contains("sslcert"));
    }

    #[test]
    fn bad_values_are_named_and_the_password_never_shown() {
        let e = err("postgres://u:hunter2@db/app?sslmode=verify_full");
        assert!(e.contains("sslmode") && e.contains("verify_full"), "{e}");
        let e = err("postgres://u:hunter2@db/app?sslmode=allow");
        assert!(e.contains("allow"), "{e}");
        let e = err("postgres://u:hunter2@db/app?sslcrl=/crl.pem");
        assert!(e.contains("sslcrl"), "{e}");
        let e = err("postgres://u:hunter2@db:port/app");
        assert!(e.contains("port"), "{e}");
        let e = err("postgres://u:hunter2@db/app?sslrootcert=%ff");
        assert!(e.contains("sslrootcert"), "{e}");
        for url in [
            "postgres://u:hunter2@db/app?sslmode=verify_full",
            "postgres://u:hunter2@db/app?sslcrl=/crl.pem",
            "postgres://u:hunter2@db:port/app",
            "postgres://u:hunter2@db/app?sslmode=verify-ca",
            "host=db password=hunter2 sslmode=verify-full",
        ] {
            assert!(!err(url).contains("hunter2"), "{url}: {}", err(url));
        }
    }

    #[test]
    fn the_key_value_form_keeps_tokio_postgres_modes() {
        assert_eq!(tls("host=db user=u sslmode=require").mode, SslMode::Require);
        let e = err("host=db user=u sslmode=verify-full");
        assert!(e.contains("sslmode") && e.contains("URL form"), "{e}");
    }
}
