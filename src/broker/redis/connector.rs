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
//! - Cluster: `REDIS_URL` lists seed nodes of a Redis Cluster. Commands go
//!   through the redis crate's cluster client, which learns the slots'
//!   owners from the seeds and follows `MOVED`, `ASK` and failovers; the
//!   subscriber makes a cluster connection of its own (RESP3, pushes), one
//!   connection per node, for sharded pub/sub.
//!
//! TLS: a `rediss://` URL is verified against the system roots, or the CA
//! certificates of `WSGATEWAY_REDIS_CA_FILE`, and presents the client
//! certificate of `WSGATEWAY_REDIS_CLIENT_CERT_FILE` when set. In sentinel
//! mode the sentinel URLs' scheme applies to the master too. The files are
//! read and checked once, here, at start.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    TlsCertificates, TlsMode,
};

use super::link::{describe_plain, tcp_settings};
use crate::config::{Config, ConfigError, RedisMode};
use crate::tls::{FileProblem, PemFile, TlsError};

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
    Cluster {
        /// The seed nodes, each with the password and TLS setting.
        seeds: Vec<ConnectionInfo>,
        certs: Option<TlsCertificates>,
        /// The seeds' addresses, for logs and health.
        addrs: String,
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

/// The TLS files' settings: (environment variable, flag, value).
type TlsFile<'a> = (&'static str, &'static str, &'a Option<std::path::PathBuf>);

fn tls_files(config: &Config) -> [TlsFile<'_>; 3] {
    [
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
    ]
}

fn bad_url(reason: String) -> ConfigError {
    ConfigError::Invalid {
        env: "REDIS_URL",
        flag: "redis-url",
        reason,
    }
}

impl Connector {
    /// The connector `config` describes, or `None` without `REDIS_URL`.
    /// Every inconsistency, and a CA, certificate or key file that cannot
    /// be read or is not PEM, is an error naming its setting.
    pub fn from_config(config: &Config) -> Result<Option<Connector>, ConfigError> {
        let Some(url) = &config.redis_url else {
            return without_url(config).map(|()| None);
        };
        let infos = connection_infos(config, url.expose())?;
        let tls = uses_tls(config, &infos)?;
        let certs = tls_certificates(config)?;
        let topology = match config.redis_mode {
            RedisMode::Standalone => standalone(config, infos, &certs)?,
            RedisMode::Sentinel => sentinel(config, infos, tls, certs)?,
            RedisMode::Cluster => cluster(config, infos, certs)?,
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
    pub async fn endpoint(&self) -> Result<Endpoint, EndpointError> {
        match &self.inner.topology {
            Topology::Cluster { .. } => Err(EndpointError::Cluster),
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
                    .map_err(|e| EndpointError::UnusableMaster(e.kind()))?
                    .set_redis_settings(master.redis.clone())
                    .set_tcp_settings(tcp_settings(Duration::from_secs(10)));
                let client = match &master.certs {
                    Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                    None => redis::Client::open(info),
                }
                .map_err(|e| EndpointError::Client(e.kind()))?;
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
    ) -> Result<(String, u16), EndpointError> {
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
                Ok(Ok((None, _))) => failures.push(SentinelFailure::UnknownMaster(name.into())),
                Ok(Err(e)) => failures.push(SentinelFailure::Failed(self.describe(&e))),
                Err(_) => failures.push(SentinelFailure::TimedOut),
            }
        }
        failures.dedup();
        Err(EndpointError::NoSentinel(failures))
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
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.topology, Topology::Cluster { .. })
    }

    /// The seed nodes, `host:port`, comma separated (cluster mode).
    pub fn seeds(&self) -> Option<&str> {
        match &self.inner.topology {
            Topology::Cluster { addrs, .. } => Some(addrs),
            _ => None,
        }
    }

    /// A cluster client for the seed nodes (cluster mode; `None` in the
    /// others). With `pushes`, it speaks RESP3 and sends every push there
    /// (the subscriber's messages, and a `Disconnection` when a node's
    /// connection drops).
    pub fn cluster_client(
        &self,
        pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Option<Result<ClusterClient, Failure>> {
        let Topology::Cluster { seeds, certs, .. } = &self.inner.topology else {
            return None;
        };
        let mut builder = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(self.inner.timeout)
            .response_timeout(self.inner.timeout)
            .tcp_settings(tcp_settings(Duration::from_secs(10)))
            .retries(3);
        if let Some(password) = seeds[0].redis_settings().password() {
            builder = builder.password(password);
        }
        if let Some(user) = seeds[0].redis_settings().username() {
            builder = builder.username(user);
        }
        if is_tls(seeds[0].addr()) {
            builder = builder.tls(TlsMode::Secure);
            if let Some(certs) = certs {
                builder = builder.certs(certs.clone());
            }
        }
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        Some(
            builder
                .build()
                .map_err(|e| Failure::Other(format!("cluster client: {}", describe_plain(&e)))),
        )
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.inner.topology, Topology::Sentinel { .. })
    }

    /// The master last found, in sentinel mode.
    pub fn master(&self) -> Option<String> {
        match self.inner.topology {
            Topology::Sentinel { .. } => self.inner.master.lock().clone(),
            Topology::Standalone { .. } | Topology::Cluster { .. } => None,
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
    pub fn describe(&self, e: &redis::RedisError) -> Failure {
        match tls_reason(e, self.inner.ca_file, self.inner.client_cert) {
            Some(reason) => Failure::Tls(reason),
            None => Failure::Other(describe_plain(e)),
        }
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

/// Without `REDIS_URL` (the embedded broker), no Redis setting may be set.
fn without_url(config: &Config) -> Result<(), ConfigError> {
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
    .chain(tls_files(config).map(|(e, f, v)| (e, f, v.is_some())))
    .find(|(_, _, set)| *set);
    match given {
        Some((env, flag, _)) => Err(ConfigError::Invalid {
            env,
            flag,
            reason: "set, but REDIS_URL is not".into(),
        }),
        None => Ok(()),
    }
}

/// `REDIS_URL`'s server (standalone) or sentinels, each checked.
fn connection_infos(config: &Config, url: &str) -> Result<Vec<ConnectionInfo>, ConfigError> {
    let urls: Vec<&str> = match config.redis_mode {
        RedisMode::Standalone => vec![url.trim()],
        RedisMode::Sentinel | RedisMode::Cluster => url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect(),
    };
    if urls.is_empty() {
        return Err(bad_url("no URL in the list".into()));
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
    Ok(infos)
}

/// Whether the URLs are all `rediss://` (TLS) or all `redis://`; the TLS
/// files need TLS.
fn uses_tls(config: &Config, infos: &[ConnectionInfo]) -> Result<bool, ConfigError> {
    let tls = match infos.iter().map(|i| is_tls(i.addr())).collect::<Vec<_>>() {
        flags if flags.iter().all(|t| *t) => true,
        flags if flags.iter().all(|t| !*t) => false,
        _ => return Err(bad_url("mixes redis:// and rediss:// URLs".into())),
    };
    let files = tls_files(config);
    if !tls && let Some((env, flag, _)) = files.iter().find(|(_, _, v)| v.is_some()) {
        let named: Vec<&str> = files
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
    Ok(tls)
}

/// `info` with `WSGATEWAY_REDIS_PASSWORD`, when set, as its password.
fn with_password(config: &Config, mut info: ConnectionInfo) -> ConnectionInfo {
    if let Some(password) = &config.redis_password {
        let redis = info
            .redis_settings()
            .clone()
            .set_password(password.expose());
        info = info.set_redis_settings(redis);
    }
    info
}

fn client(
    info: ConnectionInfo,
    certs: &Option<TlsCertificates>,
) -> Result<redis::Client, ConfigError> {
    match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
        None => redis::Client::open(info),
    }
    .map_err(|e| bad_url(format!("not usable ({:?})", e.kind())))
}

fn standalone(
    config: &Config,
    mut infos: Vec<ConnectionInfo>,
    certs: &Option<TlsCertificates>,
) -> Result<Topology, ConfigError> {
    if config.redis_sentinel_master.is_some() {
        return Err(ConfigError::Invalid {
            env: "WSGATEWAY_REDIS_SENTINEL_MASTER",
            flag: "redis-sentinel-master",
            reason: "set, but WSGATEWAY_REDIS_MODE is not sentinel".into(),
        });
    }
    let info = with_password(config, infos.remove(0));
    let addr = address(info.addr());
    Ok(Topology::Standalone {
        client: client(info, certs)?,
        addr,
    })
}

fn sentinel(
    config: &Config,
    infos: Vec<ConnectionInfo>,
    tls: bool,
    certs: Option<TlsCertificates>,
) -> Result<Topology, ConfigError> {
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
        redis: with_password(config, infos[0].clone())
            .redis_settings()
            .clone(),
        certs: certs.clone(),
    };
    let sentinels = infos
        .into_iter()
        .map(|info| {
            let redis = info.redis_settings().clone().set_db(0);
            client(info.set_redis_settings(redis), &certs)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Topology::Sentinel {
        sentinels,
        name,
        master,
    })
}

fn cluster(
    config: &Config,
    infos: Vec<ConnectionInfo>,
    certs: Option<TlsCertificates>,
) -> Result<Topology, ConfigError> {
    if config.redis_sentinel_master.is_some() {
        return Err(ConfigError::Invalid {
            env: "WSGATEWAY_REDIS_SENTINEL_MASTER",
            flag: "redis-sentinel-master",
            reason: "set, but WSGATEWAY_REDIS_MODE is not sentinel".into(),
        });
    }
    if let Some(info) = infos.iter().find(|i| i.redis_settings().db() != 0) {
        return Err(bad_url(format!(
            "selects database {}, but a Redis Cluster has database 0 only",
            info.redis_settings().db()
        )));
    }
    if infos
        .iter()
        .any(|i| matches!(i.addr(), ConnectionAddr::Unix(_)))
    {
        return Err(bad_url(
            "a cluster node's URL must be redis:// or rediss://".into(),
        ));
    }
    let seeds: Vec<ConnectionInfo> = infos
        .into_iter()
        .map(|info| with_password(config, info))
        .collect();
    let addrs = seeds
        .iter()
        .map(|i| address(i.addr()))
        .collect::<Vec<_>>()
        .join(",");
    Ok(Topology::Cluster {
        seeds,
        certs,
        addrs,
    })
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
    let root_cert = root_cert(config)?;
    let client_tls = client_tls(config)?;
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// `WSGATEWAY_REDIS_CA_FILE`'s PEM, checked: CA certificates only.
fn root_cert(config: &Config) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(path) = &config.redis_ca_file else {
        return Ok(None);
    };
    let invalid = invalid_file("WSGATEWAY_REDIS_CA_FILE", "redis-ca-file");
    let pem = PemFile::read(path).map_err(&invalid)?;
    pem.roots().map_err(&invalid)?;
    Ok(Some(pem.into_bytes()))
}

/// The client certificate and key's PEM, checked: both or neither, and a
/// pair.
fn client_tls(config: &Config) -> Result<Option<ClientTlsConfig>, ConfigError> {
    let (cert_path, key_path) = match (
        &config.redis_client_cert_file,
        &config.redis_client_key_file,
    ) {
        (None, None) => return Ok(None),
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
        (Some(cert), Some(key)) => (cert, key),
    };
    let bad_cert = invalid_file("WSGATEWAY_REDIS_CLIENT_CERT_FILE", "redis-client-cert-file");
    let bad_key = invalid_file("WSGATEWAY_REDIS_CLIENT_KEY_FILE", "redis-client-key-file");
    let cert = PemFile::read(cert_path).map_err(&bad_cert)?;
    let key = PemFile::read(key_path).map_err(&bad_key)?;
    let chain = cert.certificates().map_err(&bad_cert)?;
    let private_key = key.private_key().map_err(&bad_key)?;
    // The pair must be usable, and be a pair.
    crate::tls::check_pair(chain, private_key).map_err(|e| match e {
        TlsError::NotAPair(e) => ConfigError::Invalid {
            env: "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
            flag: "redis-client-key-file",
            reason: format!(
                "{}: not usable with WSGATEWAY_REDIS_CLIENT_CERT_FILE ({e})",
                key_path.display()
            ),
        },
        other => bad_key(other),
    })?;
    Ok(Some(ClientTlsConfig {
        client_cert: cert.into_bytes(),
        client_key: key.into_bytes(),
    }))
}

/// A TLS file error as an invalid `env` setting.
fn invalid_file(env: &'static str, flag: &'static str) -> impl Fn(TlsError) -> ConfigError {
    move |e| ConfigError::Invalid {
        env,
        flag,
        reason: match e {
            TlsError::File {
                path,
                problem: FileProblem::Unreadable(e),
            } => format!("cannot read {}: {e}", path.display()),
            other => other.to_string(),
        },
    }
}

/// Why a Redis connection failed, in words, never the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The TLS handshake failed: a setting or a certificate to fix, not a
    /// fault that passes (logged as an error). The words name the setting
    /// to look at.
    #[error("TLS: {0}")]
    Tls(String),
    /// Anything else: refused, reset, timed out, a server's error reply.
    #[error("{0}")]
    Other(String),
}

impl Failure {
    pub fn is_tls(&self) -> bool {
        matches!(self, Failure::Tls(_))
    }
}

/// Why there is no server to connect to now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Sentinel mode: each sentinel failed, for these reasons (the same
    /// reason once when several in a row give it).
    #[error("no sentinel named the master: {}", join(.0))]
    NoSentinel(Vec<SentinelFailure>),
    #[error("sentinels named an unusable master ({0:?})")]
    UnusableMaster(redis::ErrorKind),
    #[error("cannot build a client for the master ({0:?})")]
    Client(redis::ErrorKind),
    /// Cluster mode has no single server: its connections are the
    /// cluster client's.
    #[error("a Redis Cluster has no single server")]
    Cluster,
}

impl EndpointError {
    /// Whether a sentinel could not be reached for a TLS failure.
    pub fn is_tls(&self) -> bool {
        match self {
            EndpointError::NoSentinel(failures) => failures
                .iter()
                .any(|f| matches!(f, SentinelFailure::Failed(f) if f.is_tls())),
            EndpointError::UnusableMaster(_)
            | EndpointError::Client(_)
            | EndpointError::Cluster => false,
        }
    }
}

/// Why one sentinel did not name the master.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SentinelFailure {
    #[error("does not know master {0:?}")]
    UnknownMaster(String),
    #[error(transparent)]
    Failed(Failure),
    #[error("timed out")]
    TimedOut,
}

fn join(failures: &[SentinelFailure]) -> String {
    let words: Vec<String> = failures.iter().map(ToString::to_string).collect();
    words.join("; ")
}

/// A TLS failure in words, naming the setting to look at (without the
/// `TLS: ` of [`Failure::Tls`]); `None` when `e` is not a TLS failure.
fn tls_reason(e: &redis::RedisError, ca_file: bool, client_cert: bool) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    let error = crate::tls::rustls_error(e)?;
    let trust = if ca_file {
        "WSGATEWAY_REDIS_CA_FILE"
    } else {
        "the system roots; set WSGATEWAY_REDIS_CA_FILE for a private CA"
    };
    Some(match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            format!("certificate not trusted ({trust})")
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "certificate not valid for the host in REDIS_URL".into()
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "server certificate expired".into()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "server certificate not valid yet".into()
        }
        Error::InvalidCertificate(other) => format!("invalid server certificate ({other})"),
        Error::AlertReceived(Alert::CertificateRequired) if !client_cert => {
            "the server requires a client certificate (WSGATEWAY_REDIS_CLIENT_CERT_FILE)".into()
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
            "the server refused the client certificate (WSGATEWAY_REDIS_CLIENT_CERT_FILE)".into()
        }
        Error::AlertReceived(alert) => format!("the server ended the handshake ({alert:?})"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "no TLS handshake from the server (is REDIS_URL's port a TLS port?)".into()
        }
        other => other.to_string(),
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
    fn words_a_tls_failure_with_its_setting() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = redis::RedisError::from(io);
        let reason = Failure::Tls(tls_reason(&e, true, false).unwrap());
        assert_eq!(
            reason.to_string(),
            "TLS: certificate not trusted (WSGATEWAY_REDIS_CA_FILE)"
        );
        let plain =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(tls_reason(&plain, true, false), None);
    }
}
