//! Where the gateway's Redis connections go: one way to get "the server to
//! use now", shared by the command link, the subscriber and the revocation
//! set.
//!
//! - Standalone (`WSGATEWAY_REDIS_MODE=standalone`): `REDIS_URL` names the
//!   server.
//! - Sentinel: `REDIS_URL` lists sentinels. Every new connection first asks
//!   them, in order, where the master of `WSGATEWAY_REDIS_SENTINEL_MASTER`
//!   is (`SENTINEL get-master-addr-by-name`), then checks with `ROLE` that
//!   the server it reached is a master: after a failover, the next
//!   connection goes to the promoted replica, and a demoted master is never
//!   used. The connector remembers the master last found; a connection made
//!   to another address is stale, and its owner replaces it.
//!
//! A Redis Cluster mode would be a third [`Topology`].
//!
//! TLS: a `rediss://` URL is verified against the system roots, or the CA
//! certificates of `WSGATEWAY_REDIS_CA_FILE`, and presents the client
//! certificate of `WSGATEWAY_REDIS_CLIENT_CERT_FILE` when set. In sentinel
//! mode the sentinel URLs' scheme applies to the master too. The files are
//! read and checked once, here, at start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    TlsCertificates,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::link::{describe_plain, tcp_settings};
use crate::config::{Config, ConfigError, RedisMode};

/// Hands out clients for the server to use now. Cheap to clone: clones
/// share what they learnt of the master.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    /// What the TLS settings were, to say what a verification failure means.
    ca_file: bool,
    client_cert: bool,
    timeout: Duration,
    /// The master last found (sentinel mode), `host:port`.
    master: Mutex<Option<String>>,
    /// The connection to the sentinel that answered last (its index),
    /// reused by the next question; dropped when it fails.
    sentinel: Mutex<Option<(usize, MultiplexedConnection)>>,
}

enum Topology {
    Standalone {
        client: redis::Client,
        addr: String,
    },
    Sentinel {
        sentinels: Vec<redis::Client>,
        name: String,
        master: MasterTemplate,
    },
}

/// How to reach a master once its address is known.
struct MasterTemplate {
    tls: bool,
    redis: redis::RedisConnectionInfo,
    certs: Option<TlsCertificates>,
}

/// A client for one server, and its address for logs and health.
pub struct Endpoint {
    pub client: redis::Client,
    pub addr: String,
}

impl Connector {
    /// The connector `config` describes, or `None` without `REDIS_URL`.
    /// Every inconsistency, and a CA, certificate or key file that cannot
    /// be read or is not PEM, is an error naming its setting.
    pub fn from_config(config: &Config) -> Result<Option<Connector>, ConfigError> {
        let tls_files = [
            (
                "WSGATEWAY_REDIS_CA_FILE",
                "redis-ca-file",
                &config.redis_ca_file,
            ),
            (
                "WSGATEWAY_REDIS_CLIENT_CERT_FILE",
                "redis-client-cert-file",
                &config.redis_client_cert_file,
            ),
            (
                "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
                "redis-client-key-file",
                &config.redis_client_key_file,
            ),
        ];
        let Some(url) = &config.redis_url else {
            if config.redis_mode == RedisMode::Sentinel {
                return Err(ConfigError::Missing {
                    env: "REDIS_URL",
                    flag: "redis-url",
                    why: "required by WSGATEWAY_REDIS_MODE=sentinel",
                });
            }
            let given = [
                (
                    "WSGATEWAY_REDIS_PASSWORD",
                    "redis-password",
                    config.redis_password.is_some(),
                ),
                (
                    "WSGATEWAY_REDIS_SENTINEL_MASTER",
                    "redis-sentinel-master",
                    config.redis_sentinel_master.is_some(),
                ),
            ]
            .into_iter()
            .chain(tls_files.iter().map(|(e, f, v)| (*e, *f, v.is_some())))
            .find(|(_, _, set)| *set);
            return match given {
                Some((env, flag, _)) => Err(ConfigError::Invalid {
                    env,
                    flag,
                    reason: "set, but REDIS_URL is not".into(),
                }),
                None => Ok(None),
            };
        };
        let bad_url = |reason: String| ConfigError::Invalid {
            env: "REDIS_URL",
            flag: "redis-url",
            reason,
        };
        let urls: Vec<&str> = match config.redis_mode {
            RedisMode::Standalone => vec![url.expose().trim()],
            RedisMode::Sentinel => url
                .expose()
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect(),
        };
        if urls.is_empty() {
            return Err(bad_url("no sentinel URL in the list".into()));
        }
        let mut infos = Vec::with_capacity(urls.len());
        for u in &urls {
            let info = u
                .into_connection_info()
                .map_err(|e| bad_url(format!("not a Redis URL ({:?})", e.kind())))?
                .set_tcp_settings(tcp_settings(Duration::from_secs(10)));
            // Pub/sub and functions ignore the database index: another
            // database is no isolation without a prefix.
            let db = info.redis_settings().db();
            if db != 0 && config.redis_prefix.is_none() {
                return Err(bad_url(format!(
                    "selects database {db}, but Redis pub/sub and functions ignore the database: set WSGATEWAY_REDIS_PREFIX to keep this deployment apart"
                )));
            }
            infos.push(info);
        }
        let tls = match infos.iter().map(|i| is_tls(i.addr())).collect::<Vec<_>>() {
            flags if flags.iter().all(|t| *t) => true,
            flags if flags.iter().all(|t| !*t) => false,
            _ => return Err(bad_url("mixes redis:// and rediss:// URLs".into())),
        };
        if !tls && let Some((env, flag, _)) = tls_files.iter().find(|(_, _, v)| v.is_some()) {
            let named: Vec<&str> = tls_files
                .iter()
                .filter(|(_, _, v)| v.is_some())
                .map(|(e, _, _)| *e)
                .collect();
            return Err(ConfigError::Invalid {
                env,
                flag,
                reason: format!(
                    "{} need a rediss:// REDIS_URL (TLS); REDIS_URL is redis://",
                    named.join(", ")
                ),
            });
        }
        let certs = tls_certificates(config)?;
        let password_override = |mut info: ConnectionInfo| {
            if let Some(password) = &config.redis_password {
                let redis = info
                    .redis_settings()
                    .clone()
                    .set_password(password.expose());
                info = info.set_redis_settings(redis);
            }
            info
        };
        let client = |info: ConnectionInfo| {
            match &certs {
                Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                None => redis::Client::open(info),
            }
            .map_err(|e| bad_url(format!("not usable ({:?})", e.kind())))
        };
        let topology = match config.redis_mode {
            RedisMode::Standalone => {
                if config.redis_sentinel_master.is_some() {
                    return Err(ConfigError::Invalid {
                        env: "WSGATEWAY_REDIS_SENTINEL_MASTER",
                        flag: "redis-sentinel-master",
                        reason: "set, but WSGATEWAY_REDIS_MODE is not sentinel".into(),
                    });
                }
                let info = password_override(infos.remove(0));
                let addr = address(info.addr());
                Topology::Standalone {
                    client: client(info)?,
                    addr,
                }
            }
            RedisMode::Sentinel => {
                let Some(name) = config.redis_sentinel_master.clone() else {
                    return Err(ConfigError::Missing {
                        env: "WSGATEWAY_REDIS_SENTINEL_MASTER",
                        flag: "redis-sentinel-master",
                        why: "required by WSGATEWAY_REDIS_MODE=sentinel",
                    });
                };
                if infos
                    .iter()
                    .any(|i| matches!(i.addr(), ConnectionAddr::Unix(_)))
                {
                    return Err(bad_url(
                        "a sentinel URL must be redis:// or rediss://".into(),
                    ));
                }
                // The master: the first URL's credentials and database (or
                // WSGATEWAY_REDIS_PASSWORD); each sentinel: its own URL's
                // credentials, database 0.
                let master = MasterTemplate {
                    tls,
                    redis: password_override(infos[0].clone()).redis_settings().clone(),
                    certs: certs.clone(),
                };
                let sentinels = infos
                    .into_iter()
                    .map(|info| {
                        let redis = info.redis_settings().clone().set_db(0);
                        client(info.set_redis_settings(redis))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Topology::Sentinel {
                    sentinels,
                    name,
                    master,
                }
            }
        };
        Ok(Some(Connector {
            inner: Arc::new(Inner {
                topology,
                ca_file: config.redis_ca_file.is_some(),
                client_cert: config.redis_client_cert_file.is_some(),
                timeout: config.redis_timeout_s.0,
                master: Mutex::new(None),
                sentinel: Mutex::new(None),
            }),
        }))
    }

    /// A client for the server to use now: standalone, the one server;
    /// sentinel, the master the sentinels name (asked now). The error says
    /// why, without the URL.
    pub async fn endpoint(&self) -> Result<Endpoint, String> {
        match &self.inner.topology {
            Topology::Standalone { client, addr } => Ok(Endpoint {
                client: client.clone(),
                addr: addr.clone(),
            }),
            Topology::Sentinel {
                sentinels,
                name,
                master,
            } => {
                let (host, port) = self.ask_sentinels(sentinels, name).await?;
                let addr = if master.tls {
                    ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host.clone(), port)
                };
                let info = addr
                    .into_connection_info()
                    .map_err(|e| format!("sentinels named an unusable master ({:?})", e.kind()))?
                    .set_redis_settings(master.redis.clone())
                    .set_tcp_settings(tcp_settings(Duration::from_secs(10)));
                let client = match &master.certs {
                    Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                    None => redis::Client::open(info),
                }
                .map_err(|e| format!("cannot build a client for the master ({:?})", e.kind()))?;
                let addr = format!("{host}:{port}");
                self.note_master(&addr);
                Ok(Endpoint { client, addr })
            }
        }
    }

    /// In sentinel mode, asks the sentinels where the master is now, so
    /// that a failover is followed even while the old master still
    /// answers (a manual failover, a partition); the connections to another
    /// address are then stale. Called by every health check. An error
    /// (no sentinel answers) keeps the master last found.
    pub async fn refresh(&self) {
        if let Topology::Sentinel {
            sentinels, name, ..
        } = &self.inner.topology
            && let Ok((host, port)) = self.ask_sentinels(sentinels, name).await
        {
            self.note_master(&format!("{host}:{port}"));
        }
    }

    /// Asks the sentinels where the master is: first the one that answered
    /// last, on its open connection, then each in turn; the first answer
    /// wins.
    async fn ask_sentinels(
        &self,
        sentinels: &[redis::Client],
        name: &str,
    ) -> Result<(String, u16), String> {
        let timeout = self.inner.timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let question = || {
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("get-master-addr-by-name").arg(name);
            cmd
        };
        let cached = self.inner.sentinel.lock().clone();
        if let Some((_, mut conn)) = cached {
            let question = question();
            let asked = question.query_async::<Option<(String, u16)>>(&mut conn);
            if let Ok(Ok(Some(found))) = tokio::time::timeout(timeout, asked).await {
                return Ok(found);
            }
            *self.inner.sentinel.lock() = None;
        }
        let mut failures = Vec::new();
        for (i, sentinel) in sentinels.iter().enumerate() {
            let ask = async {
                let mut conn = sentinel
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let found = question()
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>((found, conn))
            };
            match tokio::time::timeout(timeout * 2, ask).await {
                Ok(Ok((Some(found), conn))) => {
                    *self.inner.sentinel.lock() = Some((i, conn));
                    return Ok(found);
                }
                Ok(Ok((None, _))) => failures.push(format!("does not know master {name:?}")),
                Ok(Err(e)) => failures.push(self.describe(&e)),
                Err(_) => failures.push("timed out".into()),
            }
        }
        failures.dedup();
        Err(format!(
            "no sentinel named the master: {}",
            failures.join("; ")
        ))
    }

    /// Records the master found, and logs a change.
    fn note_master(&self, addr: &str) {
        let mut master = self.inner.master.lock();
        match master.as_deref() {
            Some(old) if old == addr => return,
            Some(_) => tracing::warn!("Redis master changed to {addr}"),
            None => tracing::info!("Redis master is {addr}"),
        }
        *master = Some(addr.to_owned());
    }

    /// Whether the sentinels name the master.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.inner.topology, Topology::Sentinel { .. })
    }

    /// The master last found, in sentinel mode.
    pub fn master(&self) -> Option<String> {
        match self.inner.topology {
            Topology::Sentinel { .. } => self.inner.master.lock().clone(),
            Topology::Standalone { .. } => None,
        }
    }

    /// Whether a connection to `addr` still goes to the server to use: in
    /// sentinel mode, false once another master has been found.
    pub fn is_current(&self, addr: &str) -> bool {
        self.master().is_none_or(|m| m == addr)
    }

    /// In sentinel mode, checks that `conn` reached a master (`ROLE`); a
    /// replica, a demoted master included, is refused.
    pub async fn check_master(
        &self,
        conn: &mut MultiplexedConnection,
        addr: &str,
    ) -> Result<(), RoleError> {
        if !self.is_sentinel() {
            return Ok(());
        }
        let role: redis::Value = redis::cmd("ROLE")
            .query_async(conn)
            .await
            .map_err(RoleError::Failed)?;
        match role_of(&role).as_deref() {
            Some("master") => Ok(()),
            Some(other) => Err(RoleError::NotMaster(format!(
                "{addr} is a {other}, not the master"
            ))),
            None => Err(RoleError::NotMaster(format!(
                "{addr} gave no role (is it a Redis server?)"
            ))),
        }
    }

    /// A connection error in words, never the URL; TLS failures say which
    /// setting to look at.
    pub fn describe(&self, e: &redis::RedisError) -> String {
        tls_reason(e, self.inner.ca_file, self.inner.client_cert)
            .unwrap_or_else(|| describe_plain(e))
    }
}

/// Why a server could not be confirmed as the master.
#[derive(Debug)]
pub enum RoleError {
    /// It answered: it is not the master.
    NotMaster(String),
    /// The `ROLE` call itself failed.
    Failed(redis::RedisError),
}

/// The first element of a `ROLE` answer: `master`, `slave` or `sentinel`.
fn role_of(v: &redis::Value) -> Option<String> {
    let redis::Value::Array(items) = v else {
        return None;
    };
    match items.first()? {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn is_tls(addr: &ConnectionAddr) -> bool {
    matches!(addr, ConnectionAddr::TcpTls { .. })
}

fn address(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".into(),
    }
}

/// Reads and checks the CA and client certificate files, when given.
fn tls_certificates(config: &Config) -> Result<Option<TlsCertificates>, ConfigError> {
    let root_cert = match &config.redis_ca_file {
        None => None,
        Some(path) => {
            let pem = read("WSGATEWAY_REDIS_CA_FILE", "redis-ca-file", path)?;
            let invalid = |reason: String| ConfigError::Invalid {
                env: "WSGATEWAY_REDIS_CA_FILE",
                flag: "redis-ca-file",
                reason,
            };
            let certs =
                certificates(&pem).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    invalid(format!("{}: not a CA certificate ({e})", path.display()))
                })?;
            }
            Some(pem)
        }
    };
    let client_tls = match (
        &config.redis_client_cert_file,
        &config.redis_client_key_file,
    ) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                env: "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
                flag: "redis-client-key-file",
                why: "required by WSGATEWAY_REDIS_CLIENT_CERT_FILE",
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                env: "WSGATEWAY_REDIS_CLIENT_CERT_FILE",
                flag: "redis-client-cert-file",
                why: "required by WSGATEWAY_REDIS_CLIENT_KEY_FILE",
            });
        }
        (Some(cert_path), Some(key_path)) => {
            let cert_env = ("WSGATEWAY_REDIS_CLIENT_CERT_FILE", "redis-client-cert-file");
            let key_env = ("WSGATEWAY_REDIS_CLIENT_KEY_FILE", "redis-client-key-file");
            let client_cert = read(cert_env.0, cert_env.1, cert_path)?;
            let client_key = read(key_env.0, key_env.1, key_path)?;
            let chain = certificates(&client_cert).map_err(|e| ConfigError::Invalid {
                env: cert_env.0,
                flag: cert_env.1,
                reason: format!("{}: {e}", cert_path.display()),
            })?;
            let bad_key = |reason: String| ConfigError::Invalid {
                env: key_env.0,
                flag: key_env.1,
                reason,
            };
            let key = PrivateKeyDer::from_pem_slice(&client_key).map_err(|_| {
                bad_key(format!("{}: no PEM private key in it", key_path.display()))
            })?;
            // The pair must be usable, and be a pair.
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| bad_key(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key)
                .map_err(|e| {
                    bad_key(format!(
                        "{}: not usable with WSGATEWAY_REDIS_CLIENT_CERT_FILE ({e})",
                        key_path.display()
                    ))
                })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

fn read(env: &'static str, flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::Invalid {
        env,
        flag,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

/// The PEM certificates of a file: at least one, all well-formed.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// The rustls error behind a connection error, if there is one: the redis
/// crate wraps it in an `io::Error`, itself in an `Arc`.
fn rustls_error(e: &redis::RedisError) -> Option<rustls::Error> {
    use std::error::Error;
    let mut source: Option<&(dyn Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r.clone());
        }
        if let Some(inner) = s.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
            let inner: &(dyn Error + 'static) = &**inner;
            if let Some(io) = inner.downcast_ref::<std::io::Error>()
                && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                return Some(r.clone());
            }
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.clone());
            }
            source = inner.source();
            continue;
        }
        source = s.source();
    }
    None
}

/// A TLS failure in words, naming the setting to look at; `None` when `e`
/// is not a TLS failure.
fn tls_reason(e: &redis::RedisError, ca_file: bool, client_cert: bool) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    let error = rustls_error(e)?;
    let trust = if ca_file {
        "WSGATEWAY_REDIS_CA_FILE"
    } else {
        "the system roots; set WSGATEWAY_REDIS_CA_FILE for a private CA"
    };
    Some(match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            format!("TLS: certificate not trusted ({trust})")
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "TLS: certificate not valid for the host in REDIS_URL".into()
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "TLS: server certificate expired".into()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "TLS: server certificate not valid yet".into()
        }
        Error::InvalidCertificate(other) => format!("TLS: invalid server certificate ({other})"),
        Error::AlertReceived(Alert::CertificateRequired) if !client_cert => {
            "TLS: the server requires a client certificate (WSGATEWAY_REDIS_CLIENT_CERT_FILE)"
                .into()
        }
        Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) if client_cert => {
            "TLS: the server refused the client certificate (WSGATEWAY_REDIS_CLIENT_CERT_FILE)"
                .into()
        }
        Error::AlertReceived(alert) => format!("TLS: the server ended the handshake ({alert:?})"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "TLS: no TLS handshake from the server (is REDIS_URL's port a TLS port?)".into()
        }
        other => format!("TLS: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_roles() {
        let master = redis::Value::Array(vec![
            redis::Value::BulkString(b"master".to_vec()),
            redis::Value::Int(0),
        ]);
        assert_eq!(role_of(&master).as_deref(), Some("master"));
        let replica = redis::Value::Array(vec![redis::Value::BulkString(b"slave".to_vec())]);
        assert_eq!(role_of(&replica).as_deref(), Some("slave"));
        assert_eq!(role_of(&redis::Value::Nil), None);
    }

    #[test]
    fn finds_the_rustls_error_inside() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = redis::RedisError::from(io);
        let reason = tls_reason(&e, true, false).unwrap();
        assert_eq!(
            reason,
            "TLS: certificate not trusted (WSGATEWAY_REDIS_CA_FILE)"
        );
        let plain =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(tls_reason(&plain, true, false), None);
    }
}
